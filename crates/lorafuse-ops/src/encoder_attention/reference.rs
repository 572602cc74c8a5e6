//! The composition of stock Candle ops that the fused encoder attention replaces (and falls back
//! to): split heads, scores, mask, softmax, weighted values, merge heads.

use candle_core::{Result, Tensor};

/// [`super::encoder_attention`] from stock ops (differentiable, any device and dtype).
pub fn encoder_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, h) = q.dims3()?;
    let d = h / heads;
    let split = |y: &Tensor| y.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous();
    // Scaling q (b*t*h values) is cheaper than scaling the scores (b*heads*t*t).
    let q = (split(q)? * scale)?;
    let scores = q.matmul(&split(k)?.t()?)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.reshape((b, 1, 1, t))?.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    let probs = crate::softmax_last_dim(&scores)?;
    probs
        .matmul(&split(v)?)?
        .transpose(1, 2)?
        .reshape((b, t, h))
}
