//! RMSNorm: `y = x / sqrt(mean(x^2) + eps) * w` over the last dimension, optionally after a
//! residual add.

pub mod reference;

use candle_core::{Result, Tensor};

/// RMSNorm over the last dimension of `x` with gain `weight` (`[hidden]`).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    reference::rms_norm_reference(x, weight, eps)
}

/// `(x + residual, rms_norm(x + residual))`: the pre-norm transformer's residual stream and the
/// normalised input of the next block.
pub fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let sum = (x + residual)?;
    let normed = rms_norm(&sum, weight, eps)?;
    Ok((sum, normed))
}
