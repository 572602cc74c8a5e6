//! Softmax composed from stock Candle ops (differentiable): the fallback and the test oracle.

use candle_core::{Result, Tensor, D};

/// Numerically stable softmax over the last dimension.
pub fn softmax_reference(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}
