//! Writes a Hugging Face model folder (what transformers' `from_pretrained` loads): how a GGUF
//! checkpoint becomes a safetensors folder, and what `lorafuse merge` produces.

use crate::config::LlamaConfig;
use crate::tokenizer::TextTokenizer;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The files a model folder export writes; an existing folder is replaced only if it holds
/// nothing else, so an export never deletes a user's unrelated files.
const EXPORT_FILES: &[&str] = &[
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

fn torch_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// Whether the tokenizer's post-processor adds `token` in front of a sequence (Llama 2/3 add
/// BOS, SmolLM2 does not): what `add_bos_token` must say for transformers to agree.
fn adds_token_first(tok: &TextTokenizer, token: Option<&str>) -> Result<bool> {
    let Some(id) = token.and_then(|t| tok.token_id(t)) else {
        return Ok(false);
    };
    Ok(tok.encode("a", true)?.first() == Some(&id) && tok.encode("a", false)?.first() != Some(&id))
}

fn adds_token_last(tok: &TextTokenizer, token: Option<&str>) -> Result<bool> {
    let Some(id) = token.and_then(|t| tok.token_id(t)) else {
        return Ok(false);
    };
    Ok(tok.encode("a", true)?.last() == Some(&id) && tok.encode("a", false)?.last() != Some(&id))
}

fn write_folder(
    dir: &Path,
    config: &LlamaConfig,
    tensors: &HashMap<String, Tensor>,
    tokenizer: &TextTokenizer,
) -> Result<()> {
    let dtype = tensors
        .values()
        .next()
        .map(|t| t.dtype())
        .unwrap_or(DType::F32);
    let mut cfg = config.to_hf_json();
    // transformers 5 reads `dtype`; older releases read `torch_dtype`.
    cfg["torch_dtype"] = torch_dtype(dtype).into();
    cfg["dtype"] = torch_dtype(dtype).into();
    write_json(&dir.join("config.json"), &cfg)?;

    // Tied models store the embedding once: transformers re-ties `lm_head` on load.
    let mut cpu = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if config.tie_word_embeddings && name == "lm_head.weight" {
            continue;
        }
        cpu.push((name.clone(), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    cpu.sort_by(|a, b| a.0.cmp(&b.0));
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let weights = dir.join("model.safetensors");
    let bytes = safetensors::serialize(cpu.iter().map(|(n, t)| (n.as_str(), t)), metadata)
        .map_err(|e| Error::format(&weights, format!("cannot serialize tensors: {e}")))?;
    std::fs::write(&weights, bytes).map_err(|e| Error::io(&weights, e))?;

    let tok_path = dir.join("tokenizer.json");
    tokenizer
        .inner
        .save(&tok_path, false)
        .map_err(|e| Error::format(&tok_path, e.to_string()))?;

    let mut tok_cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": adds_token_first(tokenizer, tokenizer.bos_token.as_deref())?,
        "add_eos_token": adds_token_last(tokenizer, tokenizer.eos_token.as_deref())?,
        "clean_up_tokenization_spaces": false,
        "model_max_length": config.max_position_embeddings,
    });
    if let Some(b) = &tokenizer.bos_token {
        tok_cfg["bos_token"] = b.as_str().into();
    }
    if let Some(e) = &tokenizer.eos_token {
        tok_cfg["eos_token"] = e.as_str().into();
    }
    if let Some(t) = &tokenizer.chat_template {
        tok_cfg["chat_template"] = t.as_str().into();
    }
    write_json(&dir.join("tokenizer_config.json"), &tok_cfg)?;

    let mut eos: Vec<u32> = tokenizer.eos_ids.clone();
    for id in &config.eos_token_ids {
        if !eos.contains(id) {
            eos.push(*id);
        }
    }
    let mut gen = serde_json::json!({});
    if let Some(b) = config.bos_token_id {
        gen["bos_token_id"] = b.into();
    }
    match eos.as_slice() {
        [] => {}
        [one] => gen["eos_token_id"] = (*one).into(),
        many => gen["eos_token_id"] = many.to_vec().into(),
    }
    write_json(&dir.join("generation_config.json"), &gen)
}

/// Checks that `dir` may be replaced: absent, empty, or holding only files an export writes.
fn replaceable(dir: &Path) -> Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        if !EXPORT_FILES.iter().any(|f| name == *f) {
            return Err(Error::format(
                dir,
                format!(
                    "exists and holds {}, which an export does not write; not replacing it",
                    name.to_string_lossy()
                ),
            ));
        }
    }
    Ok(true)
}

/// Writes `config.json`, `model.safetensors` (no `lm_head.weight` when tied), `tokenizer.json`,
/// `tokenizer_config.json` and `generation_config.json` into `dir`. The folder is built beside
/// `dir` and renamed into place, so a failure never leaves a half-written model behind.
pub fn save_hf_folder(
    dir: &Path,
    config: &LlamaConfig,
    tensors: &HashMap<String, Tensor>,
    tokenizer: &TextTokenizer,
) -> Result<()> {
    let name = dir
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a folder name", dir.display())))?
        .to_string_lossy()
        .into_owned();
    let parent: PathBuf = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let replace = replaceable(dir)?;
    let tmp = parent.join(format!(".{name}.{}.tmp", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = write_folder(&tmp, config, tensors, tokenizer) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if replace {
        let old = parent.join(format!(".{name}.{}.old", std::process::id()));
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
    }
}
