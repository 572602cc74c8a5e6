//! `LoraConfig`: PEFT's `adapter_config.json`, field for field, with PEFT's defaults, and the rules
//! PEFT uses to pick target modules and per-module rank/alpha.
//!
//! The matching mirrors `peft.tuners.tuners_utils.check_target_module_exists` and
//! `peft.utils.other.get_pattern_key` (PEFT 0.21), so that one config selects the same modules here
//! and in PEFT.

pub use super::targets::TargetMatcher;
use crate::{Error, Result};
use regex::Regex;
use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Which modules get an adapter: PEFT's `target_modules`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A module matches when its path equals a name or ends with `.name` (`"q_proj"`).
    List(Vec<String>),
    /// A regex that must match the whole module path, or the shorthand `"all-linear"`: every
    /// linear layer except the output head (`lm_head`).
    Pattern(String),
}

impl TargetModules {
    /// The shorthand PEFT expands to every linear layer but the output embedding.
    pub const ALL_LINEAR: &'static str = "all-linear";

    /// `target_modules = [names..]`.
    pub fn names<S: AsRef<str>>(names: &[S]) -> Self {
        Self::List(names.iter().map(|s| s.as_ref().to_owned()).collect())
    }

    /// `target_modules = "all-linear"`.
    pub fn all_linear() -> Self {
        Self::Pattern(Self::ALL_LINEAR.to_owned())
    }

    pub(crate) fn is_all_linear(&self) -> bool {
        matches!(self, Self::Pattern(p) if p.eq_ignore_ascii_case(Self::ALL_LINEAR))
    }
}

/// A single value or a list (PEFT's `layers_to_transform`, `layers_pattern`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: PartialEq> OneOrMany<T> {
    pub(crate) fn contains(&self, v: &T) -> bool {
        match self {
            Self::One(x) => x == v,
            Self::Many(xs) => xs.contains(v),
        }
    }
    pub(crate) fn is_empty(&self) -> bool {
        matches!(self, Self::Many(xs) if xs.is_empty())
    }
}

/// How the adapter's matrices start (PEFT's `init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitLoraWeights {
    /// `true`: A kaiming-uniform (`a = sqrt(5)`, i.e. U(-1/sqrt(in), 1/sqrt(in))), B zero, so the
    /// adapter starts as the identity.
    #[default]
    Default,
    /// `"gaussian"`: A ~ N(0, 1/r), B zero.
    Gaussian,
    /// `false`: A and B both kaiming-uniform (torch's `nn.Linear` default): the adapter changes
    /// the output from the start. For tests.
    Random,
}

impl Serialize for InitLoraWeights {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Default => s.serialize_bool(true),
            Self::Random => s.serialize_bool(false),
            Self::Gaussian => s.serialize_str("gaussian"),
        }
    }
}

impl<'de> Deserialize<'de> for InitLoraWeights {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Bool(true) => Ok(Self::Default),
            serde_json::Value::Bool(false) => Ok(Self::Random),
            serde_json::Value::String(s) if s == "gaussian" => Ok(Self::Gaussian),
            other => Err(serde::de::Error::custom(format!(
                "init_lora_weights {other} is not supported (use true, false or \"gaussian\")"
            ))),
        }
    }
}

/// An ordered `{pattern: value}` map (`rank_pattern`, `alpha_pattern`). Order matters: PEFT takes
/// the first key that matches, in the order the JSON lists them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PatternMap<T>(pub Vec<(String, T)>);

impl<T: Serialize> Serialize for PatternMap<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for PatternMap<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = PatternMap<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map from module pattern to value")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = a.next_entry()? {
                    out.push((k, v));
                }
                Ok(PatternMap(out))
            }
            fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
                Ok(PatternMap(Vec::new()))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// Writes whole numbers as JSON integers (PEFT writes `lora_alpha: 16`, not `16.0`).
fn ser_num<S: Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

fn ser_nums<S: Serializer>(v: &PatternMap<f64>, s: S) -> std::result::Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(Some(v.0.len()))?;
    for (k, x) in &v.0 {
        if x.fract() == 0.0 && x.abs() < 9.0e15 {
            m.serialize_entry(k, &(*x as i64))?;
        } else {
            m.serialize_entry(k, x)?;
        }
    }
    m.end()
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}
fn default_task() -> Option<String> {
    Some("CAUSAL_LM".into())
}
fn default_peft_type() -> String {
    "LORA".into()
}

/// PEFT's `LoraConfig` as stored in `adapter_config.json`. Defaults are PEFT's: `r = 8`,
/// `lora_alpha = 8`, `lora_dropout = 0`, no rsLoRA, PEFT's default init. `target_modules = null`
/// means the model's default targets (PEFT's per-architecture table: `q_proj`, `v_proj` for the
/// Llama family). Fields this crate does not interpret are kept in `extra` and written back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank of the update.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scaling numerator: `scale = lora_alpha / r` (or `/ sqrt(r)` with `use_rslora`).
    #[serde(default = "default_alpha", serialize_with = "ser_num")]
    pub lora_alpha: f64,
    /// Dropout probability on the adapter's input (training only).
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted: a list of names (path equal or ending in `.name`) or a full-match regex.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// Only these layer indices (the number after `layers.`); list targets only, as in PEFT.
    #[serde(default)]
    pub layers_to_transform: Option<OneOrMany<usize>>,
    /// The name before the layer index (`"layers"`); `null` means the first `<name>.<N>.` in the path.
    #[serde(default)]
    pub layers_pattern: Option<OneOrMany<String>>,
    /// Per-module rank overrides: `{regex: r}`, the regex matched against the end of the module path.
    #[serde(default)]
    pub rank_pattern: PatternMap<usize>,
    /// Per-module alpha overrides, matched like `rank_pattern`.
    #[serde(default, serialize_with = "ser_nums")]
    pub alpha_pattern: PatternMap<f64>,
    /// Rank-stabilised scaling `alpha / sqrt(r)`.
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub init_lora_weights: InitLoraWeights,
    /// Only `"none"` is supported (trainable biases are not).
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default = "default_task")]
    pub task_type: Option<String>,
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Must be `false`: weights are stored `[out, in]` here.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// DoRA is not supported; must be `false`.
    #[serde(default)]
    pub use_dora: bool,
    /// Not supported; must be empty.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub inference_mode: bool,
    /// Every other field of the file, kept for round trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: default_r(),
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            target_modules: None,
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: PatternMap::default(),
            alpha_pattern: PatternMap::default(),
            use_rslora: false,
            init_lora_weights: InitLoraWeights::Default,
            bias: default_bias(),
            task_type: default_task(),
            peft_type: default_peft_type(),
            base_model_name_or_path: None,
            fan_in_fan_out: false,
            use_dora: false,
            modules_to_save: None,
            inference_mode: false,
            extra: serde_json::Map::new(),
        }
    }
}

/// Rank, alpha and scale of the adapter on one module.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModuleLora {
    pub rank: usize,
    pub alpha: f64,
    pub scale: f64,
}

/// PEFT's `get_pattern_key`: the first key `k` for which `^(.*\.)?(k)$` matches `path`.
fn pattern_value<'a, T>(map: &'a PatternMap<T>, path: &str) -> Result<Option<&'a T>> {
    for (key, v) in &map.0 {
        let re = Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
            .map_err(|e| Error::Invalid(format!("pattern `{key}`: {e}")))?;
        if re.is_match(path) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

impl LoraConfig {
    /// A config with rank, alpha and targets set, PEFT defaults elsewhere.
    pub fn new(r: usize, lora_alpha: f64, targets: TargetModules) -> Self {
        Self {
            r,
            lora_alpha,
            target_modules: Some(targets),
            ..Self::default()
        }
    }

    /// Rejects options this crate cannot honour, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(format!("adapter config: {m}")));
        if self.peft_type != "LORA" {
            return bad(format!("peft_type `{}` is not LORA", self.peft_type));
        }
        if self.r == 0 || self.rank_pattern.0.iter().any(|(_, r)| *r == 0) {
            return bad("rank r must be at least 1".into());
        }
        if !self.lora_alpha.is_finite() || self.alpha_pattern.0.iter().any(|(_, a)| !a.is_finite())
        {
            return bad("lora_alpha must be finite".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "lora_dropout {} is not in [0, 1)",
                self.lora_dropout
            ));
        }
        if self.bias != "none" {
            return bad(format!(
                "bias `{}` is not supported (only \"none\")",
                self.bias
            ));
        }
        if self.fan_in_fan_out {
            return bad("fan_in_fan_out = true is not supported".into());
        }
        if self.use_dora {
            return bad("use_dora = true (DoRA) is not supported".into());
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return bad("modules_to_save is not supported".into());
        }
        for key in ["use_qalora", "use_bdlora", "lora_bias"] {
            if self.extra.get(key).and_then(|v| v.as_bool()) == Some(true) {
                return bad(format!("{key} = true is not supported"));
            }
        }
        // Options that change what is adapted or add weights this crate does not model.
        for key in [
            "target_parameters",
            "layer_replication",
            "trainable_token_indices",
            "alora_invocation_tokens",
        ] {
            let set = match self.extra.get(key) {
                None | Some(serde_json::Value::Null) => false,
                Some(serde_json::Value::Array(a)) => !a.is_empty(),
                Some(serde_json::Value::Object(o)) => !o.is_empty(),
                Some(_) => true,
            };
            if set {
                return bad(format!("{key} is not supported"));
            }
        }
        Ok(())
    }

    /// Rank, alpha and scale for the module at `path` (`rank_pattern`/`alpha_pattern` applied).
    pub fn module_lora(&self, path: &str) -> Result<ModuleLora> {
        let rank = pattern_value(&self.rank_pattern, path)?
            .copied()
            .unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern, path)?
            .copied()
            .unwrap_or(self.lora_alpha);
        Ok(ModuleLora {
            rank,
            alpha,
            scale: scaling(alpha, rank, self.use_rslora),
        })
    }

    /// The compiled target rule; `default_targets` stands in for `target_modules = null`.
    pub fn matcher(&self, default_targets: &[&str]) -> Result<TargetMatcher> {
        TargetMatcher::new(self, default_targets)
    }
}

/// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
pub fn scaling(alpha: f64, rank: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}
