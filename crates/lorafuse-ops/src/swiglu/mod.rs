//! SwiGLU: `silu(gate) * up`, the Llama MLP's gated activation.
//!
//! The fused op ([`SwigluOp`]) is one elementwise pass; the backward ([`SwigluBwdOp`]) recomputes
//! the sigmoid from `gate` rather than keeping it, and writes both gradients in one pass:
//! with `s = sigmoid(gate)`, `dgate = dy * up * s * (1 + gate * (1 - s))` and
//! `dup = dy * gate * s`.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "metal")]
mod metal;
pub mod reference;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::cpu_util::{self, Backends};
use crate::error::shape_err;

const OP: &str = "swiglu";
const BACKENDS: Backends = Backends {
    metal: cfg!(feature = "metal"),
};

/// `silu(gate) * up`, elementwise; `gate` and `up` have the same shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if cpu_util::fused_supported(gate, BACKENDS)
        && up.dtype() == gate.dtype()
        && up.device().same_device(gate.device())
    {
        swiglu_fused(gate, up)
    } else {
        reference::swiglu_reference(gate, up)
    }
}

/// The fused SwiGLU kernel, whatever the kernel mode; errors on a backend or dtype without one.
/// Strided inputs are made contiguous first (a differentiable copy).
pub fn swiglu_fused(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        return Err(shape_err(
            OP,
            format!("gate {:?} and up {:?} differ", gate.dims(), up.dims()),
        ));
    }
    if gate.elem_count() == 0 {
        // Nothing to launch; the reference handles empty shapes.
        return reference::swiglu_reference(gate, up);
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwigluOp)
}

/// The forward CustomOp: arguments `(gate, up)`.
#[derive(Debug, Clone, Copy)]
pub struct SwigluOp;

impl CustomOp2 for SwigluOp {
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
        Ok((
            cpu_util::run2(&cpu::Fwd, s1, l1, s2, l2)?,
            l1.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::fwd(s1, l1, s2, l2)?, l1.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        Ok((metal::fwd(s1, l1, s2, l2)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = gate.apply_op3_no_bwd(up, &dy.contiguous()?, &SwigluBwdOp)?;
        let dgate = packed.get(0)?.reshape(gate.shape())?;
        let dup = packed.get(1)?.reshape(up.shape())?;
        Ok((Some(dgate), Some(dup)))
    }
}

/// The backward CustomOp: arguments `(gate, up, dy)`, output `[2, numel]` holding `dgate` then
/// `dup`.
#[derive(Debug, Clone, Copy)]
pub struct SwigluBwdOp;

impl CustomOp3 for SwigluBwdOp {
    fn name(&self) -> &'static str {
        "swiglu_bwd"
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
        let out = cpu_util::run3(&cpu::Bwd, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, Shape::from((2, l1.shape().elem_count()))))
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
        let out = cuda::bwd((s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, Shape::from((2, l1.shape().elem_count()))))
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
        let out = metal::bwd((s1, l1), (s2, l2), (s3, l3))?;
        Ok((out, Shape::from((2, l1.shape().elem_count()))))
    }
}
