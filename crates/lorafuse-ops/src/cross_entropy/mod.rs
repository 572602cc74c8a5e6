//! Cross-entropy over a large vocabulary with `ignore_index`.

pub mod reference;

use candle_core::{Result, Tensor};

/// How per-token losses are reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// Mean over the tokens whose target is not `ignore_index` (PyTorch's default).
    Mean,
    /// Sum over the tokens whose target is not `ignore_index`.
    Sum,
    /// One loss per row, 0 where the target is `ignore_index`.
    None,
}

/// Cross-entropy of `logits` (`[n, vocab]`) against `targets` (`[n]`, i64 or u32). Rows whose target
/// equals `ignore_index` (PyTorch: -100) contribute nothing.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    reduction: Reduction,
) -> Result<Tensor> {
    reference::cross_entropy_reference(logits, targets, ignore_index, reduction)
}
