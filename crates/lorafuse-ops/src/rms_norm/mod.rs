//! RMSNorm: `y = x / sqrt(mean(x^2) + eps) * w` over the last dimension, optionally after a
//! residual add.
//!
//! The fused op ([`RmsNormOp`]) normalises one row per task/block and keeps no state for the
//! backward: [`RmsNormBwdOp`] recomputes `rstd` from `x` while it forms `sum(dy * w * x)`, and
//! returns `dx` and (only when the weight tracks gradients) `dw` packed in one buffer.
//!
//! Backward, with `xhat = x * rstd` and `g = dy * w`:
//! `dx = rstd * (g - xhat * mean(g * xhat))`, `dw = sum_rows(dy * xhat)`.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "metal")]
mod metal;
pub mod reference;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::cpu_util::{self, Backends};
use crate::error::shape_err;

const OP: &str = "rms_norm";
const BACKENDS: Backends = Backends {
    metal: cfg!(feature = "metal"),
};

/// RMSNorm over the last dimension of `x` with gain `weight` (`[hidden]`).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if cpu_util::fused_supported(x, BACKENDS)
        && weight.dtype() == x.dtype()
        && weight.device().same_device(x.device())
    {
        rms_norm_fused(x, weight, eps)
    } else {
        reference::rms_norm_reference(x, weight, eps)
    }
}

/// `(x + residual, rms_norm(x + residual))`: the pre-norm transformer's residual stream and the
/// normalised input of the next block.
pub fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    // The sum must exist as a tensor anyway (it is the residual stream the caller keeps), so a
    // fused add would only save re-reading it once; not worth a second kernel family.
    let sum = (x + residual)?;
    let normed = rms_norm(&sum, weight, eps)?;
    Ok((sum, normed))
}

/// The fused RMSNorm kernel, whatever the kernel mode; errors on a backend or dtype without one.
/// Strided inputs are made contiguous first (a differentiable copy).
pub fn rms_norm_fused(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let hidden = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [hidden] {
        return Err(shape_err(
            OP,
            format!(
                "x {:?} needs weight [{hidden}], got {:?}",
                x.dims(),
                weight.dims()
            ),
        ));
    }
    if x.elem_count() == 0 {
        // Nothing to launch; the reference handles empty shapes.
        return reference::rms_norm_reference(x, weight, eps);
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNormOp { eps: eps as f32 })
}

/// The forward CustomOp: arguments `(x, weight)`.
#[derive(Debug, Clone, Copy)]
pub struct RmsNormOp {
    eps: f32,
}

impl CustomOp2 for RmsNormOp {
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
        let k = cpu::Fwd {
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
        Ok((cuda::fwd(self.eps, s1, l1, s2, l2)?, l1.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        Ok((metal::fwd(self.eps, s1, l1, s2, l2)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, n) = cpu_util::rows_cols(x)?;
        // A frozen norm weight (LoRA training) needs no column reduction at all.
        let want_dw = weight.track_op();
        let bwd = RmsNormBwdOp {
            eps: self.eps,
            want_dw,
        };
        let packed = x.apply_op3_no_bwd(weight, &dy.contiguous()?, &bwd)?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = if want_dw {
            Some(packed.narrow(0, rows, 1)?.reshape(n)?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

/// The backward CustomOp: arguments `(x, weight, dy)`, output `[rows + want_dw, n]` holding `dx`
/// row by row and then `dw`.
#[derive(Debug, Clone, Copy)]
pub struct RmsNormBwdOp {
    eps: f32,
    want_dw: bool,
}

impl RmsNormBwdOp {
    fn out_shape(&self, x: &Layout) -> Shape {
        let n = x.dims().last().copied().unwrap_or(1);
        let rows = x.shape().elem_count().checked_div(n).unwrap_or(0);
        Shape::from((rows + usize::from(self.want_dw), n))
    }
}

impl CustomOp3 for RmsNormBwdOp {
    fn name(&self) -> &'static str {
        "rms_norm_bwd"
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
        let out = cuda::bwd(self.eps, self.want_dw, (s1, l1), (s2, l2), (s3, l3))?;
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
        let out = metal::bwd(self.eps, self.want_dw, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, self.out_shape(l1)))
    }
}
