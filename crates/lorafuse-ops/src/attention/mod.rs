//! Causal scaled-dot-product attention with grouped-query heads.

pub mod reference;

use candle_core::{Result, Tensor};

/// Causal attention. `q` is `[b, hq, tq, d]`, `k`/`v` are `[b, hkv, tk, d]` with `hq % hkv == 0`
/// and `tk >= tq`: the queries are the last `tq` positions, so query `i` sees keys
/// `0..=i + tk - tq` (prefill has `tk == tq`; a cached decode step has `tq == 1`).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    reference::causal_attention_reference(q, k, v, scale)
}
