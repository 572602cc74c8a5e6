//! SwiGLU: `silu(gate) * up`, the Llama MLP's gated activation.

pub mod reference;

use candle_core::{Result, Tensor};

/// `silu(gate) * up`, elementwise; `gate` and `up` have the same shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    reference::swiglu_reference(gate, up)
}
