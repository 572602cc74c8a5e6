//! LoRA linear: `y = x W^T (+ bias) + s * (x A^T) B^T` with a frozen `W`.
//!
//! The backward yields gradients for `x`, `A` and `B` only: the frozen weight never gets a
//! gradient computed (Candle's matmul backward would compute one for both operands).
//!
//! Every product here has the shape `y = x R0 + bias + s * P R2` (see [`engine`]): the forward
//! with `R0 = W^T`, `P = x A^T`, `R2 = B^T`, and the input gradient with `R0 = W`, `P = g B`,
//! `R2 = A`. Each backend evaluates that shape once: on CUDA the base GEMM accumulates onto the
//! low-rank product (cuBLAS `beta = 1`), and inputs of 1 to 16 rows (decode) take one
//! kernel for the whole forward, P included; on the CPU one pass adds bias and low-rank term.
//! The forward keeps `P = x A^T` (`rows x r`, small) in the op because `dB = s g^T P`.
//!
//! Dispatch: the fused op for f32/f64/bf16/f16 (CUDA: f32/bf16/f16) when all operands share the
//! input's dtype and device; otherwise (or under `LORAFUSE_KERNELS=reference`) the reference.

mod cpu_small;
#[cfg(feature = "cuda")]
mod cuda;
mod engine;
#[cfg(feature = "metal")]
mod metal;
pub mod reference;

use crate::dispatch::fused_enabled;
use crate::error::shape_err;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
#[cfg(feature = "metal")]
use candle_core::MetalStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use engine::{EngineStorage, Plan};
use std::sync::Mutex;

const OP: &str = "lora_linear";

/// `x W^T + bias` with `W` (`[out, in]`) frozen: only `x` gets a gradient.
pub fn frozen_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if use_fused(x, Some(w), bias, None) {
        frozen_linear_fused(x, w, bias)
    } else {
        reference::frozen_linear_reference(x, w, bias)
    }
}

/// The fused [`frozen_linear`], whatever the kernel mode; errors on a backend or dtype without
/// a kernel.
pub fn frozen_linear_fused(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let p = Prepared::new(x, Some(w), bias, None)?;
    let op = FrozenLinear {
        w: p.w.clone(),
        bias: p.bias.clone(),
        transpose_w: true,
    };
    p.finish(p.x.apply_op1(op)?)
}

/// `g W` for `W` `[out, in]`: the input gradient of `x W^T` (no autograd), fused engine only.
pub(crate) fn frozen_linear_input_grad(g: &Tensor, w: &Tensor) -> Result<Tensor> {
    let op = FrozenLinear {
        w: Some(w.detach()),
        bias: None,
        transpose_w: false,
    };
    g.contiguous()?.apply_op1_no_bwd(&op)
}

/// The low-rank delta alone: `scale * (x A^T) B^T`, with `A` `[r, in]` and `B` `[out, r]`.
/// Used when dropout feeds the LoRA path a different input than the base path.
pub fn lora_delta(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    if use_fused(x, None, None, Some((a, b))) {
        lora_delta_fused(x, a, b, scale)
    } else {
        reference::lora_delta_reference(x, a, b, scale)
    }
}

/// The fused [`lora_delta`], whatever the kernel mode.
pub fn lora_delta_fused(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let p = Prepared::new(x, None, None, Some((a, b)))?;
    p.finish(p.x.apply_op3(&p.a, &p.b, LoraOp::new(None, None, scale))?)
}

/// The whole LoRA layer: `x W^T + bias + scale * (x A^T) B^T`; gradients for `x`, `A`, `B`.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if a.dtype() != x.dtype() || b.dtype() != x.dtype() {
        // f32 factors under a half-precision model: the CUDA op casts them itself (no graph
        // nodes for the casts, f32 gradients straight out); elsewhere the casts are ops.
        if mixed_supported(x, w, bias, a, b) {
            return lora_linear_fused(x, w, bias, a, b, scale);
        }
        let (a, b) = (a.to_dtype(x.dtype())?, b.to_dtype(x.dtype())?);
        return lora_linear(x, w, bias, &a, &b, scale);
    }
    if use_fused(x, Some(w), bias, Some((a, b))) {
        lora_linear_fused(x, w, bias, a, b, scale)
    } else {
        let base = reference::frozen_linear_reference(x, w, bias)?;
        base + reference::lora_delta_reference(x, a, b, scale)?
    }
}

/// The fused [`lora_linear`], whatever the kernel mode. `A` and `B` may be f32 under a bf16/f16
/// `x` on CUDA: the op then computes with copies cast to `x`'s dtype and returns f32 gradients.
pub fn lora_linear_fused(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let p = Prepared::new(x, Some(w), bias, Some((a, b)))?;
    let mut op = LoraOp::new(p.w.clone(), p.bias.clone(), scale);
    let dt = p.x.dtype();
    if p.a.dtype() != dt || p.b.dtype() != dt {
        op.cast = Some((p.a.detach().to_dtype(dt)?, p.b.detach().to_dtype(dt)?));
    }
    p.finish(p.x.apply_op3(&p.a, &p.b, op)?)
}

/// True when the fused CUDA op takes these operands with f32 `A`, `B` under a bf16/f16 `x`.
fn mixed_supported(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, a: &Tensor, b: &Tensor) -> bool {
    let dev = x.device();
    let half = matches!(x.dtype(), DType::BF16 | DType::F16);
    let factors_f32 = a.dtype() == DType::F32 && b.dtype() == DType::F32;
    let factors_here = a.device().same_device(dev) && b.device().same_device(dev);
    cfg!(feature = "cuda")
        && matches!(dev, Device::Cuda(_))
        && x.rank() > 0
        && fused_enabled()
        && half
        && factors_f32
        && factors_here
        && supported(x, Some(w), bias, None)
}

/// True when the fused op covers these operands (and the kernel mode allows it).
fn use_fused(
    x: &Tensor,
    w: Option<&Tensor>,
    bias: Option<&Tensor>,
    ab: Option<(&Tensor, &Tensor)>,
) -> bool {
    x.rank() > 0 && fused_enabled() && supported(x, w, bias, ab)
}

/// Operands checked, made contiguous and flattened to `[rows, in]`.
struct Prepared {
    x: Tensor,
    w: Option<Tensor>,
    bias: Option<Tensor>,
    a: Tensor,
    b: Tensor,
    out_shape: Vec<usize>,
}

impl Prepared {
    fn new(
        x: &Tensor,
        w: Option<&Tensor>,
        bias: Option<&Tensor>,
        ab: Option<(&Tensor, &Tensor)>,
    ) -> Result<Self> {
        let in_dim = x.dims().last().copied().unwrap_or(0);
        let dims = |t: &Tensor| format!("{:?}", t.dims());
        let mut out_dim = None;
        if let Some(w) = w {
            let (o, i) = w.dims2()?;
            if i != in_dim {
                return Err(shape_err(
                    OP,
                    format!("x {} does not fit W {}", dims(x), dims(w)),
                ));
            }
            out_dim = Some(o);
        }
        if let Some(bias) = bias {
            if Some(bias.dims()) != out_dim.as_ref().map(std::slice::from_ref) {
                return Err(shape_err(
                    OP,
                    format!("bias {} for W with {out_dim:?} rows", dims(bias)),
                ));
            }
        }
        if let Some((a, b)) = ab {
            let (r, ai) = a.dims2()?;
            let (bo, br) = b.dims2()?;
            if ai != in_dim || br != r || out_dim.is_some_and(|o| o != bo) {
                let msg = format!(
                    "x {}, A {}, B {}, out {out_dim:?}",
                    dims(x),
                    dims(a),
                    dims(b)
                );
                return Err(shape_err(OP, msg));
            }
            out_dim = Some(bo);
        }
        let Some(out_dim) = out_dim else {
            return Err(shape_err(OP, "neither a base weight nor a low-rank path"));
        };
        if x.rank() == 0 {
            return Err(shape_err(OP, "x must have at least one dimension"));
        }
        let mut out_shape = x.dims().to_vec();
        out_shape.pop();
        let rows = out_shape.iter().product::<usize>();
        out_shape.push(out_dim);
        let detached = |t: &Tensor| t.detach().contiguous();
        let (a, b) = match ab {
            Some((a, b)) => (a.contiguous()?, b.contiguous()?),
            // lora_delta/lora_linear only: frozen_linear never reads them
            None => (x.clone(), x.clone()),
        };
        // A reshape is a node of the autograd graph even when it changes nothing, and Candle's
        // backward pays a zero-filled buffer and an add for every node: skip the no-op ones.
        let x = x.contiguous()?;
        let x = if x.rank() == 2 {
            x
        } else {
            x.reshape((rows, in_dim))?
        };
        Ok(Self {
            x,
            w: w.map(detached).transpose()?,
            bias: bias.map(detached).transpose()?,
            a,
            b,
            out_shape,
        })
    }

    fn finish(&self, y: Tensor) -> Result<Tensor> {
        if y.dims() == self.out_shape.as_slice() {
            Ok(y)
        } else {
            y.reshape(self.out_shape.as_slice())
        }
    }
}

/// True when the fused op covers these operands' device and dtype.
fn supported(
    x: &Tensor,
    w: Option<&Tensor>,
    bias: Option<&Tensor>,
    ab: Option<(&Tensor, &Tensor)>,
) -> bool {
    let dt = x.dtype();
    let dtype_ok = match x.device() {
        Device::Cpu => matches!(dt, DType::F32 | DType::F64 | DType::BF16 | DType::F16),
        Device::Cuda(_) => {
            cfg!(feature = "cuda") && matches!(dt, DType::F32 | DType::BF16 | DType::F16)
        }
        Device::Metal(_) => {
            cfg!(feature = "metal") && matches!(dt, DType::F32 | DType::BF16 | DType::F16)
        }
    };
    let others = w
        .into_iter()
        .chain(bias)
        .chain(ab.map(|(a, _)| a))
        .chain(ab.map(|(_, b)| b));
    let mut same = true;
    for t in others {
        same &= t.dtype() == dt && t.device().same_device(x.device());
    }
    dtype_ok && same
}

/// `x R0 + bias` as a custom op on `x`; `R0 = W^T` in the forward, `W` for the input gradient.
struct FrozenLinear {
    w: Option<Tensor>,
    bias: Option<Tensor>,
    transpose_w: bool,
}

impl FrozenLinear {
    fn plan(&self) -> Plan<'_> {
        Plan {
            w: self.w.as_ref().map(|w| (w, self.transpose_w)),
            bias: self.bias.as_ref(),
            lowrank: None,
        }
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        CpuStorage::fwd(&self.plan(), s, l, None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        CudaStorage::fwd(&self.plan(), s, l, None)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(&self, s: &MetalStorage, l: &Layout) -> Result<(MetalStorage, Shape)> {
        MetalStorage::fwd(&self.plan(), s, l, None)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let dx = FrozenLinear {
            w: self.w.clone(),
            bias: None,
            transpose_w: !self.transpose_w,
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&dx)?))
    }
}

/// `x W^T + bias + s (x A^T) B^T` on `(x, A, B)`, or the delta alone when `w` is `None`.
struct LoraOp {
    w: Option<Tensor>,
    bias: Option<Tensor>,
    scale: f64,
    /// `P = x A^T` from the forward (`rows x r`), for `dB = s g^T P`.
    saved_p: Mutex<Option<Tensor>>,
    /// `A` and `B` cast to `x`'s dtype when the op's own `A`, `B` are f32 (see
    /// [`lora_linear_fused`]): the forward and backward compute with these.
    cast: Option<(Tensor, Tensor)>,
}

impl LoraOp {
    fn new(w: Option<Tensor>, bias: Option<Tensor>, scale: f64) -> Self {
        Self {
            w,
            bias,
            scale,
            saved_p: Mutex::new(None),
            cast: None,
        }
    }

    fn plan(&self) -> Plan<'_> {
        Plan {
            w: self.w.as_ref().map(|w| (w, true)),
            bias: self.bias.as_ref(),
            lowrank: Some((self.scale, true)),
        }
    }

    fn run<S: EngineStorage>(
        &self,
        x: (&S, &Layout),
        a: (&S, &Layout),
        b: (&S, &Layout),
    ) -> Result<(S, Shape)> {
        let (y, shape, p) = match &self.cast {
            Some((ca, cb)) => {
                let (sa, la) = ca.storage_and_layout();
                let (sb, lb) = cb.storage_and_layout();
                engine::lora_fwd(&self.plan(), x, (S::pick(&sa)?, la), (S::pick(&sb)?, lb))?
            }
            None => engine::lora_fwd(&self.plan(), x, a, b)?,
        };
        if let Ok(mut slot) = self.saved_p.lock() {
            *slot = Some(p);
        }
        Ok((y, shape))
    }
}

impl CustomOp3 for LoraOp {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((x, xl), (a, al), (b, bl))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.run((x, xl), (a, al), (b, bl))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        x: &MetalStorage,
        xl: &Layout,
        a: &MetalStorage,
        al: &Layout,
        b: &MetalStorage,
        bl: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.run((x, xl), (a, al), (b, bl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (ad, bd) = match &self.cast {
            Some((ca, cb)) => (ca.clone(), cb.clone()),
            None => (a.detach(), b.detach()),
        };
        let (xd, g) = (x.detach(), g.contiguous()?);
        let saved = self.saved_p.lock().ok().and_then(|p| p.clone());
        let p = match saved {
            Some(p) => p,
            None => xd.matmul(&ad.t()?)?,
        };
        // s folded into the r-wide factors: cheaper than scaling any full-size product
        let gbs = (g.matmul(&bd)? * self.scale)?;
        let dx = if !x.track_op() {
            None
        } else if let Some(w) = &self.w {
            Some(g.apply_op3_no_bwd(&gbs, &ad, &DxOp { w: w.clone() })?)
        } else {
            Some(gbs.matmul(&ad)?)
        };
        // (cast back to the factors' own dtype: f32 when the op computed with cast copies)
        let da = match a.track_op() {
            true => Some(gbs.t()?.matmul(&xd)?.to_dtype(a.dtype())?),
            false => None,
        };
        let db = match b.track_op() {
            true => Some(g.t()?.matmul(&(&p * self.scale)?)?.to_dtype(b.dtype())?),
            false => None,
        };
        Ok((dx, da, db))
    }
}

/// The input gradient of [`LoraOp`]: `g W + (s g B) A` on `(g, s g B, A)`, in one engine call.
struct DxOp {
    w: Tensor,
}

impl DxOp {
    fn run<S: EngineStorage>(
        &self,
        g: (&S, &Layout),
        p: (&S, &Layout),
        a: (&S, &Layout),
    ) -> Result<(S, Shape)> {
        let plan = Plan {
            w: Some((&self.w, false)),
            bias: None,
            lowrank: Some((1.0, false)),
        };
        S::fwd(&plan, g.0, g.1, Some((p.0, p.1, a.0, a.1)))
    }
}

impl CustomOp3 for DxOp {
    fn name(&self) -> &'static str {
        "lora-linear-dx"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        p: &CpuStorage,
        pl: &Layout,
        a: &CpuStorage,
        al: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((g, gl), (p, pl), (a, al))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        gl: &Layout,
        p: &CudaStorage,
        pl: &Layout,
        a: &CudaStorage,
        al: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.run((g, gl), (p, pl), (a, al))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        g: &MetalStorage,
        gl: &Layout,
        p: &MetalStorage,
        pl: &Layout,
        a: &MetalStorage,
        al: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.run((g, gl), (p, pl), (a, al))
    }
}
