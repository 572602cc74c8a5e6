//! Batches: right padding or packing, in a seeded order that a checkpoint can resume.
//!
//! Order: every epoch visits the examples in a fresh permutation drawn from `(seed, epoch)`, so a
//! position `(epoch, index)` (the examples consumed in that epoch) fixes everything that follows.
//! The last batch of an epoch may have fewer rows; nothing is dropped.
//!
//! Packing puts whole examples end to end in a row until the next would pass `max_seq_len`. The
//! examples share causal attention within a row (as mlx-lm and TRL's plain packing do); the first
//! token of every example after the first in a row is given no label, so that no loss is taken
//! on predicting one example's start from the previous example.

use super::{Example, IGNORE_INDEX};
use crate::lora::rng::{derive_seed, SplitMix64};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::sync::Arc;

/// A batch as plain vectors, row-major `[batch, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub batch: usize,
    pub seq_len: usize,
    /// Tokens that are not padding.
    pub tokens: usize,
}

impl Batch {
    /// `(input_ids u32 [b, t], labels i64 [b, t])` on `device`.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let ids = Tensor::from_slice(&self.input_ids, (self.batch, self.seq_len), device)?;
        let labels = Tensor::from_slice(&self.labels, (self.batch, self.seq_len), device)?;
        Ok((ids, labels))
    }

    /// Positions whose label takes loss after the shift (labels `1..t` of every row).
    pub fn target_tokens(&self) -> usize {
        self.labels
            .chunks(self.seq_len.max(1))
            .map(|row| row.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count())
            .sum()
    }
}

/// Right-pads `rows` to the longest: pad id in `input_ids`, [`IGNORE_INDEX`] in `labels`.
pub fn pad_batch(rows: &[&Example], pad_id: u32) -> Batch {
    let seq_len = rows.iter().map(|r| r.input_ids.len()).max().unwrap_or(0);
    let mut input_ids = Vec::with_capacity(rows.len() * seq_len);
    let mut labels = Vec::with_capacity(rows.len() * seq_len);
    let mut tokens = 0;
    for r in rows {
        let n = r.input_ids.len();
        tokens += n;
        input_ids.extend_from_slice(&r.input_ids);
        input_ids.extend(std::iter::repeat_n(pad_id, seq_len - n));
        labels.extend_from_slice(&r.labels);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, seq_len - n));
    }
    Batch {
        input_ids,
        labels,
        batch: rows.len(),
        seq_len,
        tokens,
    }
}

/// How batches are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Rows per batch.
    pub batch_size: usize,
    /// Row length cap for packing (examples are already truncated to it when loaded).
    pub max_seq_len: usize,
    /// Pack several examples per row instead of one padded example per row.
    pub packing: bool,
    pub pad_id: u32,
    /// Seeds the per-epoch permutations.
    pub seed: u64,
}

/// Where a [`BatchIter`] stands: the epoch and the examples consumed in it. Saved in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub index: usize,
}

/// An endless, seeded stream of training batches.
#[derive(Debug, Clone)]
pub struct BatchIter {
    examples: Arc<[Example]>,
    cfg: BatchConfig,
    pos: DataPosition,
    perm: Vec<usize>,
}

impl BatchIter {
    /// Starts at epoch 0. Errors on an empty set or a zero batch size.
    pub fn new(examples: impl Into<Arc<[Example]>>, cfg: BatchConfig) -> Result<Self> {
        Self::resume(examples, cfg, DataPosition::default())
    }

    /// Continues from `pos` (from [`BatchIter::position`]): yields exactly what the original
    /// iterator would have yielded next.
    pub fn resume(
        examples: impl Into<Arc<[Example]>>,
        cfg: BatchConfig,
        pos: DataPosition,
    ) -> Result<Self> {
        let examples = examples.into();
        if examples.is_empty() || cfg.batch_size == 0 {
            return Err(Error::Invalid(format!(
                "batching needs at least one example and batch_size >= 1 (got {} examples, batch_size {})",
                examples.len(),
                cfg.batch_size
            )));
        }
        if pos.index > examples.len() {
            return Err(Error::Invalid(format!(
                "data position {pos:?} is past the {} examples of the training set",
                examples.len()
            )));
        }
        if cfg.packing {
            if let Some(e) = examples
                .iter()
                .find(|e| e.input_ids.len() > cfg.max_seq_len)
            {
                return Err(Error::Invalid(format!(
                    "an example of {} tokens exceeds max_seq_len {}: load the data with the same max_seq_len",
                    e.input_ids.len(),
                    cfg.max_seq_len
                )));
            }
        }
        let perm = permutation(examples.len(), cfg.seed, pos.epoch);
        Ok(Self {
            examples,
            cfg,
            pos,
            perm,
        })
    }

    /// The position to save: resuming from it continues with the next batch.
    pub fn position(&self) -> DataPosition {
        self.pos
    }

    /// Examples per epoch.
    pub fn len_examples(&self) -> usize {
        self.examples.len()
    }

    /// The next batch (never ends: epochs follow one another).
    pub fn next_batch(&mut self) -> Batch {
        if self.pos.index >= self.perm.len() {
            self.pos = DataPosition {
                epoch: self.pos.epoch + 1,
                index: 0,
            };
            self.perm = permutation(self.examples.len(), self.cfg.seed, self.pos.epoch);
        }
        if self.cfg.packing {
            self.next_packed()
        } else {
            let end = (self.pos.index + self.cfg.batch_size).min(self.perm.len());
            let rows: Vec<&Example> = self.perm[self.pos.index..end]
                .iter()
                .map(|&i| &self.examples[i])
                .collect();
            self.pos.index = end;
            pad_batch(&rows, self.cfg.pad_id)
        }
    }

    fn next_packed(&mut self) -> Batch {
        let mut rows: Vec<Example> = Vec::new();
        let mut cur = Example {
            input_ids: Vec::new(),
            labels: Vec::new(),
        };
        while self.pos.index < self.perm.len() {
            let ex = &self.examples[self.perm[self.pos.index]];
            if !cur.input_ids.is_empty()
                && cur.input_ids.len() + ex.input_ids.len() > self.cfg.max_seq_len
            {
                if rows.len() + 1 == self.cfg.batch_size {
                    break;
                }
                rows.push(std::mem::replace(
                    &mut cur,
                    Example {
                        input_ids: Vec::new(),
                        labels: Vec::new(),
                    },
                ));
            }
            let first = cur.input_ids.is_empty();
            cur.input_ids.extend_from_slice(&ex.input_ids);
            let start = cur.labels.len();
            cur.labels.extend_from_slice(&ex.labels);
            if !first {
                cur.labels[start] = IGNORE_INDEX;
            }
            self.pos.index += 1;
        }
        rows.push(cur);
        let refs: Vec<&Example> = rows.iter().collect();
        pad_batch(&refs, self.cfg.pad_id)
    }
}

impl Iterator for BatchIter {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        Some(self.next_batch())
    }
}

/// The permutation of epoch `epoch`.
fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    SplitMix64::new(derive_seed(seed, &format!("epoch {epoch}"))).shuffle(&mut perm);
    perm
}

/// Batches over `examples` in file order (for validation): every example once, the last batch
/// possibly smaller, padded.
pub fn batches_in_order(examples: &[Example], batch_size: usize, pad_id: u32) -> Vec<Batch> {
    examples
        .chunks(batch_size.max(1))
        .map(|c| pad_batch(&c.iter().collect::<Vec<_>>(), pad_id))
        .collect()
}
