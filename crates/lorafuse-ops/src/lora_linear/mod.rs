//! LoRA linear: `y = x W^T (+ bias) + s * (x A^T) B^T` with a frozen `W`.
//!
//! The backward yields gradients for `x`, `A` and `B` only: the frozen weight never gets a
//! gradient computed (Candle's matmul backward would compute one for both operands).

pub mod reference;

use candle_core::{Result, Tensor};

/// `x W^T + bias` with `W` (`[out, in]`) frozen: only `x` gets a gradient.
pub fn frozen_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    reference::frozen_linear_reference(x, w, bias)
}

/// The low-rank delta alone: `scale * (x A^T) B^T`, with `A` `[r, in]` and `B` `[out, r]`.
/// Used when dropout feeds the LoRA path a different input than the base path.
pub fn lora_delta(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    reference::lora_delta_reference(x, a, b, scale)
}

/// The whole LoRA layer: `x W^T + bias + scale * (x A^T) B^T`; gradients for `x`, `A`, `B`.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let base = frozen_linear(x, w, bias)?;
    base + lora_delta(x, a, b, scale)?
}
