//! Rotary position embedding applied to q or k.

pub mod reference;

use candle_core::{Result, Tensor};

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
    reference::rope_reference(x, cos, sin, layout)
}
