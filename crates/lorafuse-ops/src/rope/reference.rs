//! RoPE composed from stock Candle ops: the fallback and the test oracle.

use super::RopeLayout;
use crate::error::shape_err;
use candle_core::{Result, Tensor, D};

/// Rotates pairs of `x` (`[b, h, t, d]`) by `cos`/`sin` (`[t, d/2]`).
pub fn rope_reference(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    layout: RopeLayout,
) -> Result<Tensor> {
    let (_b, _h, t, d) = x.dims4()?;
    if d % 2 != 0 || cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] {
        return Err(shape_err(
            "rope",
            format!(
                "x {:?} needs cos/sin [{t}, {}], got {:?}/{:?}",
                x.dims(),
                d / 2,
                cos.dims(),
                sin.dims()
            ),
        ));
    }
    let cos = cos.to_dtype(x.dtype())?;
    let sin = sin.to_dtype(x.dtype())?;
    match layout {
        RopeLayout::HalfRotation => {
            let x1 = x.narrow(D::Minus1, 0, d / 2)?;
            let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
            let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
            let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
            Tensor::cat(&[r1, r2], D::Minus1)
        }
        RopeLayout::Interleaved => {
            let (b, h, t, d) = x.dims4()?;
            let xp = x.reshape((b, h, t, d / 2, 2))?;
            let x1 = xp.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
            let x2 = xp.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
            let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
            let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
            Tensor::stack(&[r1, r2], D::Minus1)?.reshape((b, h, t, d))
        }
    }
}
