//! The machine-readable training log (`train_log.jsonl`, one JSON object per line) and the
//! process's peak memory for the log lines.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The log file's name in the adapter folder.
pub const LOG_FILE: &str = "train_log.jsonl";

/// One line of the log: a training step (`loss`, `lr`, ...) or an evaluation (`val_loss`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct LogRecord {
    pub step: usize,
    /// Mean cross-entropy per target token of this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Global gradient norm before clipping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Non-padding tokens per second of this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// Non-padding tokens trained on so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained_tokens: Option<usize>,
    /// Mean validation cross-entropy per target token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

/// The log in memory (checkpoints carry it, so a resumed run's log and plot cover the whole run)
/// and, optionally, on disk.
#[derive(Debug, Clone, Default)]
pub struct TrainLog {
    pub records: Vec<LogRecord>,
    path: Option<PathBuf>,
}

impl TrainLog {
    /// A log holding `records` that appends to `dir/train_log.jsonl`, which is rewritten now with
    /// `records` (so a resumed run drops lines past its checkpoint).
    pub fn create(dir: Option<&Path>, records: Vec<LogRecord>) -> Result<Self> {
        let path = dir.map(|d| d.join(LOG_FILE));
        if let Some(p) = &path {
            let mut text = String::new();
            for r in &records {
                text.push_str(&to_line(r)?);
            }
            crate::error::write_atomic(p, text.as_bytes())?;
        }
        Ok(Self { records, path })
    }

    /// Appends a record (and its line to the file).
    pub fn push(&mut self, r: LogRecord) -> Result<()> {
        if let Some(p) = &self.path {
            let line = to_line(&r)?;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(p)
                .map_err(|e| Error::io(p, e))?;
            f.write_all(line.as_bytes()).map_err(|e| Error::io(p, e))?;
        }
        self.records.push(r);
        Ok(())
    }

    /// `(step, loss)` of every training step.
    pub fn train_points(&self) -> Vec<(usize, f64)> {
        self.records
            .iter()
            .filter_map(|r| r.loss.map(|l| (r.step, l)))
            .collect()
    }

    /// `(step, val_loss)` of every evaluation.
    pub fn val_points(&self) -> Vec<(usize, f64)> {
        self.records
            .iter()
            .filter_map(|r| r.val_loss.map(|l| (r.step, l)))
            .collect()
    }
}

fn to_line(r: &LogRecord) -> Result<String> {
    let mut s = serde_json::to_string(r)
        .map_err(|e| Error::Invalid(format!("serialising a log record: {e}")))?;
    s.push('\n');
    Ok(s)
}

/// The process's peak resident memory in bytes (`VmHWM` of `/proc/self/status`), where the
/// platform reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
