//! Hugging Face model folders: `config.json`, the tokenizer files, and weights in
//! `model.safetensors` or shards listed by `model.safetensors.index.json`, memory-mapped.

use super::ModelFiles;
use crate::config::LlamaConfig;
use crate::error::read_json;
use crate::tokenizer::TextTokenizer;
use crate::{Error, Result};
use candle_core::{DType, Device};
use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The single-file weights name.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The shard index name.
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// The safetensors files that hold a folder's weights: `model.safetensors`, or every shard the
/// index names (each must exist; the error names the index and the missing shard).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(WEIGHTS_INDEX);
    if !index.is_file() {
        return Err(Error::format(
            dir,
            format!("no weights: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX} is in this folder"),
        ));
    }
    let doc: serde_json::Value = read_json(&index)?;
    let map = doc
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::key(&index, "weight_map", "missing or not an object"))?;
    let mut shards = BTreeSet::new();
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            Error::key(
                &index,
                format!("weight_map.{tensor}"),
                "expected a file name",
            )
        })?;
        // A shard name must stay inside the folder.
        if Path::new(shard).components().count() != 1 {
            return Err(Error::key(
                &index,
                format!("weight_map.{tensor}"),
                format!("shard `{shard}` is not a plain file name"),
            ));
        }
        shards.insert(shard.to_owned());
    }
    if shards.is_empty() {
        return Err(Error::key(&index, "weight_map", "lists no shards"));
    }
    let files: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(Error::format(
            &index,
            format!("lists shard {} which does not exist", missing.display()),
        ));
    }
    Ok(files)
}

/// Checks a safetensors file's header against its size without reading the data: a truncated
/// or corrupt file is an error naming it, where the memory-mapped loader would fail later with
/// no file name. Returns the tensor names.
pub fn check_safetensors_file(path: &Path) -> Result<Vec<String>> {
    let bad = |msg: String| Error::format(path, format!("not a valid safetensors file: {msg}"));
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| bad(format!("{file_len} bytes, too short for a header")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    // The format caps headers at 100 MB.
    if header_len > 100_000_000 || header_len > file_len.saturating_sub(8) {
        return Err(bad(format!(
            "header of {header_len} bytes does not fit a file of {file_len} bytes"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io(path, e))?;
    let header: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let data_len = file_len - 8 - header_len;
    let mut end = 0u64;
    let mut names = vec![];
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)))
            .ok_or_else(|| bad(format!("tensor `{name}` has no valid data_offsets")))?;
        if offsets.0 > offsets.1 || offsets.1 > data_len {
            return Err(bad(format!(
                "tensor `{name}` spans bytes {}..{} of a data section of {data_len} bytes (truncated?)",
                offsets.0, offsets.1
            )));
        }
        end = end.max(offsets.1);
        names.push(name.clone());
    }
    if end != data_len {
        return Err(bad(format!(
            "tensors cover {end} bytes of a data section of {data_len} bytes"
        )));
    }
    names.sort_unstable();
    Ok(names)
}

/// Opens a Hugging Face model folder: config, tokenizer (plus the config's EOS ids) and a
/// memory-mapped `VarBuilder` that yields tensors in `dtype` on `device`.
pub fn open_hf_folder(dir: &Path, dtype: DType, device: &Device) -> Result<ModelFiles> {
    let config = LlamaConfig::from_json_file(&dir.join("config.json"))?;
    let mut tokenizer = TextTokenizer::from_hf_folder(dir)?;
    for &id in &config.eos_token_ids {
        if !tokenizer.eos_ids.contains(&id) {
            tokenizer.eos_ids.push(id);
        }
    }
    let files = weight_files(dir)?;
    for f in &files {
        check_safetensors_file(f)?;
    }
    // SAFETY: the files are mapped read-only; the mapping is sound as long as no one truncates
    // or rewrites them while the model is loaded, the standard contract of memory-mapped
    // checkpoints (transformers and candle's examples rely on it too). Headers were validated
    // above, so the loader's own bounds checks see consistent sizes.
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
        .map_err(|e| Error::format(dir, format!("cannot map the weights: {e}")))?;
    Ok(ModelFiles {
        config,
        vb,
        tokenizer,
        source: dir.to_path_buf(),
    })
}
