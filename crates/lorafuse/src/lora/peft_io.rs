//! PEFT's adapter format: a folder with `adapter_config.json` and `adapter_model.safetensors`
//! holding `base_model.model.<path>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]`
//! (PEFT drops the adapter name from the keys when it saves).

use super::config::LoraConfig;
use super::{install, lora_layers, HasLinears};
use crate::error::{read_json, write_atomic};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The config file's name in an adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file's name in an adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// What PEFT puts before the module path in every key.
pub const KEY_PREFIX: &str = "base_model.model.";

/// Writes `files` into `dir` so that a reader never sees a half-written adapter: a new folder is
/// written under a temporary name and renamed into place; an existing folder (a checkpoint folder
/// may hold other files) gets each file replaced atomically, weights before config.
pub(crate) fn write_dir_atomic(dir: &Path, files: &[(&str, Vec<u8>)]) -> Result<()> {
    if !dir.exists() {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "adapter".into());
        let tmp = dir.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        for (f, bytes) in files {
            let p = tmp.join(f);
            std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
        }
        match std::fs::rename(&tmp, dir) {
            Ok(()) => return Ok(()),
            // Someone created `dir` meanwhile: fall back to per-file replacement below.
            Err(_) if dir.is_dir() => {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            Err(e) => return Err(Error::io(dir, e)),
        }
    }
    for (f, bytes) in files {
        write_atomic(&dir.join(f), bytes)?;
    }
    Ok(())
}

/// Serialises tensors to safetensors bytes with PEFT's `{"format": "pt"}` metadata (transformers
/// refuses files whose format it does not know).
pub(crate) fn safetensors_bytes(
    tensors: &BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<Vec<u8>> {
    // Candle's `View` unwraps its device copy: do the copy here, where an error can be returned.
    let host = tensors
        .iter()
        .map(|(k, v)| Ok((k.as_str(), v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize(host, Some(meta))
        .map_err(|e| Error::format(path, format!("serialising safetensors: {e}")))
}

/// Saves adapter `name` in PEFT's format into `dir` (created if needed). The weights keep their
/// dtype; the config is the one the adapter was created or loaded with, with
/// `inference_mode: true` as PEFT writes it.
pub fn save_peft<M: HasLinears + ?Sized>(model: &M, name: &str, dir: &Path) -> Result<()> {
    let mut tensors = BTreeMap::new();
    let mut config: Option<Arc<LoraConfig>> = None;
    for (path, l) in lora_layers(model) {
        if let Some(a) = l.adapter(name) {
            tensors.insert(
                format!("{KEY_PREFIX}{path}.lora_A.weight"),
                a.a.as_detached_tensor(),
            );
            tensors.insert(
                format!("{KEY_PREFIX}{path}.lora_B.weight"),
                a.b.as_detached_tensor(),
            );
            config.get_or_insert_with(|| a.config.clone());
        }
    }
    let Some(config) = config else {
        return Err(Error::Invalid(format!("no adapter named `{name}` to save")));
    };
    let mut config = (*config).clone();
    config.inference_mode = true;
    let json = serde_json::to_vec_pretty(&config)
        .map_err(|e| Error::Invalid(format!("adapter config: {e}")))?;
    let weights = safetensors_bytes(&tensors, &dir.join(WEIGHTS_FILE))?;
    write_dir_atomic(dir, &[(WEIGHTS_FILE, weights), (CONFIG_FILE, json)])
}

/// Reads `adapter_config.json` from an adapter folder, validated.
pub fn read_peft_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(CONFIG_FILE);
    if !path.exists() {
        return Err(Error::format(
            &path,
            "missing (a PEFT adapter folder needs adapter_config.json)",
        ));
    }
    let cfg: LoraConfig = read_json(&path)?;
    cfg.validate()
        .map_err(|e| Error::format(&path, e.to_string()))?;
    Ok(cfg)
}

/// Loads the tensors of a safetensors file onto the CPU, naming the file in errors.
pub(crate) fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::format(path, "missing"));
    }
    candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| Error::format(path, e.to_string()))
}

/// Splits `base_model.model.<path>.lora_{A,B}.weight` into `(path, is_a)`.
fn parse_key(key: &str, file: &PathBuf) -> Result<(String, bool)> {
    let bad = |msg: &str| Err(Error::key(file, key, msg));
    // `PeftModel.save_pretrained` prefixes every key with `base_model.model.`; transformers'
    // own adapter support (`model.add_adapter(...)`, as sentence-transformers uses it) saves the
    // bare module paths. Both name the same modules.
    let rest = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    if let Some(p) = rest.strip_suffix(".lora_A.weight") {
        return Ok((p.to_owned(), true));
    }
    if let Some(p) = rest.strip_suffix(".lora_B.weight") {
        return Ok((p.to_owned(), false));
    }
    if rest.contains("lora_magnitude_vector") {
        return bad("DoRA adapters are not supported");
    }
    if rest.contains("lora_embedding") {
        return bad("LoRA on embeddings is not supported");
    }
    bad("not a LoRA weight (expected `.lora_A.weight` or `.lora_B.weight`)")
}

/// Loads a PEFT adapter folder as adapter `name`, its matrices converted to `dtype` (PEFT keeps
/// adapters in f32 by default even under a bf16 model). The config decides which modules are
/// wrapped; every one of them must have both keys with the shapes its rank implies, and every key
/// must belong to one of them, else the error names the key and file. Returns the wrapped paths.
pub fn load_peft<M: HasLinears + ?Sized>(
    model: &mut M,
    dir: &Path,
    name: &str,
    dtype: DType,
) -> Result<Vec<String>> {
    let cfg = read_peft_config(dir)?;
    let cfg_path = dir.join(CONFIG_FILE);
    let file = dir.join(WEIGHTS_FILE);
    if !file.exists() && dir.join("adapter_model.bin").exists() {
        return Err(Error::format(
            dir.join("adapter_model.bin"),
            "pickled adapters are not supported; save with safe_serialization=True",
        ));
    }
    let mut tensors = read_safetensors(&file)?;
    let mut by_module: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    for key in tensors.keys() {
        let (path, is_a) = parse_key(key, &file)?;
        let e = by_module.entry(path).or_default();
        if is_a {
            e.0 = Some(key.clone());
        } else {
            e.1 = Some(key.clone());
        }
    }
    let defaults = model.default_lora_targets();
    let defaults: Vec<&str> = defaults.iter().map(String::as_str).collect();
    let matcher = cfg
        .matcher(&defaults)
        .map_err(|e| Error::format(&cfg_path, e.to_string()))?;
    let linears: Vec<(String, (usize, usize))> = model
        .named_linears()
        .into_iter()
        .map(|(p, s)| {
            let d = s.base().dims();
            (p, d)
        })
        .collect();
    for (path, (a, b)) in &by_module {
        let key = a.as_ref().or(b.as_ref()).cloned().unwrap_or_default();
        if !linears.iter().any(|(p, _)| p == path) {
            return Err(Error::key(
                &file,
                key,
                format!("the model has no linear module `{path}`"),
            ));
        }
        if !matcher.matches(path) {
            return Err(Error::key(
                &file,
                key,
                format!(
                    "module `{path}` is not selected by {} in {CONFIG_FILE}",
                    matcher.describe()
                ),
            ));
        }
    }
    let mut entries: Vec<(String, Tensor, Tensor, f64)> = Vec::new();
    for (path, (out_dim, in_dim)) in &linears {
        if !matcher.matches(path) {
            continue;
        }
        let m = cfg
            .module_lora(path)
            .map_err(|e| Error::format(&cfg_path, e.to_string()))?;
        let mut take = |suffix: &str, expected: [usize; 2]| -> Result<Tensor> {
            // The key as the file spells it (with or without the prefix); PEFT's spelling for
            // the error when it is missing.
            let recorded = by_module.get(path).and_then(|(a, b)| {
                if suffix == "lora_A" {
                    a.clone()
                } else {
                    b.clone()
                }
            });
            let key = recorded.unwrap_or_else(|| format!("{KEY_PREFIX}{path}.{suffix}.weight"));
            let t = tensors.remove(&key).ok_or_else(|| {
                Error::key(&file, &key, "missing (the config targets this module)")
            })?;
            if t.dims() != expected {
                return Err(Error::key(
                    &file,
                    &key,
                    format!(
                        "expected shape {expected:?} (rank {}), found {:?}",
                        m.rank,
                        t.dims()
                    ),
                ));
            }
            Ok(t.to_dtype(dtype)?)
        };
        let a = take("lora_A", [m.rank, *in_dim])?;
        let b = take("lora_B", [*out_dim, m.rank])?;
        entries.push((path.clone(), a, b, m.scale));
    }
    if entries.is_empty() {
        return Err(Error::format(
            &cfg_path,
            format!("no module of the model matches {}", matcher.describe()),
        ));
    }
    let paths: Vec<String> = entries.iter().map(|(p, ..)| p.clone()).collect();
    let config = Arc::new(cfg);
    install(model, name, &paths, |path, layer| {
        let (_, a, b, scale) = entries
            .iter()
            .find(|(p, ..)| p == path)
            .ok_or_else(|| Error::Invalid(format!("module `{path}` vanished while loading")))?;
        layer.insert_adapter(
            name,
            a.clone(),
            b.clone(),
            *scale,
            config.lora_dropout,
            config.clone(),
        )
    })?;
    Ok(paths)
}
