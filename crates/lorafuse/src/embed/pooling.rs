//! Token states to one sentence vector, as sentence-transformers' `Pooling` and `Normalize`
//! modules compute it (accumulation in f32 for half-precision states).

use crate::error::read_json;
use crate::{Error, Result};
use candle_core::{DType, Tensor, D};
use std::path::Path;

/// One pooling strategy. Several may be active: their vectors are concatenated in the order
/// sentence-transformers uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    /// The first token's state (`[CLS]`).
    Cls,
    /// Element-wise maximum over the real tokens.
    Max,
    /// Mean over the real tokens.
    Mean,
    /// Sum over the real tokens divided by the square root of their count.
    MeanSqrtLen,
    /// Mean weighted by position (1, 2, ...).
    WeightedMean,
    /// The last real token's state.
    LastToken,
}

/// The legacy boolean keys of `1_Pooling/config.json`, in sentence-transformers' concatenation
/// order.
const LEGACY_KEYS: [(&str, PoolingMode); 6] = [
    ("pooling_mode_cls_token", PoolingMode::Cls),
    ("pooling_mode_max_tokens", PoolingMode::Max),
    ("pooling_mode_mean_tokens", PoolingMode::Mean),
    (
        "pooling_mode_mean_sqrt_len_tokens",
        PoolingMode::MeanSqrtLen,
    ),
    (
        "pooling_mode_weightedmean_tokens",
        PoolingMode::WeightedMean,
    ),
    ("pooling_mode_lasttoken", PoolingMode::LastToken),
];

/// The mode names sentence-transformers writes, for error messages.
const NAMES: [&str; 6] = [
    "cls",
    "max",
    "mean",
    "mean_sqrt_len_tokens",
    "weightedmean",
    "lasttoken",
];

impl PoolingMode {
    /// Parses sentence-transformers' mode names (`cls`, `max`, `mean`, `mean_sqrt_len_tokens`,
    /// `weightedmean`, `lasttoken`).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "cls" => PoolingMode::Cls,
            "max" => PoolingMode::Max,
            "mean" => PoolingMode::Mean,
            "mean_sqrt_len_tokens" => PoolingMode::MeanSqrtLen,
            "weightedmean" => PoolingMode::WeightedMean,
            "lasttoken" => PoolingMode::LastToken,
            _ => return None,
        })
    }

    /// Reads the modes of a Pooling module's `config.json`: the newer `pooling_mode` (a name or a
    /// list) or the legacy `pooling_mode_*` booleans. No mode set means mean, as in
    /// sentence-transformers.
    pub fn from_config_file(path: &Path) -> Result<Vec<Self>> {
        let v: serde_json::Value = read_json(path)?;
        Self::from_config_value(&v, path)
    }

    /// As [`PoolingMode::from_config_file`], from a parsed value; `path` names it in errors.
    pub fn from_config_value(v: &serde_json::Value, path: &Path) -> Result<Vec<Self>> {
        let parse = |name: &str| {
            Self::from_name(name).ok_or_else(|| {
                Error::key(
                    path,
                    "pooling_mode",
                    format!("unknown mode `{name}` (one of {})", NAMES.join(", ")),
                )
            })
        };
        let modes = match v.get("pooling_mode") {
            Some(serde_json::Value::String(s)) => vec![parse(s)?],
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .map(|m| {
                    m.as_str()
                        .ok_or_else(|| {
                            Error::key(path, "pooling_mode", "expected a list of strings")
                        })
                        .and_then(parse)
                })
                .collect::<Result<Vec<_>>>()?,
            Some(_) => {
                return Err(Error::key(
                    path,
                    "pooling_mode",
                    "expected a string or a list",
                ))
            }
            None => LEGACY_KEYS
                .iter()
                .filter(|(key, _)| v.get(*key).and_then(|b| b.as_bool()).unwrap_or(false))
                .map(|(_, mode)| *mode)
                .collect(),
        };
        Ok(if modes.is_empty() {
            vec![PoolingMode::Mean]
        } else {
            modes
        })
    }
}

/// Pools `hidden [b, t, h]` under `mask [b, t]` (1 real, 0 padding; right-padded) into
/// `[b, h * modes.len()]` f32 vectors.
pub fn pool(hidden: &Tensor, mask: &Tensor, modes: &[PoolingMode]) -> candle_core::Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    if modes.is_empty() {
        candle_core::bail!("pool: no pooling mode given");
    }
    let x = hidden.to_dtype(DType::F32)?;
    let m = mask.to_dtype(DType::F32)?;
    let m3 = m.unsqueeze(2)?;
    let count = m.sum_keepdim(1)?; // [b, 1]
    let mut parts = Vec::with_capacity(modes.len());
    for mode in modes {
        let v = match mode {
            PoolingMode::Cls => x.narrow(1, 0, 1)?.squeeze(1)?,
            PoolingMode::Max => {
                // Padding gets f32::MIN added so that it never wins the maximum.
                let neg = ((1.0 - &m3)? * f64::from(f32::MIN))?;
                x.broadcast_add(&neg)?.max(1)?
            }
            PoolingMode::Mean => x
                .broadcast_mul(&m3)?
                .sum(1)?
                .broadcast_div(&count.maximum(1e-9)?)?,
            PoolingMode::MeanSqrtLen => x
                .broadcast_mul(&m3)?
                .sum(1)?
                .broadcast_div(&count.maximum(1e-9)?.sqrt()?)?,
            PoolingMode::WeightedMean => {
                let pos = Tensor::arange(1f32, t as f32 + 1.0, x.device())?.reshape((1, t))?;
                let w = m.broadcast_mul(&pos)?;
                let denom = w.sum_keepdim(1)?.maximum(1e-9)?;
                x.broadcast_mul(&w.unsqueeze(2)?)?
                    .sum(1)?
                    .broadcast_div(&denom)?
            }
            PoolingMode::LastToken => {
                let lens = m.sum(1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let rows = lens
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| {
                        let pos = (n as usize).clamp(1, t) - 1;
                        x.narrow(0, i, 1)?.narrow(1, pos, 1)?.reshape((1, h))
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)?
            }
        };
        parts.push(v);
    }
    let out = Tensor::cat(&parts, 1)?;
    debug_assert_eq!(out.dims(), &[b, h * modes.len()]);
    Ok(out)
}

/// `x / max(||x||_2, 1e-12)` per row, as `torch.nn.functional.normalize`.
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    x.broadcast_div(&norm)
}
