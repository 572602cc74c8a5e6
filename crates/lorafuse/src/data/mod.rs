//! Training data: JSONL files in mlx-lm's three formats (see [`format`]) turned into token ids and
//! labels, then batched with right padding or packing by a seeded, resumable iterator
//! ([`batch::BatchIter`]).
//!
//! Labels are aligned with `input_ids` (Hugging Face's convention): the loss compares the logits at
//! position `t` with `labels[t + 1]`, and [`IGNORE_INDEX`] marks tokens that take no loss.

pub mod batch;
pub mod format;

pub use batch::{pad_batch, Batch, BatchConfig, BatchIter, DataPosition};
pub use format::LineFormat;

use crate::tokenizer::TextTokenizer;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The label of a token that takes no loss (PyTorch's `ignore_index` default).
pub const IGNORE_INDEX: i64 = -100;

/// One tokenised training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// The token id where the token takes loss, [`IGNORE_INDEX`] elsewhere; same length as `input_ids`.
    pub labels: Vec<i64>,
}

impl Example {
    /// Tokens that take loss.
    pub fn target_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// How lines become examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOptions {
    /// Longer examples are cut to their first `max_seq_len` tokens (mlx-lm's default is 2048).
    pub max_seq_len: usize,
}

impl Default for DataOptions {
    fn default() -> Self {
        Self { max_seq_len: 2048 }
    }
}

/// The examples of one JSONL file.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub format: LineFormat,
    pub examples: Vec<Example>,
    /// Examples cut to `max_seq_len`.
    pub truncated: usize,
    /// Examples dropped because truncation left no token with loss (they would make a 0/0 loss).
    pub skipped: usize,
}

impl Dataset {
    /// Tokens over all examples.
    pub fn tokens(&self) -> usize {
        self.examples.iter().map(|e| e.input_ids.len()).sum()
    }
}

/// Reads and tokenises a JSONL file. Blank lines are skipped; every line must use the format of
/// the first one. A malformed line, an unknown or mixed format and an empty file are
/// [`Error::Line`]s naming the file and the 1-based line.
pub fn load_jsonl(path: &Path, tok: &TextTokenizer, opts: &DataOptions) -> Result<Dataset> {
    if opts.max_seq_len < 2 {
        return Err(Error::Invalid(format!(
            "max_seq_len {} is too small (a loss needs at least 2 tokens)",
            opts.max_seq_len
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let line_err = |line: usize, msg: String| Error::Line {
        path: path.to_path_buf(),
        line,
        msg,
    };
    let mut format: Option<(LineFormat, usize)> = None;
    let mut ds = Dataset {
        path: path.to_path_buf(),
        format: LineFormat::Text,
        examples: Vec::new(),
        truncated: 0,
        skipped: 0,
    };
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| line_err(n, format!("invalid JSON: {e}")))?;
        let f = LineFormat::detect(&v).map_err(|m| line_err(n, m))?;
        match format {
            None => format = Some((f, n)),
            Some((first, at)) if first != f => {
                return Err(line_err(
                    n,
                    format!(
                        "format `{}` differs from line {at}'s `{}`",
                        f.name(),
                        first.name()
                    ),
                ))
            }
            _ => {}
        }
        let mut ex = format::encode_line(&v, f, tok).map_err(|m| line_err(n, m))?;
        if ex.input_ids.len() > opts.max_seq_len {
            ex.input_ids.truncate(opts.max_seq_len);
            ex.labels.truncate(opts.max_seq_len);
            ds.truncated += 1;
        }
        // Position 0 never takes loss (nothing predicts it), so it does not count.
        if ex.labels.iter().skip(1).all(|&l| l == IGNORE_INDEX) {
            ds.skipped += 1;
            tracing::warn!(
                "{}:{n}: no token with loss within max_seq_len; skipped",
                path.display()
            );
            continue;
        }
        ds.examples.push(ex);
    }
    match format {
        None => Err(line_err(1, "the file holds no examples".into())),
        Some(_) if ds.examples.is_empty() => Err(line_err(
            1,
            format!(
                "every example was skipped: none has a token with loss within max_seq_len {}",
                opts.max_seq_len
            ),
        )),
        Some((f, _)) => {
            ds.format = f;
            if ds.truncated > 0 {
                tracing::warn!(
                    "{}: {} examples longer than {} tokens were truncated",
                    path.display(),
                    ds.truncated,
                    opts.max_seq_len
                );
            }
            Ok(ds)
        }
    }
}

/// A data folder: `train.jsonl` and, if present, `valid.jsonl` (`test.jsonl` is left alone).
#[derive(Debug, Clone)]
pub struct DataSplits {
    pub train: Dataset,
    pub valid: Option<Dataset>,
}

/// Loads `dir/train.jsonl` and `dir/valid.jsonl` (optional).
pub fn load_dir(dir: &Path, tok: &TextTokenizer, opts: &DataOptions) -> Result<DataSplits> {
    let train_path = dir.join("train.jsonl");
    if !train_path.exists() {
        return Err(Error::format(
            &train_path,
            "missing (a data folder needs train.jsonl)",
        ));
    }
    let train = load_jsonl(&train_path, tok, opts)?;
    let valid_path = dir.join("valid.jsonl");
    let valid = if valid_path.exists() {
        Some(load_jsonl(&valid_path, tok, opts)?)
    } else {
        None
    };
    Ok(DataSplits { train, valid })
}

/// The id padding uses: the tokenizer's padding id, else the first EOS id, else 0. Pads never
/// take loss, so the choice only matters for what the model sees after the sequence ends.
pub fn pad_id(tok: &TextTokenizer) -> u32 {
    tok.inner
        .get_padding()
        .map(|p| p.pad_id)
        .or_else(|| tok.eos_ids.first().copied())
        .unwrap_or(0)
}
