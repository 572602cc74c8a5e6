//! LayerNorm over the last dimension: `y = (x - mean) / sqrt(var + eps) * w + b` (BERT).

pub mod reference;

use candle_core::{Result, Tensor};

/// LayerNorm over the last dimension with gain `weight` and optional `bias` (`[hidden]`).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    reference::layer_norm_reference(x, weight, bias, eps)
}
