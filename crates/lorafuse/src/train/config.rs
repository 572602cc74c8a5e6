//! `TrainConfig`: every training option with its default, in one place. The CLI reads its
//! defaults from here, checkpoints store it, and `--resume` reads it back.
//!
//! The defaults are sized for the shipped job (a ~100M-parameter model and a few hundred short
//! chat examples on a CPU): raise `iters` for larger data, lower `lr` for larger models.

use crate::lora::{HasLinears, LoraConfig, TargetModules};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::str::FromStr;

/// How the learning rate moves over the run (after the optional linear warmup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// The peak rate throughout.
    Constant,
    /// A straight line from the peak rate down towards `min_lr`.
    Linear,
    /// Half a cosine from the peak rate down towards `min_lr`.
    #[default]
    Cosine,
}

impl Schedule {
    /// Every accepted name, for help and errors.
    pub const NAMES: &'static [&'static str] = &["constant", "linear", "cosine"];
}

impl FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "constant" => Ok(Self::Constant),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            other => Err(Error::Invalid(format!(
                "unknown schedule `{other}` (expected one of {:?})",
                Self::NAMES
            ))),
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Constant => "constant",
            Self::Linear => "linear",
            Self::Cosine => "cosine",
        })
    }
}

/// The adapter to train (a subset of PEFT's `LoraConfig`, plus mlx-lm's `num_layers`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSettings {
    /// Rank of the update. Default 8.
    pub rank: usize,
    /// Scaling numerator (`scale = alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA). Default 16.
    pub alpha: f64,
    /// Dropout on the adapter's input while training. Default 0.
    pub dropout: f64,
    /// Modules to adapt: a list of names (`["q_proj", "v_proj"]`), a regex over the whole module
    /// path, or `"all-linear"` (every projection but the LM head). Default `"all-linear"`.
    pub targets: TargetModules,
    /// rsLoRA scaling `alpha / sqrt(rank)`. Default false.
    pub use_rslora: bool,
    /// Adapt only the last N decoder layers (mlx-lm's `num_layers`); `None` adapts every layer.
    /// Backpropagation stops at the first adapted layer, so fewer layers train faster. Default 8.
    pub num_layers: Option<usize>,
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: TargetModules::all_linear(),
            use_rslora: false,
            num_layers: Some(8),
        }
    }
}

/// Parses a `--targets` value: `all-linear`, `re:<regex>` for a regex over the module path, or a
/// comma-separated list of module names.
pub fn parse_targets(s: &str) -> Result<TargetModules> {
    let s = s.trim();
    if s.eq_ignore_ascii_case(TargetModules::ALL_LINEAR) {
        return Ok(TargetModules::all_linear());
    }
    if let Some(re) = s.strip_prefix("re:") {
        regex::Regex::new(re)
            .map_err(|e| Error::Invalid(format!("--targets regex `{re}`: {e}")))?;
        return Ok(TargetModules::Pattern(re.to_owned()));
    }
    let names: Vec<&str> = s
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() {
        return Err(Error::Invalid(
            "--targets is empty (use all-linear, re:<regex> or names like q_proj,v_proj)".into(),
        ));
    }
    Ok(TargetModules::names(&names))
}

/// Every training option. `TrainConfig::default()` holds the documented defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Peak learning rate. Default 1e-3.
    pub lr: f64,
    /// Learning-rate schedule after warmup. Default cosine.
    pub schedule: Schedule,
    /// Steps of linear warmup from `lr / warmup` up to `lr`. Default 10.
    pub warmup: usize,
    /// Where linear and cosine decay head (reached just after the last step). Default 0.
    pub min_lr: f64,
    /// Optimizer steps. Default 100.
    pub iters: usize,
    /// Sequences per micro-batch. Default 4.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (weighted by their target tokens, so that accumulating
    /// equals one large batch). Default 1.
    pub grad_accum: usize,
    /// Longer examples are truncated to this many tokens. Default 256.
    pub max_seq_len: usize,
    /// Pack several examples per row instead of padding one per row. Default false.
    pub packing: bool,
    /// Validation loss before the first step, every N steps and after the last; 0 turns
    /// validation off. Default 25.
    pub val_every: usize,
    /// Validation batches per evaluation; 0 means the whole validation set. Default 0.
    pub val_batches: usize,
    /// A checkpoint every N steps; 0 keeps only the final adapter. Default 50.
    pub save_every: usize,
    /// A log line (mean train loss, lr, speed, memory) every N steps. Default 10.
    pub steps_per_report: usize,
    /// Seeds the data order, the LoRA init and the dropout masks. Default 0.
    pub seed: u64,
    /// Clip gradients to this global L2 norm; `None` turns clipping off. Default 1.0.
    pub clip_grad_norm: Option<f64>,
    /// Decoupled weight decay (AdamW). Default 0.
    pub weight_decay: f64,
    /// Adam's moment decay rates. Default (0.9, 0.999).
    pub betas: (f64, f64),
    /// Adam's denominator epsilon. Default 1e-8.
    pub eps: f64,
    /// The adapter.
    pub lora: LoraSettings,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            schedule: Schedule::Cosine,
            warmup: 10,
            min_lr: 0.0,
            iters: 100,
            batch_size: 4,
            grad_accum: 1,
            max_seq_len: 256,
            packing: false,
            val_every: 25,
            val_batches: 0,
            save_every: 50,
            steps_per_report: 10,
            seed: 0,
            clip_grad_norm: Some(1.0),
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            eps: 1e-8,
            lora: LoraSettings::default(),
        }
    }
}

impl TrainConfig {
    /// Rejects options that cannot train, naming the option.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.iters == 0 {
            return bad("iters must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1".into());
        }
        if self.grad_accum == 0 {
            return bad("grad_accum must be at least 1".into());
        }
        if self.max_seq_len < 2 {
            return bad(format!(
                "max_seq_len {} is too small (a loss needs at least 2 tokens)",
                self.max_seq_len
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr {} must be a positive number", self.lr));
        }
        if !(self.min_lr.is_finite() && (0.0..=self.lr).contains(&self.min_lr)) {
            return bad(format!("min_lr {} must be in [0, lr]", self.min_lr));
        }
        if self.warmup >= self.iters && self.schedule != Schedule::Constant {
            return bad(format!(
                "warmup {} must be shorter than iters {} for the {} schedule",
                self.warmup, self.iters, self.schedule
            ));
        }
        if let Some(c) = self.clip_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("clip_grad_norm {c} must be positive"));
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("weight_decay {} must be >= 0", self.weight_decay));
        }
        let (b1, b2) = self.betas;
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            return bad(format!("betas ({b1}, {b2}) must be in [0, 1)"));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad(format!("eps {} must be positive", self.eps));
        }
        if self.steps_per_report == 0 {
            return bad("steps_per_report must be at least 1".into());
        }
        let l = &self.lora;
        if l.rank == 0 {
            return bad("lora rank must be at least 1".into());
        }
        if !l.alpha.is_finite() || l.alpha <= 0.0 {
            return bad(format!("lora alpha {} must be positive", l.alpha));
        }
        if !(0.0..1.0).contains(&l.dropout) {
            return bad(format!("lora dropout {} must be in [0, 1)", l.dropout));
        }
        if l.num_layers == Some(0) {
            return bad("num_layers must be at least 1 (or unset for every layer)".into());
        }
        Ok(())
    }

    /// The PEFT config of the adapter to create on `model`. `num_layers` becomes PEFT's
    /// `layers_to_transform` (with `all-linear` spelled out as the model's projection names,
    /// since PEFT ignores `layers_to_transform` for `all-linear`).
    pub fn lora_config<M: HasLinears + ?Sized>(
        &self,
        model: &M,
        num_hidden_layers: usize,
    ) -> Result<LoraConfig> {
        let l = &self.lora;
        let mut cfg = LoraConfig::new(l.rank, l.alpha, l.targets.clone());
        cfg.lora_dropout = l.dropout;
        cfg.use_rslora = l.use_rslora;
        let Some(n) = l.num_layers.filter(|&n| n < num_hidden_layers) else {
            return Ok(cfg);
        };
        let names = match &l.targets {
            TargetModules::List(names) => names.clone(),
            TargetModules::Pattern(p) if p.eq_ignore_ascii_case(TargetModules::ALL_LINEAR) => {
                let mut names: Vec<String> = Vec::new();
                for (path, _) in model.named_linears() {
                    let leaf = path.rsplit('.').next().unwrap_or(&path).to_owned();
                    if leaf != "lm_head" && !names.contains(&leaf) {
                        names.push(leaf);
                    }
                }
                names
            }
            TargetModules::Pattern(p) => {
                return Err(Error::Invalid(format!(
                    "num_layers cannot restrict the regex target `{p}` (PEFT applies \
                     layers_to_transform to name lists only): list module names, or unset num_layers"
                )))
            }
        };
        cfg.target_modules = Some(TargetModules::List(names));
        cfg.layers_to_transform = Some(crate::lora::OneOrMany::Many(
            (num_hidden_layers - n..num_hidden_layers).collect(),
        ));
        Ok(cfg)
    }

    /// The AdamW hyper-parameters at learning rate `lr`.
    pub fn adamw(&self, lr: f64) -> lorafuse_ops::AdamWParams {
        lorafuse_ops::AdamWParams {
            lr,
            beta1: self.betas.0,
            beta2: self.betas.1,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
}
