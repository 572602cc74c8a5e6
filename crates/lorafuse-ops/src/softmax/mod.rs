//! Softmax over the last dimension.
//!
//! The fused op ([`SoftmaxOp`]) makes one pass for the row maximum, one for the sum of
//! exponentials and one to write; its backward needs only the output `y` (which Candle hands to
//! `bwd`), so nothing is kept: `dx = y * (dy - sum(dy * y))`, one fused pass ([`SoftmaxBwdOp`]).

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "metal")]
mod metal;
pub mod reference;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use crate::cpu_util::{self, Backends};

const OP: &str = "softmax";
const BACKENDS: Backends = Backends {
    metal: cfg!(feature = "metal"),
};

/// `exp(x - max) / sum(exp(x - max))` over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if cpu_util::fused_supported(x, BACKENDS) || x.elem_count() == 0 {
        softmax_fused(x)
    } else {
        reference::softmax_reference(x)
    }
}

/// The fused softmax kernel, whatever the kernel mode; errors on a backend or dtype without one.
/// Strided inputs are made contiguous first (a differentiable copy).
pub fn softmax_fused(x: &Tensor) -> Result<Tensor> {
    if x.elem_count() == 0 {
        // Nothing to launch (and Candle's max reduction rejects empty input): softmax of an
        // empty tensor is an empty tensor.
        return x.zeros_like();
    }
    x.contiguous()?.apply_op1(SoftmaxOp)
}

/// The forward CustomOp.
#[derive(Debug, Clone, Copy)]
pub struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = l.dims().last().copied().unwrap_or(1);
        Ok((cpu_util::run1(&cpu::Fwd { n }, s, l)?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::fwd(s, l)?, l.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        Ok((metal::fwd(s, l)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dx = y.apply_op2_no_bwd(&dy.contiguous()?, &SoftmaxBwdOp)?;
        Ok(Some(dx))
    }
}

/// The backward CustomOp: arguments `(y, dy)`, output `dx`.
#[derive(Debug, Clone, Copy)]
pub struct SoftmaxBwdOp;

impl CustomOp2 for SoftmaxBwdOp {
    fn name(&self) -> &'static str {
        "softmax_bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = l1.dims().last().copied().unwrap_or(1);
        let k = cpu::Bwd { n };
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
        Ok((cuda::bwd(s1, l1, s2, l2)?, l1.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        Ok((metal::bwd(s1, l1, s2, l2)?, l1.shape().clone()))
    }
}
