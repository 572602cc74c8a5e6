//! Reading a sentence-transformers model folder: which modules it chains (`modules.json`), where
//! the transformer lives, its pooling, whether it normalises, and the BERT weights themselves.

use super::pooling::PoolingMode;
use crate::error::read_json;
use crate::models::bert::{BertConfig, BertModel};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What a sentence-transformers folder says about how to turn token states into a sentence vector.
#[derive(Debug, Clone, PartialEq)]
pub struct StFolder {
    /// The folder holding `config.json`, the weights and `tokenizer.json` (the Transformer
    /// module's path, usually the root itself).
    pub transformer_dir: PathBuf,
    /// Pooling modes, concatenated in this order.
    pub pooling: Vec<PoolingMode>,
    /// A Normalize module follows the pooling.
    pub normalize: bool,
    /// `max_seq_length` of `sentence_bert_config.json`, if given.
    pub max_seq_length: Option<usize>,
    /// Inputs are lowercased before tokenisation (`do_lower_case`).
    pub do_lower_case: bool,
}

#[derive(Deserialize)]
struct ModuleEntry {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize, Default)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

impl StFolder {
    /// Reads `modules.json`, the Pooling module's `config.json` and `sentence_bert_config.json`
    /// under `dir`. A folder without `modules.json` is taken as a plain Hugging Face encoder with
    /// mean pooling, as sentence-transformers does; a missing pooling config falls back to mean
    /// pooling with a warning. Modules other than Transformer, Pooling and Normalize are refused.
    pub fn read(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::format(dir, "not a model folder"));
        }
        let modules_path = dir.join("modules.json");
        let mut transformer_dir = dir.to_path_buf();
        let mut pooling_path = None;
        let mut normalize = false;
        if modules_path.exists() {
            let modules: Vec<ModuleEntry> = read_json(&modules_path)?;
            for m in &modules {
                // Class paths moved between sentence-transformers versions; the class name did not.
                match m.kind.rsplit('.').next().unwrap_or(&m.kind) {
                    "Transformer" => transformer_dir = dir.join(&m.path),
                    "Pooling" => pooling_path = Some(dir.join(&m.path).join("config.json")),
                    "Normalize" => normalize = true,
                    _ => {
                        return Err(Error::key(
                            &modules_path,
                            "type",
                            format!(
                                "module `{}` is not supported (supported: Transformer, Pooling, Normalize)",
                                m.kind
                            ),
                        ))
                    }
                }
            }
        } else {
            tracing::warn!(
                "{}: missing; treating {} as a plain encoder with mean pooling",
                modules_path.display(),
                dir.display()
            );
        }
        let pooling = match pooling_path {
            Some(p) if p.exists() => PoolingMode::from_config_file(&p)?,
            Some(p) => {
                tracing::warn!("{}: missing; falling back to mean pooling", p.display());
                vec![PoolingMode::Mean]
            }
            None => {
                if modules_path.exists() {
                    tracing::warn!(
                        "{}: no Pooling module; falling back to mean pooling",
                        modules_path.display()
                    );
                }
                vec![PoolingMode::Mean]
            }
        };
        let sbert_path = transformer_dir.join("sentence_bert_config.json");
        let sbert: SentenceBertConfig = if sbert_path.exists() {
            read_json(&sbert_path)?
        } else {
            SentenceBertConfig::default()
        };
        Ok(StFolder {
            transformer_dir,
            pooling,
            normalize,
            max_seq_length: sbert.max_seq_length,
            do_lower_case: sbert.do_lower_case,
        })
    }
}

/// The safetensors files of a model folder: `model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.exists() {
        let index: serde_json::Value = read_json(&index_path)?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::key(&index_path, "weight_map", "missing or not an object"))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    Err(Error::format(
        &single,
        "missing (safetensors weights are required; convert pytorch_model.bin first)",
    ))
}

/// Loads the BERT encoder from `dir` (`config.json` + safetensors), on `device` in `dtype`.
/// Checkpoint names with a `bert.` prefix (saved from `BertFor*` heads) and without it (plain
/// `BertModel`) both load; any head is ignored, and the pooler is kept only as a slot for adapters.
pub fn load_bert(dir: &Path, device: &Device, dtype: DType) -> Result<BertModel> {
    let cfg = BertConfig::from_json_file(&dir.join("config.json"))?;
    let files = weight_files(dir)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for file in &files {
        let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
        let loaded = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| Error::format(file, format!("invalid safetensors: {e}")))?;
        for (name, t) in loaded {
            let name = name
                .strip_prefix("bert.")
                .map(str::to_owned)
                .unwrap_or(name);
            tensors.insert(name, t);
        }
    }
    let vb = candle_nn::VarBuilder::from_tensors(tensors, dtype, device);
    BertModel::load(vb, &cfg).map_err(|e| {
        let shown = files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Error::format(shown, format!("loading BERT weights: {e}"))
    })
}
