//! Perplexity scoring the way transformers computes `model(input_ids, labels=input_ids).loss`:
//! the tokenizer's own special tokens only (no BOS added unless the tokenizer adds one), each
//! position predicting the next, mean negative log-likelihood per record.

use crate::models::Llama;
use crate::tokenizer::TextTokenizer;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use lorafuse_ops::Reduction;
use serde::Serialize;
use std::path::Path;

/// One record's score. A record of fewer than two tokens predicts nothing: `tokens == 0` and
/// `mean_nll` is `None`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RecordScore {
    pub tokens: usize,
    pub mean_nll: Option<f64>,
    pub ppl: Option<f64>,
}

/// Scores of every record and the token-weighted overall mean.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PerplexityReport {
    pub records: Vec<RecordScore>,
    pub mean_nll: Option<f64>,
    pub ppl: Option<f64>,
}

/// Sum of the next-token NLL over `ids` and the number of predicted tokens.
pub fn sum_nll(model: &Llama, ids: &[u32]) -> Result<(f64, usize)> {
    if ids.len() < 2 {
        return Ok((0.0, 0));
    }
    let context = model.config().max_position_embeddings;
    if ids.len() > context {
        return Err(Error::ContextOverflow {
            tokens: ids.len(),
            context,
        });
    }
    let n = ids.len() - 1;
    let input = Tensor::new(&ids[..n], model.device())?.unsqueeze(0)?;
    let logits = model.forward(&input, None)?.squeeze(0)?;
    let targets = Tensor::new(&ids[1..], model.device())?.to_dtype(DType::I64)?;
    let sum = lorafuse_ops::cross_entropy(&logits, &targets, -100, Reduction::Sum)?;
    Ok((sum.to_dtype(DType::F64)?.to_scalar::<f64>()?, n))
}

/// Scores a single text.
pub fn score_text(model: &Llama, tok: &TextTokenizer, text: &str) -> Result<RecordScore> {
    let ids = tok.encode(text, true)?;
    let (sum, n) = sum_nll(model, &ids)?;
    Ok(record(sum, n))
}

fn record(sum: f64, n: usize) -> RecordScore {
    let mean = (n > 0).then(|| sum / n as f64);
    RecordScore {
        tokens: n,
        mean_nll: mean,
        ppl: mean.map(f64::exp),
    }
}

/// Reads `{"text": ...}` records from a JSONL file; a malformed line is an error naming the file
/// and the line. Blank lines are skipped.
pub fn read_text_records(path: &Path) -> Result<Vec<String>> {
    let content = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_err = |msg: String| Error::Line {
            path: path.to_path_buf(),
            line: i + 1,
            msg,
        };
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| line_err(format!("invalid JSON: {e}")))?;
        let text = v
            .get("text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| line_err("expected an object with a string field \"text\"".into()))?;
        out.push(text.to_string());
    }
    if out.is_empty() {
        return Err(Error::format(path, "no records"));
    }
    Ok(out)
}

/// Scores every text; the overall mean weights records by their token counts.
pub fn score_texts(
    model: &Llama,
    tok: &TextTokenizer,
    texts: &[String],
) -> Result<PerplexityReport> {
    let mut records = Vec::with_capacity(texts.len());
    let (mut total, mut count) = (0.0, 0usize);
    for text in texts {
        let ids = tok.encode(text, true)?;
        let (sum, n) = sum_nll(model, &ids)?;
        total += sum;
        count += n;
        records.push(record(sum, n));
    }
    let overall = record(total, count);
    Ok(PerplexityReport {
        records,
        mean_nll: overall.mean_nll,
        ppl: overall.ppl,
    })
}
