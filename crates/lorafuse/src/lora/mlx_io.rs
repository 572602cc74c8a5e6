//! Import of mlx-lm adapters: a folder with `adapters.safetensors` (keys `<path>.lora_a` `[in, r]`
//! and `<path>.lora_b` `[r, out]`, i.e. transposed relative to PEFT) and `adapter_config.json`
//! whose `lora_parameters` give `rank`, `scale` and `dropout`. mlx-lm computes
//! `y = linear(x) + scale * (x lora_a) lora_b`, so `scale` is the multiplier itself, not an alpha.
//!
//! The imported adapter gets a PEFT config that reproduces it (`lora_alpha = scale * r`, the
//! modules listed by full path), so it can be saved with `save_peft` and loaded by PEFT.

use super::config::{LoraConfig, PatternMap, TargetModules};
use super::peft_io::read_safetensors;
use super::{install, HasLinears};
use crate::error::read_json;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// mlx-lm's weights file in an adapter folder.
pub const MLX_WEIGHTS_FILE: &str = "adapters.safetensors";
/// mlx-lm's `lora_parameters.scale` default, used when the config omits it.
pub const MLX_DEFAULT_SCALE: f64 = 20.0;

/// Imports the mlx-lm adapter in `dir` as adapter `name`, `A`/`B` in `dtype`. Errors name the file
/// and key for a module the model lacks, a missing half, a shape that does not fit, or a DoRA
/// adapter. Returns the wrapped paths.
pub fn import_mlx<M: HasLinears + ?Sized>(
    model: &mut M,
    dir: &Path,
    name: &str,
    dtype: DType,
) -> Result<Vec<String>> {
    let cfg_path = dir.join("adapter_config.json");
    let file = dir.join(MLX_WEIGHTS_FILE);
    let raw: serde_json::Value = if cfg_path.exists() {
        read_json(&cfg_path)?
    } else {
        serde_json::Value::Null
    };
    match raw.get("fine_tune_type").and_then(|v| v.as_str()) {
        None | Some("lora") => {}
        Some(other) => {
            return Err(Error::key(
                &cfg_path,
                "fine_tune_type",
                format!("`{other}` adapters are not supported (only lora)"),
            ))
        }
    }
    let params = raw.get("lora_parameters");
    let num = |k: &str| params.and_then(|p| p.get(k)).and_then(|v| v.as_f64());
    let scale = num("scale").unwrap_or(MLX_DEFAULT_SCALE);
    let dropout = num("dropout").unwrap_or(0.0);
    if !scale.is_finite() || !(0.0..1.0).contains(&dropout) {
        return Err(Error::key(
            &cfg_path,
            "lora_parameters",
            "scale must be finite, dropout in [0, 1)",
        ));
    }

    let mut tensors = read_safetensors(&file)?;
    let mut by_module: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
    for key in tensors.keys() {
        let (path, is_a) = if let Some(p) = key.strip_suffix(".lora_a") {
            (p, true)
        } else if let Some(p) = key.strip_suffix(".lora_b") {
            (p, false)
        } else if key.ends_with(".m") {
            return Err(Error::key(&file, key, "DoRA adapters are not supported"));
        } else {
            return Err(Error::key(
                &file,
                key,
                "not a LoRA weight (expected `.lora_a` or `.lora_b`)",
            ));
        };
        let e = by_module.entry(path.to_owned()).or_default();
        if is_a {
            e.0 = Some(key.clone());
        } else {
            e.1 = Some(key.clone());
        }
    }
    if by_module.is_empty() {
        return Err(Error::format(&file, "holds no LoRA weights"));
    }
    let dims: BTreeMap<String, (usize, usize)> = model
        .named_linears()
        .into_iter()
        .map(|(p, s)| (p, s.base().dims()))
        .collect();

    let mut entries: Vec<(String, Tensor, Tensor)> = Vec::new();
    for (path, (ka, kb)) in &by_module {
        let any_key = ka.as_ref().or(kb.as_ref()).cloned().unwrap_or_default();
        let Some(&(out_dim, in_dim)) = dims.get(path) else {
            return Err(Error::key(
                &file,
                any_key,
                format!("the model has no linear module `{path}`"),
            ));
        };
        let (Some(ka), Some(kb)) = (ka, kb) else {
            let missing = if ka.is_none() { "lora_a" } else { "lora_b" };
            return Err(Error::key(&file, format!("{path}.{missing}"), "missing"));
        };
        let la = tensors
            .remove(ka)
            .ok_or_else(|| Error::key(&file, ka, "missing"))?;
        let lb = tensors
            .remove(kb)
            .ok_or_else(|| Error::key(&file, kb, "missing"))?;
        let r = la.dims().get(1).copied().unwrap_or(0);
        if la.dims() != [in_dim, r] || r == 0 {
            return Err(Error::key(
                &file,
                ka,
                format!("expected shape [{in_dim}, r], found {:?}", la.dims()),
            ));
        }
        if lb.dims() != [r, out_dim] {
            return Err(Error::key(
                &file,
                kb,
                format!("expected shape [{r}, {out_dim}], found {:?}", lb.dims()),
            ));
        }
        let a = la.t()?.contiguous()?.to_dtype(dtype)?;
        let b = lb.t()?.contiguous()?.to_dtype(dtype)?;
        entries.push((path.clone(), a, b));
    }

    let config = Arc::new(peft_config_for(&raw, &entries, scale, dropout));
    let paths: Vec<String> = entries.iter().map(|(p, ..)| p.clone()).collect();
    install(model, name, &paths, |path, layer| {
        let (_, a, b) = entries
            .iter()
            .find(|(p, ..)| p == path)
            .ok_or_else(|| Error::Invalid(format!("module `{path}` vanished while importing")))?;
        layer.insert_adapter(name, a.clone(), b.clone(), scale, dropout, config.clone())
    })?;
    // Report in model order, like apply_lora.
    let order: Vec<String> = model.named_linears().into_iter().map(|(p, _)| p).collect();
    Ok(order.into_iter().filter(|p| paths.contains(p)).collect())
}

/// A PEFT config that selects exactly `entries` and reproduces `scale` on each (per-module ranks
/// that differ from the most common one go to `rank_pattern`/`alpha_pattern`).
fn peft_config_for(
    raw: &serde_json::Value,
    entries: &[(String, Tensor, Tensor)],
    scale: f64,
    dropout: f64,
) -> LoraConfig {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for (_, a, _) in entries {
        *counts.entry(a.dims()[0]).or_default() += 1;
    }
    let r = counts
        .iter()
        .max_by_key(|(_, c)| **c)
        .map(|(r, _)| *r)
        .unwrap_or(8);
    let mut rank_pattern = PatternMap::default();
    let mut alpha_pattern = PatternMap::default();
    for (path, a, _) in entries {
        let ri = a.dims()[0];
        if ri != r {
            let key = regex::escape(path);
            rank_pattern.0.push((key.clone(), ri));
            alpha_pattern.0.push((key, scale * ri as f64));
        }
    }
    LoraConfig {
        r,
        lora_alpha: scale * r as f64,
        lora_dropout: dropout,
        target_modules: Some(TargetModules::List(
            entries.iter().map(|(p, ..)| p.clone()).collect(),
        )),
        rank_pattern,
        alpha_pattern,
        base_model_name_or_path: raw.get("model").and_then(|v| v.as_str()).map(str::to_owned),
        ..LoraConfig::default()
    }
}
