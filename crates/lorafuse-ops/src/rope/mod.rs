//! Rotary position embedding applied to q or k.
//!
//! The fused op ([`RopeOp`]) rotates each pair once, reading `cos`/`sin` per position. Its
//! backward is the same rotation by the opposite angle (`sin` negated), so `bwd` runs the same
//! kernel on `dy` with `inverse` set; `cos` and `sin` are tables, not parameters, and get no
//! gradient.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "metal")]
mod metal;
pub mod reference;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::cpu_util::{self, Backends};
use crate::error::shape_err;

const OP: &str = "rope";
const BACKENDS: Backends = Backends {
    metal: cfg!(feature = "metal"),
};

/// How the rotated pairs are laid out in the head dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs `(i, i + d/2)`: Hugging Face Llama, Qwen2, Mistral ("rotate_half").
    HalfRotation,
    /// Pairs `(2i, 2i + 1)`: the original RoPE / GPT-J layout.
    Interleaved,
}

/// Rotates `x` (`[batch, heads, seq, head_dim]`) by the angles whose cosines and sines are `cos`
/// and `sin` (`[seq, head_dim / 2]`).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, layout: RopeLayout) -> Result<Tensor> {
    if cpu_util::fused_supported(x, BACKENDS)
        && x.rank() == 4
        && cos.device().same_device(x.device())
        && sin.device().same_device(x.device())
    {
        rope_fused(x, cos, sin, layout)
    } else {
        reference::rope_reference(x, cos, sin, layout)
    }
}

/// The fused RoPE kernel, whatever the kernel mode; errors on a backend or dtype without one.
/// `cos`/`sin` are cast to `x`'s dtype (as the reference does) and strided inputs made contiguous.
pub fn rope_fused(x: &Tensor, cos: &Tensor, sin: &Tensor, layout: RopeLayout) -> Result<Tensor> {
    let (_b, _h, t, d) = x.dims4()?;
    if d % 2 != 0 || cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] {
        return Err(shape_err(
            OP,
            format!(
                "x {:?} needs cos/sin [{t}, {}], got {:?}/{:?}",
                x.dims(),
                d / 2,
                cos.dims(),
                sin.dims()
            ),
        ));
    }
    if x.elem_count() == 0 {
        // Nothing to launch; the reference handles empty shapes.
        return reference::rope_reference(x, cos, sin, layout);
    }
    // The tables are constants: detached, so autograd never walks into them.
    let cos = cos.detach().to_dtype(x.dtype())?.contiguous()?;
    let sin = sin.detach().to_dtype(x.dtype())?.contiguous()?;
    let op = RopeOp {
        layout,
        inverse: false,
    };
    x.contiguous()?.apply_op3(&cos, &sin, op)
}

/// The CustomOp: arguments `(x, cos, sin)`; `inverse` rotates by the opposite angle.
#[derive(Debug, Clone, Copy)]
pub struct RopeOp {
    layout: RopeLayout,
    inverse: bool,
}

impl RopeOp {
    fn dims(x: &Layout) -> Result<(usize, usize)> {
        match x.dims() {
            [_, _, t, d] => Ok((*t, *d)),
            dims => Err(shape_err(
                OP,
                format!("x must be [b, h, t, d], got {dims:?}"),
            )),
        }
    }
}

impl CustomOp3 for RopeOp {
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
        let (t, d) = Self::dims(l1)?;
        let k = cpu::Rotate {
            t,
            d,
            interleaved: self.layout == RopeLayout::Interleaved,
            inverse: self.inverse,
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
        let (t, d) = Self::dims(l1)?;
        let interleaved = self.layout == RopeLayout::Interleaved;
        let out = cuda::rotate(
            (t, d),
            interleaved,
            self.inverse,
            (s1, l1),
            (s2, l2),
            (s3, l3),
        )?;
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
        let (t, d) = Self::dims(l1)?;
        let interleaved = self.layout == RopeLayout::Interleaved;
        let out = metal::rotate(
            (t, d),
            interleaved,
            self.inverse,
            (s1, l1),
            (s2, l2),
            (s3, l3),
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = RopeOp {
            layout: self.layout,
            inverse: !self.inverse,
        };
        let dx = dy.contiguous()?.apply_op3_no_bwd(cos, sin, &op)?;
        Ok((Some(dx), None, None))
    }
}
