//! Softmax over the last dimension.

pub mod reference;

use candle_core::{Result, Tensor};

/// `exp(x - max) / sum(exp(x - max))` over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    reference::softmax_reference(x)
}
