//! Checkpoints: `<adapter-out>/checkpoints/step-N/` holding the adapter in PEFT's format, the
//! optimizer moments (`optimizer.safetensors`) and `trainer_state.json` (step, data position,
//! config, the log so far). Each is written into a temporary folder that is renamed into place,
//! so a crash leaves either the old checkpoint or the new one, never half of one.

use super::config::TrainConfig;
use super::log::LogRecord;
use super::optim::AdamW;
use crate::data::DataPosition;
use crate::error::{read_json, write_atomic};
use crate::lora::peft_io::{read_safetensors, safetensors_bytes};
use crate::lora::{save_peft, HasLinears};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The trainer's state file in a checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";
/// The optimizer's moments in a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The checkpoints' folder under the adapter folder.
pub const CHECKPOINTS_DIR: &str = "checkpoints";

/// Everything besides tensors that a resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Where the training batches continue (their order follows from it and `config.seed`;
    /// dropout masks follow from `config.seed` and the step).
    pub data_position: DataPosition,
    /// Non-padding tokens trained on so far.
    pub trained_tokens: usize,
    pub config: TrainConfig,
    /// The log up to this step.
    pub log: Vec<LogRecord>,
}

/// `<adapter_out>/checkpoints/step-<step>`.
pub fn checkpoint_dir(adapter_out: &Path, step: usize) -> PathBuf {
    adapter_out
        .join(CHECKPOINTS_DIR)
        .join(format!("step-{step}"))
}

/// Writes a checkpoint of adapter `adapter` into `dir` (replacing one already there).
pub fn save_checkpoint<M: HasLinears + ?Sized>(
    dir: &Path,
    model: &M,
    adapter: &str,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::Invalid(format!("checkpoint path {} has no name", dir.display())))?;
    let tmp = dir.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    save_peft(model, adapter, &tmp)?;
    let opt_path = tmp.join(OPTIMIZER_FILE);
    let tensors: BTreeMap<String, candle_core::Tensor> = opt.state_tensors().into_iter().collect();
    write_atomic(&opt_path, &safetensors_bytes(&tensors, &opt_path)?)?;
    let json = serde_json::to_vec_pretty(state)
        .map_err(|e| Error::Invalid(format!("serialising the trainer state: {e}")))?;
    write_atomic(&tmp.join(STATE_FILE), &json)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
}

/// Reads a checkpoint's `trainer_state.json`.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    if !path.exists() {
        return Err(Error::format(
            &path,
            "missing (not a checkpoint folder: expected checkpoints/step-N/ under the adapter folder)",
        ));
    }
    let state: TrainerState = read_json(&path)?;
    state
        .config
        .validate()
        .map_err(|e| Error::format(&path, e.to_string()))?;
    Ok(state)
}

/// Restores the optimizer moments from a checkpoint.
pub fn load_optimizer(dir: &Path, opt: &AdamW) -> Result<()> {
    let path = dir.join(OPTIMIZER_FILE);
    opt.load_state(read_safetensors(&path)?, &path)
}

/// The checkpoint `path` names: a checkpoint folder itself, or an adapter folder whose
/// `checkpoints/` holds `step-N` folders (the highest N is taken).
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join(STATE_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    let root = path.join(CHECKPOINTS_DIR);
    let entries = std::fs::read_dir(&root).map_err(|_| {
        Error::format(
            path,
            format!("neither a checkpoint (no {STATE_FILE}) nor an adapter folder with {CHECKPOINTS_DIR}/"),
        )
    })?;
    let mut best: Option<(usize, PathBuf)> = None;
    for e in entries {
        let e = e.map_err(|e| Error::io(&root, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(n) = name
            .strip_prefix("step-")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if e.path().join(STATE_FILE).exists() && best.as_ref().is_none_or(|(b, _)| n > *b) {
            best = Some((n, e.path()));
        }
    }
    best.map(|(_, p)| p)
        .ok_or_else(|| Error::format(&root, "holds no step-N checkpoint"))
}
