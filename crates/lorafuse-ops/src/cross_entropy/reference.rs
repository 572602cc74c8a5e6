//! Cross-entropy composed from stock Candle ops (log-softmax in f32): the fallback and the oracle.

use super::Reduction;
use crate::error::shape_err;
use candle_core::{DType, Result, Tensor, D};

/// Per-row `logsumexp(logits) - logits[target]`, masked and reduced.
pub fn cross_entropy_reference(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    reduction: Reduction,
) -> Result<Tensor> {
    let (n, _v) = logits.dims2()?;
    if targets.dims() != [n] {
        return Err(shape_err(
            "cross_entropy",
            format!(
                "logits {:?} need targets [{n}], got {:?}",
                logits.dims(),
                targets.dims()
            ),
        ));
    }
    let lf = logits.to_dtype(DType::F32)?;
    let max = lf.max_keepdim(D::Minus1)?.detach();
    let shifted = lf.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let t = targets.to_dtype(DType::I64)?;
    let valid = t.ne(ignore_index)?;
    let safe = valid.where_cond(&t, &t.zeros_like()?)?;
    let picked = shifted.gather(&safe.unsqueeze(1)?, 1)?;
    let mask = valid.to_dtype(DType::F32)?;
    let nll = (lse - picked)?.squeeze(1)?.mul(&mask)?;
    match reduction {
        Reduction::None => Ok(nll),
        Reduction::Sum => nll.sum_all(),
        Reduction::Mean => {
            let count = mask.sum_all()?.maximum(1.0)?;
            nll.sum_all()?.div(&count)
        }
    }
}
