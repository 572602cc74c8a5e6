//! `--adapter DIR[:WEIGHT]`: PEFT adapters (adapter_config.json + adapter_model.safetensors) or
//! mlx-lm adapters (adapters.safetensors), loaded onto the model and activated together.

use anyhow::Context;
use candle_core::DType;
use clap::Args;
use lorafuse::lora::{self, HasLinears};
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone, Default)]
pub struct AdapterArgs {
    /// A LoRA adapter folder (PEFT or mlx-lm format), optionally with a weight: `DIR` or
    /// `DIR:0.5`. Repeatable: all given adapters are active at once.
    #[arg(long = "adapter", value_name = "DIR[:WEIGHT]")]
    pub adapters: Vec<String>,
}

/// Splits `DIR[:WEIGHT]`; a suffix that does not parse as a number belongs to the path.
fn parse_spec(spec: &str) -> (PathBuf, f64) {
    if let Some((dir, w)) = spec.rsplit_once(':') {
        if let Ok(w) = w.parse::<f64>() {
            return (PathBuf::from(dir), w);
        }
    }
    (PathBuf::from(spec), 1.0)
}

impl AdapterArgs {
    /// Loads every adapter onto `model` (the decoder, or an embedder's encoder) and activates
    /// them with their weights. Returns the adapter names.
    pub fn apply<M: HasLinears + ?Sized>(&self, model: &mut M) -> anyhow::Result<Vec<String>> {
        let mut active = Vec::new();
        for (i, spec) in self.adapters.iter().enumerate() {
            let (dir, weight) = parse_spec(spec);
            let name = format!("adapter{i}");
            load_one(model, &dir, &name)
                .with_context(|| format!("loading adapter {}", dir.display()))?;
            eprintln!("adapter: {} (weight {weight})", dir.display());
            active.push((name, weight));
        }
        if !active.is_empty() {
            let refs: Vec<(&str, f64)> = active.iter().map(|(n, w)| (n.as_str(), *w)).collect();
            lora::set_active_adapters(model, &refs)?;
        }
        Ok(active.into_iter().map(|(n, _)| n).collect())
    }
}

fn load_one<M: HasLinears + ?Sized>(model: &mut M, dir: &Path, name: &str) -> anyhow::Result<()> {
    // Adapters stay in f32 whatever the model's dtype: they are small and f32 keeps their
    // precision.
    if dir.join("adapters.safetensors").exists() && !dir.join("adapter_model.safetensors").exists()
    {
        lora::mlx_io::import_mlx(model, dir, name, DType::F32)?;
    } else {
        lora::peft_io::load_peft(model, dir, name, DType::F32)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_spec;
    use std::path::PathBuf;

    #[test]
    fn weight_suffix_is_optional() {
        assert_eq!(parse_spec("a/b"), (PathBuf::from("a/b"), 1.0));
        assert_eq!(parse_spec("a/b:0.25"), (PathBuf::from("a/b"), 0.25));
        assert_eq!(parse_spec("c:/x"), (PathBuf::from("c:/x"), 1.0));
    }
}
