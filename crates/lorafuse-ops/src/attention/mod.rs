//! Causal scaled-dot-product attention with grouped-query heads, flash-attention style.
//!
//! The fused op never builds the `tq x tk` score matrix: the forward streams keys with an online
//! softmax and keeps one logsumexp per query row (in the op: Candle's `bwd` gets only inputs,
//! output and output gradient); the backward recomputes every probability from it. A CustomOp has
//! one output, so the backward's `dq`, `dk`, `dv` come back packed in one buffer and are split by
//! views. See `cpu.rs` and `attention.cu` for the kernels.

mod cpu;
mod cpu_blocked;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "metal")]
mod metal;
pub mod reference;

use crate::dispatch::fused_enabled;
use crate::error::shape_err;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use std::sync::Mutex;

const OP: &str = "causal_attention";

/// Largest head dimension the GPU kernels take (registers hold one row of `q` and of the output).
pub const GPU_MAX_HEAD_DIM: usize = 128;

/// Causal attention. `q` is `[b, hq, tq, d]`, `k`/`v` are `[b, hkv, tk, d]` with `hq % hkv == 0`
/// and `tk >= tq`: the queries are the last `tq` positions, so query `i` sees keys
/// `0..=i + tk - tq` (prefill has `tk == tq`; a cached decode step has `tq == 1`).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let dm = dims(q.dims(), k.dims(), v.dims(), scale)?;
    if fused_enabled() && supported(q, k, v, &dm) {
        causal_attention_fused(q, k, v, scale)
    } else {
        reference::causal_attention_reference(q, k, v, scale)
    }
}

/// The fused [`causal_attention`], whatever the kernel mode; errors on a backend, dtype or head
/// size without a kernel.
pub fn causal_attention_fused(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    dims(q.dims(), k.dims(), v.dims(), scale)?;
    let op = AttentionOp {
        scale,
        saved_lse: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// Checked sizes of a call.
fn dims(q: &[usize], k: &[usize], v: &[usize], scale: f64) -> Result<cpu::Dims> {
    match (q, k) {
        (&[b, hq, tq, d], &[kb, hkv, tk, kd])
            if kb == b && kd == d && hkv > 0 && hq % hkv == 0 && tk >= tq && v == k =>
        {
            Ok(cpu::Dims {
                b,
                hq,
                hkv,
                tq,
                tk,
                d,
                scale,
            })
        }
        _ => Err(shape_err(OP, format!("q {q:?}, k {k:?}, v {v:?}"))),
    }
}

fn supported(q: &Tensor, k: &Tensor, v: &Tensor, dm: &cpu::Dims) -> bool {
    let dt = q.dtype();
    let same = [k, v]
        .iter()
        .all(|t| t.dtype() == dt && t.device().same_device(q.device()));
    same && match q.device() {
        Device::Cpu => matches!(dt, DType::F32 | DType::F64 | DType::BF16 | DType::F16),
        Device::Cuda(_) => {
            cfg!(feature = "cuda")
                && matches!(dt, DType::F32 | DType::BF16 | DType::F16)
                && dm.d <= GPU_MAX_HEAD_DIM
                && dm.d > 0
        }
        Device::Metal(_) => {
            cfg!(feature = "metal")
                && matches!(dt, DType::F32 | DType::BF16 | DType::F16)
                && dm.d <= GPU_MAX_HEAD_DIM
                && dm.d > 0
        }
    }
}

fn layout_dims(ql: &Layout, kl: &Layout, vl: &Layout, scale: f64) -> Result<cpu::Dims> {
    dims(ql.dims(), kl.dims(), vl.dims(), scale)
}

fn dtype_err(dtype: DType) -> candle_core::Error {
    crate::OpError::DType { op: OP, dtype }.into()
}

/// The slice of `T` behind a CPU storage and layout.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    crate::cpu_util::contiguous(s.as_slice::<T>()?, l, OP)
}

/// Borrows a saved tensor's CPU storage for the duration of `f`.
fn with_cpu<R>(t: &Tensor, f: impl FnOnce(&CpuStorage, &Layout) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(s) => f(s, l),
        _ => Err(shape_err(OP, "saved tensor is not on the CPU")),
    }
}

/// Runs `$body` with `$t` bound to the element type of the float storage `$s`.
macro_rules! with_float_type {
    ($s:expr, $t:ident, $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            CpuStorage::BF16(_) => {
                type $t = half::bf16;
                $body
            }
            CpuStorage::F16(_) => {
                type $t = half::f16;
                $body
            }
            other => Err(dtype_err(other.dtype())),
        }
    };
}

struct AttentionOp {
    scale: f64,
    /// Per-row logsumexp `[b, hq, tq]` from the forward (f64 on the CPU, f32 on CUDA).
    saved_lse: Mutex<Option<Tensor>>,
}

impl AttentionOp {
    fn save(&self, lse: Tensor) {
        if let Ok(mut slot) = self.saved_lse.lock() {
            *slot = Some(lse);
        }
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = layout_dims(ql, kl, vl, self.scale)?;
        let (o, lse) = with_float_type!(qs, T, {
            let (o, lse) = cpu::fwd::<T>(slice(qs, ql)?, slice(ks, kl)?, slice(vs, vl)?, dm);
            Ok((T::to_cpu_storage_owned(o), lse))
        })?;
        self.save(Tensor::from_vec(lse, (dm.b, dm.hq, dm.tq), &Device::Cpu)?);
        Ok((o, ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dm = layout_dims(ql, kl, vl, self.scale)?;
        let (o, lse) = cuda::fwd((qs, ql), (ks, kl), (vs, vl), dm)?;
        self.save(lse);
        Ok((o, ql.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        qs: &candle_core::MetalStorage,
        ql: &Layout,
        ks: &candle_core::MetalStorage,
        kl: &Layout,
        vs: &candle_core::MetalStorage,
        vl: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let dm = layout_dims(ql, kl, vl, self.scale)?;
        let (o, lse) = metal::fwd((qs, ql), (ks, kl), (vs, vl), dm)?;
        self.save(lse);
        Ok((o, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved_lse.lock().ok().and_then(|s| s.clone());
        let lse = match saved {
            Some(lse) => lse,
            None => {
                // the forward ran elsewhere (a cloned graph): recompute its statistics
                let op = AttentionOp {
                    scale: self.scale,
                    saved_lse: Mutex::new(None),
                };
                q.apply_op3_no_bwd(k, v, &op)?;
                let lse = op.saved_lse.lock().ok().and_then(|s| s.clone());
                lse.ok_or_else(|| shape_err(OP, "forward statistics missing"))?
            }
        };
        let op = AttentionBwd {
            scale: self.scale,
            o: res.detach(),
            g: g.to_dtype(q.dtype())?.contiguous()?,
            lse,
        };
        let packed = q.apply_op3_no_bwd(k, v, &op)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = packed.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = packed.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = packed.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The backward on `(q, k, v)` with the forward's output, its gradient and the logsumexp held
/// here; returns `[dq | dk | dv]` flattened.
struct AttentionBwd {
    scale: f64,
    o: Tensor,
    g: Tensor,
    lse: Tensor,
}

impl CustomOp3 for AttentionBwd {
    fn name(&self) -> &'static str {
        "causal-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = layout_dims(ql, kl, vl, self.scale)?;
        if self.o.dims() != ql.dims() || self.g.dims() != ql.dims() {
            let msg = format!(
                "output {:?} / gradient {:?} for q {:?}",
                self.o.dims(),
                self.g.dims(),
                ql.dims()
            );
            return Err(shape_err(OP, msg));
        }
        let out = with_cpu(&self.o, |os, ol| {
            with_cpu(&self.g, |gs, gl| {
                with_cpu(&self.lse, |ls, ll| {
                    let lse = slice::<f64>(ls, ll)?;
                    with_float_type!(qs, T, {
                        let (q, k, v) = (
                            slice::<T>(qs, ql)?,
                            slice::<T>(ks, kl)?,
                            slice::<T>(vs, vl)?,
                        );
                        let packed =
                            cpu::bwd::<T>(q, k, v, slice(os, ol)?, slice(gs, gl)?, lse, dm);
                        Ok(T::to_cpu_storage_owned(packed))
                    })
                })
            })
        })?;
        let n = ql.shape().elem_count() + 2 * kl.shape().elem_count();
        Ok((out, Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &Layout,
        ks: &candle_core::CudaStorage,
        kl: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dm = layout_dims(ql, kl, vl, self.scale)?;
        let out = cuda::bwd(
            (qs, ql),
            (ks, kl),
            (vs, vl),
            &self.o,
            &self.g,
            &self.lse,
            dm,
        )?;
        let n = ql.shape().elem_count() + 2 * kl.shape().elem_count();
        Ok((out, Shape::from(n)))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        qs: &candle_core::MetalStorage,
        ql: &Layout,
        ks: &candle_core::MetalStorage,
        kl: &Layout,
        vs: &candle_core::MetalStorage,
        vl: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let dm = layout_dims(ql, kl, vl, self.scale)?;
        let (o, g, lse) = (&self.o, &self.g, &self.lse);
        let out = metal::bwd((qs, ql), (ks, kl), (vs, vl), o, g, lse, dm)?;
        let n = ql.shape().elem_count() + 2 * kl.shape().elem_count();
        Ok((out, Shape::from(n)))
    }
}
