//! SwiGLU composed from stock Candle ops: the fallback and the test oracle.

use candle_core::{Result, Tensor};

/// `gate * sigmoid(gate) * up`.
pub fn swiglu_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    // silu written out: candle's `silu` has a backward, but spelling it keeps the oracle obvious.
    let sig = (gate.neg()?.exp()? + 1.0)?.recip()?;
    (gate * sig)? * up
}
