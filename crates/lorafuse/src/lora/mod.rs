//! LoRA adapters by module path, as PEFT and mlx-lm's tuner do: models expose their projections as
//! [`LinearSlot`]s through [`HasLinears`], and [`apply_lora`] swaps the matching slots for
//! [`LoraLinear`]s. Models never mention LoRA.
//!
//! ```no_run
//! # fn demo(model: &mut impl lorafuse::lora::HasLinears) -> lorafuse::Result<()> {
//! use lorafuse::lora::{apply_lora, trainable_vars, LoraConfig, TargetModules};
//! let cfg = LoraConfig::new(8, 16.0, TargetModules::all_linear());
//! let wrapped = apply_lora(model, "default", &cfg, candle_core::DType::F32, 42)?;
//! let vars = trainable_vars(model); // hand these to the optimizer
//! # Ok(()) }
//! ```

pub mod config;
pub mod layer;
pub mod mlx_io;
pub mod peft_io;
pub mod rng;
pub mod targets;

pub use config::{
    InitLoraWeights, LoraConfig, ModuleLora, OneOrMany, PatternMap, TargetMatcher, TargetModules,
};
pub use layer::{AdapterInit, LoraAdapter, LoraLinear};
pub use mlx_io::import_mlx;
pub use peft_io::{load_peft, save_peft};

use crate::models::linear::{Linear, LinearLayer, LinearSlot};
use crate::{Error, Result};
use candle_core::{DType, Var};
use std::sync::Arc;

/// A model whose linear projections can be found by module path (HF names such as
/// `model.layers.3.self_attn.q_proj`). Implemented by the decoder and the encoder.
pub trait HasLinears {
    /// Every projection slot with its module path, in model order.
    fn named_linears_mut(&mut self) -> Vec<(String, &mut LinearSlot)>;
    /// Every projection slot with its module path, in model order.
    fn named_linears(&self) -> Vec<(String, &LinearSlot)>;
    /// What `target_modules = null` means for this model (PEFT's per-architecture default; the
    /// Llama family's is `q_proj`, `v_proj`).
    fn default_lora_targets(&self) -> Vec<String> {
        vec!["q_proj".to_owned(), "v_proj".to_owned()]
    }
}

fn as_lora(slot: &LinearSlot) -> Option<&LoraLinear> {
    slot.as_any().downcast_ref::<LoraLinear>()
}

/// The `LoraLinear` in `slot`, wrapping a plain `Linear` first.
fn lora_slot_mut<'a>(slot: &'a mut LinearSlot, path: &str) -> Result<&'a mut LoraLinear> {
    if slot.as_any().is::<Linear>() {
        let base = slot.base().clone();
        *slot = Box::new(LoraLinear::wrap(base));
    }
    slot.as_any_mut()
        .downcast_mut::<LoraLinear>()
        .ok_or_else(|| {
            Error::Invalid(format!(
                "module `{path}` is neither a Linear nor a LoraLinear"
            ))
        })
}

/// Every LoRA-wrapped module with its path, in model order.
pub fn lora_layers<M: HasLinears + ?Sized>(model: &M) -> Vec<(String, &LoraLinear)> {
    model
        .named_linears()
        .into_iter()
        .filter_map(|(p, s)| as_lora(s).map(|l| (p, l)))
        .collect()
}

/// Every LoRA-wrapped module, mutably.
pub fn lora_layers_mut<M: HasLinears + ?Sized>(model: &mut M) -> Vec<(String, &mut LoraLinear)> {
    model
        .named_linears_mut()
        .into_iter()
        .filter_map(|(p, s)| s.as_any_mut().downcast_mut::<LoraLinear>().map(|l| (p, l)))
        .collect()
}

/// Adapter names present in the model, in order of first appearance.
pub fn adapter_names<M: HasLinears + ?Sized>(model: &M) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (_, l) in lora_layers(model) {
        for (n, _) in l.adapters() {
            if !names.iter().any(|x| x == n) {
                names.push(n.to_owned());
            }
        }
    }
    names
}

/// The active adapters and weights (taken from the first wrapped module; all agree).
pub fn active_adapters<M: HasLinears + ?Sized>(model: &M) -> Vec<(String, f64)> {
    lora_layers(model)
        .first()
        .map(|(_, l)| l.active().to_vec())
        .unwrap_or_default()
}

/// Installs adapter `name` on `targets` (wrapping plain slots), calling `add` on each layer, then
/// makes the active set consistent: the new adapter becomes active when it is the model's first,
/// otherwise the model's current active set is kept (as PEFT's `add_adapter` does).
pub(crate) fn install<M: HasLinears + ?Sized>(
    model: &mut M,
    name: &str,
    targets: &[String],
    mut add: impl FnMut(&str, &mut LoraLinear) -> Result<()>,
) -> Result<()> {
    if adapter_names(model).iter().any(|n| n == name) {
        return Err(Error::Invalid(format!(
            "adapter `{name}` is already loaded; pick another name"
        )));
    }
    let had_adapters = lora_layers(model)
        .iter()
        .any(|(_, l)| l.adapters().next().is_some());
    let previous_active = active_adapters(model);
    let mut training = None;
    for (path, slot) in model.named_linears_mut() {
        if let Some(l) = as_lora(slot) {
            training.get_or_insert(l.is_training());
        }
        if !targets.contains(&path) {
            continue;
        }
        let layer = lora_slot_mut(slot, &path)?;
        add(&path, layer).map_err(|e| match e {
            Error::Invalid(m) => Error::Invalid(format!("module `{path}`: {m}")),
            other => other,
        })?;
    }
    let active = if had_adapters {
        previous_active
    } else {
        vec![(name.to_owned(), 1.0)]
    };
    for (_, l) in lora_layers_mut(model) {
        l.set_active(&active)?;
        if let Some(t) = training {
            l.set_training(t);
        }
    }
    Ok(())
}

/// Adds adapter `name` to every linear module that `cfg` targets (PEFT's rules: see
/// [`TargetMatcher`]), with per-module rank/alpha from `rank_pattern`/`alpha_pattern`. `A`, `B`
/// are created in `dtype` on the base weight's device; `seed` fixes their init (each module's
/// stream is derived from the seed and its path). Returns the wrapped paths in model order; errors
/// when nothing matches, naming the rule.
pub fn apply_lora<M: HasLinears + ?Sized>(
    model: &mut M,
    name: &str,
    cfg: &LoraConfig,
    dtype: DType,
    seed: u64,
) -> Result<Vec<String>> {
    cfg.validate()?;
    let defaults = model.default_lora_targets();
    let defaults: Vec<&str> = defaults.iter().map(String::as_str).collect();
    let matcher = cfg.matcher(&defaults)?;
    let mut targets = Vec::new();
    for (path, _) in model.named_linears() {
        if matcher.matches(&path) {
            let m = cfg.module_lora(&path)?;
            targets.push((path, m));
        }
    }
    if targets.is_empty() {
        let some: Vec<String> = model
            .named_linears()
            .into_iter()
            .take(8)
            .map(|(p, _)| p)
            .collect();
        return Err(Error::Invalid(format!(
            "no module matches {} (modules look like {some:?})",
            matcher.describe()
        )));
    }
    let config = Arc::new(cfg.clone());
    let paths: Vec<String> = targets.iter().map(|(p, _)| p.clone()).collect();
    install(model, name, &paths, |path, layer| {
        let m = targets
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, m)| *m)
            .ok_or_else(|| {
                Error::Invalid(format!("module `{path}` vanished while applying LoRA"))
            })?;
        let init = AdapterInit {
            rank: m.rank,
            scale: m.scale,
            dropout: cfg.lora_dropout,
            init: cfg.init_lora_weights,
            dtype,
            seed: layer::module_seed(seed, name, path),
        };
        layer.add_adapter(name, &init, config.clone())
    })?;
    Ok(paths)
}

/// Makes `name` the only active adapter (weight 1).
pub fn set_active_adapter<M: HasLinears + ?Sized>(model: &mut M, name: &str) -> Result<()> {
    set_active_adapters(model, &[(name, 1.0)])
}

/// Activates several adapters at once, each with a weight on its delta
/// (`y = base + sum w_i s_i B_i A_i x`). Errors on a name no module has.
pub fn set_active_adapters<M: HasLinears + ?Sized>(
    model: &mut M,
    active: &[(&str, f64)],
) -> Result<()> {
    let known = adapter_names(model);
    if let Some((n, _)) = active.iter().find(|(n, _)| !known.iter().any(|k| k == n)) {
        return Err(Error::Invalid(format!(
            "no adapter named `{n}` (loaded: {known:?})"
        )));
    }
    let active: Vec<(String, f64)> = active.iter().map(|(n, w)| (n.to_string(), *w)).collect();
    for (_, l) in lora_layers_mut(model) {
        l.set_active(&active)?;
    }
    Ok(())
}

/// Turns every adapter off: the model computes the base output (merged adapters are unmerged).
pub fn disable_adapters<M: HasLinears + ?Sized>(model: &mut M) -> Result<()> {
    for (_, l) in lora_layers_mut(model) {
        l.set_active(&[])?;
    }
    Ok(())
}

/// The active adapters' `A` and `B` as `(name, var)`, in model order then A before B; names follow
/// PEFT's in-memory ones: `<path>.lora_A.<adapter>.weight`.
pub fn trainable_vars<M: HasLinears + ?Sized>(model: &M) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    for (path, l) in lora_layers(model) {
        for (name, _) in l.active() {
            if let Some(a) = l.adapter(name) {
                out.push((format!("{path}.lora_A.{name}.weight"), a.a.clone()));
                out.push((format!("{path}.lora_B.{name}.weight"), a.b.clone()));
            }
        }
    }
    out
}

/// Folds the active adapters into the base weights (forward then costs the base GEMM only).
pub fn merge_adapters<M: HasLinears + ?Sized>(model: &mut M) -> Result<()> {
    for (_, l) in lora_layers_mut(model) {
        l.merge()?;
    }
    Ok(())
}

/// Undoes [`merge_adapters`].
pub fn unmerge_adapters<M: HasLinears + ?Sized>(model: &mut M) -> Result<()> {
    for (_, l) in lora_layers_mut(model) {
        l.unmerge()?;
    }
    Ok(())
}

/// Replaces every `LoraLinear` by its base `Linear`, merging the active adapters first when
/// `merge` is set (PEFT's `merge_and_unload`; `false` is `unload`).
pub fn unload_lora<M: HasLinears + ?Sized>(model: &mut M, merge: bool) -> Result<()> {
    for (path, slot) in model.named_linears_mut() {
        let Some(l) = slot.as_any_mut().downcast_mut::<LoraLinear>() else {
            continue;
        };
        if merge {
            l.merge()?;
        } else {
            l.unmerge()?;
        }
        let base = LinearLayer::base(l).clone();
        tracing::debug!("unloaded LoRA from {path}");
        *slot = Box::new(base);
    }
    Ok(())
}

/// Training mode (dropout on) for every LoRA layer.
pub fn set_training<M: HasLinears + ?Sized>(model: &mut M, training: bool) {
    for (_, l) in lora_layers_mut(model) {
        l.set_training(training);
    }
}

/// Restarts every layer's dropout stream from `seed` (per-module streams derived from the path).
/// A trainer calls this once per step with `seed + step` so that resumed runs repeat the masks.
pub fn reseed_dropout<M: HasLinears + ?Sized>(model: &mut M, seed: u64) {
    for (path, l) in lora_layers_mut(model) {
        l.reseed_dropout(rng::derive_seed(seed, &path));
    }
}
