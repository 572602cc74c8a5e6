//! The causal-LM loss over a batch, gradient accumulation, and validation loss.
//!
//! Labels are aligned with `input_ids`, so position `t` predicts `labels[t + 1]`. Only the
//! positions whose next label takes loss go through the LM head: with chat data most positions
//! are prompt, and the head (vocab x hidden) is a fifth of a small model's FLOPs per token.

use crate::data::{Batch, IGNORE_INDEX};
use crate::models::linear::Linear;
use crate::models::Llama;
use crate::{Error, Result};
use candle_core::{Tensor, Var};
use lorafuse_ops::Reduction;

/// Logits held at once by the fused LM head + loss (per chunk of rows).
const HEAD_CHUNK_BYTES: usize = 1 << 30;

/// The flat positions (`row * seq_len + t`) whose next label takes loss, and those labels.
pub fn loss_positions(batch: &Batch) -> (Vec<u32>, Vec<i64>) {
    let t = batch.seq_len;
    let mut pos = Vec::new();
    let mut targets = Vec::new();
    for r in 0..batch.batch {
        for p in 0..t.saturating_sub(1) {
            let label = batch.labels[r * t + p + 1];
            if label != IGNORE_INDEX {
                pos.push((r * t + p) as u32);
                targets.push(label);
            }
        }
    }
    (pos, targets)
}

/// The summed cross-entropy (f32 scalar) over the batch's target tokens, and their count. `None`
/// when the batch has no target token.
pub fn batch_loss_sum(model: &Llama, batch: &Batch) -> Result<Option<(Tensor, usize)>> {
    let (pos, targets) = loss_positions(batch);
    if pos.is_empty() {
        return Ok(None);
    }
    let dev = model.device();
    let (ids, _) = batch.to_tensors(dev)?;
    let hidden = model.forward_hidden_rows(&ids)?;
    let n = pos.len();
    let all = batch.batch * batch.seq_len;
    let head = model.lm_head();
    let plain_head = head
        .as_any()
        .downcast_ref::<Linear>()
        .filter(|l| l.bias.is_none());
    let loss = match plain_head {
        // Training through a frozen head on CUDA: the fused head + loss never holds the full
        // logits. When most positions take loss, every row goes in, the others with the ignore
        // label: that costs a few head rows but saves the gather and its backward (a scatter-add
        // into a zeroed copy of the hidden states).
        Some(l) if hidden.track_op() && dev.is_cuda() => {
            let (rows, targets) = if 4 * n >= 3 * all {
                let mut dense = vec![IGNORE_INDEX; all];
                for (&p, &t) in pos.iter().zip(&targets) {
                    dense[p as usize] = t;
                }
                (hidden, Tensor::from_vec(dense, all, dev)?)
            } else {
                let rows = hidden.index_select(&Tensor::from_vec(pos, n, dev)?, 0)?;
                (rows, Tensor::from_vec(targets, n, dev)?)
            };
            lorafuse_ops::linear_cross_entropy_sum(
                &rows,
                &l.weight,
                &targets,
                IGNORE_INDEX,
                HEAD_CHUNK_BYTES,
            )?
        }
        _ => {
            let rows = hidden.index_select(&Tensor::from_vec(pos, n, dev)?, 0)?;
            let targets = Tensor::from_vec(targets, n, dev)?;
            let logits = head.forward(&rows)?;
            lorafuse_ops::cross_entropy(&logits, &targets, IGNORE_INDEX, Reduction::Sum)?
        }
    };
    Ok(Some((loss.to_dtype(candle_core::DType::F32)?, n)))
}

/// Gradients and loss of one optimizer step over its micro-batches.
#[derive(Debug)]
pub struct StepGrads {
    /// One gradient per parameter, in the order given (f32).
    pub grads: Vec<Tensor>,
    /// Mean cross-entropy per target token over all micro-batches.
    pub loss: f64,
    /// Tokens that took loss.
    pub target_tokens: usize,
    /// Non-padding tokens processed.
    pub tokens: usize,
}

/// Runs forward and backward over `batches` and sums the gradients of `params`. Each micro-batch's
/// summed loss is divided by the target tokens of the whole step, so that the result equals the
/// gradient of the mean loss over one batch holding every row (micro-batches with more target
/// tokens weigh more, as they would in that batch).
pub fn accumulate_grads(model: &Llama, params: &[Var], batches: &[Batch]) -> Result<StepGrads> {
    let total: usize = batches.iter().map(Batch::target_tokens).sum();
    let tokens = batches.iter().map(|b| b.tokens).sum();
    if total == 0 {
        return Err(Error::Invalid(
            "a training step has no token with loss (every label is masked)".into(),
        ));
    }
    let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
    // Read back after the backward passes: reading a GPU scalar waits for the device, and doing
    // it between forward and backward would leave the GPU idle while the backward is queued.
    let mut sums = Vec::with_capacity(batches.len());
    for batch in batches {
        let Some((sum, _)) = batch_loss_sum(model, batch)? else {
            continue;
        };
        sums.push(sum.detach());
        let scaled = sum.affine(1.0 / total as f64, 0.0)?;
        let store = scaled.backward()?;
        for (acc, p) in grads.iter_mut().zip(params) {
            if let Some(g) = store.get(p.as_tensor()) {
                let g = g.to_dtype(candle_core::DType::F32)?;
                *acc = Some(match acc.take() {
                    Some(a) => (a + g)?,
                    None => g,
                });
            }
        }
    }
    let mut loss_sum = 0f64;
    for sum in &sums {
        loss_sum += sum.to_scalar::<f32>()? as f64;
    }
    // A parameter the graph never reached (an adapter on an unused module) gets a zero gradient.
    let grads = grads
        .into_iter()
        .zip(params)
        .map(|(g, p)| match g {
            Some(g) => Ok(g),
            None => Ok(Tensor::zeros(
                p.shape(),
                candle_core::DType::F32,
                p.device(),
            )?),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(StepGrads {
        grads,
        loss: loss_sum / total as f64,
        target_tokens: total,
        tokens,
    })
}

/// Mean cross-entropy per target token over `batches` (the caller turns dropout off).
pub fn evaluate(model: &Llama, batches: &[Batch]) -> Result<f64> {
    let mut sum = 0f64;
    let mut count = 0usize;
    for b in batches {
        if let Some((s, n)) = batch_loss_sum(model, b)? {
            sum += s.detach().to_scalar::<f32>()? as f64;
            count += n;
        }
    }
    if count == 0 {
        return Err(Error::Invalid(
            "the validation set has no token with loss".into(),
        ));
    }
    Ok(sum / count as f64)
}
