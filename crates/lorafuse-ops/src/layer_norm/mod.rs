//! LayerNorm over the last dimension: `y = (x - mean) / sqrt(var + eps) * w + b` (BERT).
//!
//! The fused forward ([`LayerNormOp`]) keeps nothing: the backward ([`LayerNormBwdOp`])
//! recomputes `mean` and `rstd` per row from `x` (two cheap reductions) and returns `dx`, and
//! `dw`/`db` only for the parameters that track gradients, packed in one buffer.
//!
//! Backward, with `xhat = (x - mean) * rstd` and `g = dy * w`:
//! `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`, `dw = sum_rows(dy * xhat)`,
//! `db = sum_rows(dy)`.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "metal")]
mod metal;
pub mod reference;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::cpu_util::{self, Backends};
use crate::error::shape_err;

const OP: &str = "layer_norm";
const BACKENDS: Backends = Backends {
    metal: cfg!(feature = "metal"),
};

/// LayerNorm over the last dimension with gain `weight` and optional `bias` (`[hidden]`).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let params_ok = |t: &Tensor| t.dtype() == x.dtype() && t.device().same_device(x.device());
    if cpu_util::fused_supported(x, BACKENDS) && params_ok(weight) && bias.is_none_or(params_ok) {
        layer_norm_fused(x, weight, bias, eps)
    } else {
        reference::layer_norm_reference(x, weight, bias, eps)
    }
}

/// The fused LayerNorm kernel, whatever the kernel mode; errors on a backend or dtype without
/// one. Strided inputs are made contiguous first (a differentiable copy).
pub fn layer_norm_fused(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let hidden = x.dim(candle_core::D::Minus1)?;
    let bad = |t: &Tensor| t.dims() != [hidden];
    if bad(weight) || bias.is_some_and(bad) {
        return Err(shape_err(
            OP,
            format!(
                "x {:?} needs weight/bias [{hidden}], got {:?}/{:?}",
                x.dims(),
                weight.dims(),
                bias.map(|b| b.dims())
            ),
        ));
    }
    if x.elem_count() == 0 {
        // Nothing to launch; the reference handles empty shapes.
        return reference::layer_norm_reference(x, weight, bias, eps);
    }
    let op = LayerNormOp { eps: eps as f32 };
    let (x, w) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op),
        None => x.apply_op2(&w, op),
    }
}

/// The forward CustomOp: `(x, weight, bias)` as a `CustomOp3`, `(x, weight)` as a `CustomOp2`.
#[derive(Debug, Clone, Copy)]
pub struct LayerNormOp {
    eps: f32,
}

impl LayerNormOp {
    fn backward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        dy: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let (rows, n) = cpu_util::rows_cols(x)?;
        // Frozen parameters skip their column reductions entirely.
        let bwd = LayerNormBwdOp {
            eps: self.eps,
            want_dw: weight.track_op(),
            want_db: bias.is_some_and(|b| b.track_op()),
        };
        let packed = x.apply_op3_no_bwd(weight, &dy.contiguous()?, &bwd)?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let mut next = rows;
        let mut take = |want: bool| -> Result<Option<Tensor>> {
            if !want {
                return Ok(None);
            }
            let t = packed.narrow(0, next, 1)?.reshape(n)?;
            next += 1;
            Ok(Some(t))
        };
        let dw = take(bwd.want_dw)?;
        let db = take(bwd.want_db)?;
        Ok((dx, dw, db))
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let k = cpu::Fwd {
            eps: f64::from(self.eps),
        };
        let out = cpu_util::run3(&k, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::fwd(self.eps, (s1, l1), (s2, l2), Some((s3, l3)))?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
        s3: &candle_core::MetalStorage,
        l3: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let out = metal::fwd(self.eps, (s1, l1), (s2, l2), Some((s3, l3)))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.backward(x, weight, Some(bias), dy)?;
        Ok((Some(dx), dw, db))
    }
}

impl CustomOp2 for LayerNormOp {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let k = cpu::FwdNoBias {
            eps: f64::from(self.eps),
        };
        Ok((cpu_util::run2(&k, s1, l1, s2, l2)?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::fwd(self.eps, (s1, l1), (s2, l2), None)?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let out = metal::fwd(self.eps, (s1, l1), (s2, l2), None)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, weight, None, dy)?;
        Ok((Some(dx), dw))
    }
}

/// The backward CustomOp: arguments `(x, weight, dy)`, output `[rows + want_dw + want_db, n]`
/// holding `dx` row by row, then `dw`, then `db`.
#[derive(Debug, Clone, Copy)]
pub struct LayerNormBwdOp {
    eps: f32,
    want_dw: bool,
    want_db: bool,
}

impl LayerNormBwdOp {
    fn out_shape(&self, x: &Layout) -> Shape {
        let (rows, n) = cpu_util::layout_rows_cols(x);
        let extra = usize::from(self.want_dw) + usize::from(self.want_db);
        Shape::from((rows + extra, n))
    }
}

impl CustomOp3 for LayerNormBwdOp {
    fn name(&self) -> &'static str {
        "layer_norm_bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let k = cpu::Bwd {
            eps: f64::from(self.eps),
            want_dw: self.want_dw,
            want_db: self.want_db,
        };
        let out = cpu_util::run3(&k, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, self.out_shape(l1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let want = (self.want_dw, self.want_db);
        let out = cuda::bwd(self.eps, want, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, self.out_shape(l1)))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
        s3: &candle_core::MetalStorage,
        l3: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let want = (self.want_dw, self.want_db);
        let out = metal::bwd(self.eps, want, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, self.out_shape(l1)))
    }
}
