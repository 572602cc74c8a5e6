//! `LoraLinear`: a frozen [`Linear`] plus any number of named low-rank adapters.
//!
//! `y = x W^T + b + sum_i w_i * s_i * (dropout(x) A_i^T) B_i^T` over the active adapters, with
//! `A_i` `[r, in]`, `B_i` `[out, r]` and `s_i` the adapter's scale. `W` and `b` never join the
//! autograd graph (`lorafuse_ops` detaches them), so they take no gradient and no gradient memory.

use super::config::{InitLoraWeights, LoraConfig};
use super::rng::{derive_seed, mix64, SplitMix64};
use crate::models::linear::{Linear, LinearLayer};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One adapter's trainable matrices and settings.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `[r, in]`.
    pub a: Var,
    /// `[out, r]`.
    pub b: Var,
    /// The multiplier on `B A` (PEFT's `scaling`).
    pub scale: f64,
    /// Dropout probability on the adapter's input, in training mode only.
    pub dropout: f64,
    /// The config the adapter was made from, written back by `save_peft`.
    pub config: Arc<LoraConfig>,
}

impl LoraAdapter {
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `scale * B A` in f32, `[out, in]`: what merging adds to `W`.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let b = self.b.as_tensor().to_dtype(DType::F32)?;
        let a = self.a.as_tensor().to_dtype(DType::F32)?;
        Ok((b.matmul(&a)? * self.scale)?)
    }
}

/// How a new adapter is created.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdapterInit {
    pub rank: usize,
    pub scale: f64,
    pub dropout: f64,
    pub init: InitLoraWeights,
    /// dtype of `A` and `B` (f32 master weights under a bf16 model, or the model's dtype).
    pub dtype: DType,
    /// Seeds the init; the same seed gives the same matrices.
    pub seed: u64,
}

/// A linear layer with LoRA adapters. See the module docs for the formula.
#[derive(Debug)]
pub struct LoraLinear {
    base: Linear,
    adapters: Vec<(String, LoraAdapter)>,
    /// Active adapter names and weights; empty means adapters are disabled.
    active: Vec<(String, f64)>,
    /// What is currently folded into `base.weight`.
    merged: Vec<(String, f64)>,
    training: bool,
    dropout_seed: u64,
    /// Counts forwards so that every call draws a fresh, reproducible mask.
    dropout_calls: AtomicU64,
}

/// `n` values of `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`: torch's `kaiming_uniform_(a = sqrt(5))`,
/// the `nn.Linear` default that PEFT keeps for `lora_A`.
fn kaiming_uniform(rng: &mut SplitMix64, n: usize, fan_in: usize) -> Vec<f64> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    (0..n).map(|_| rng.uniform(-bound, bound)).collect()
}

impl LoraLinear {
    /// Wraps `base` with no adapters yet (forward equals the base layer).
    pub fn wrap(base: Linear) -> Self {
        Self {
            base,
            adapters: Vec::new(),
            active: Vec::new(),
            merged: Vec::new(),
            training: false,
            dropout_seed: 0,
            dropout_calls: AtomicU64::new(0),
        }
    }

    /// Wraps `base` with one active adapter `"default"` made from `cfg`'s global rank and alpha
    /// (patterns need a module path: use `apply_lora` for those), in the base weight's dtype, seed 0.
    pub fn from_base(base: Linear, cfg: &LoraConfig) -> Result<Self> {
        cfg.validate()?;
        let init = AdapterInit {
            rank: cfg.r,
            scale: super::config::scaling(cfg.lora_alpha, cfg.r, cfg.use_rslora),
            dropout: cfg.lora_dropout,
            init: cfg.init_lora_weights,
            dtype: base.weight.dtype(),
            seed: 0,
        };
        let mut layer = Self::wrap(base);
        layer.add_adapter("default", &init, Arc::new(cfg.clone()))?;
        layer.set_active(&[("default".to_owned(), 1.0)])?;
        Ok(layer)
    }

    /// Adds a freshly initialised adapter (not activated: see [`LoraLinear::set_active`]).
    pub fn add_adapter(
        &mut self,
        name: &str,
        init: &AdapterInit,
        config: Arc<LoraConfig>,
    ) -> Result<()> {
        let (out_dim, in_dim) = self.base.dims();
        let r = init.rank;
        if r == 0 {
            return Err(Error::Invalid(format!(
                "adapter `{name}`: rank must be at least 1"
            )));
        }
        let mut rng = SplitMix64::new(init.seed);
        let (a, b) = match init.init {
            InitLoraWeights::Default => (
                kaiming_uniform(&mut rng, r * in_dim, in_dim),
                vec![0.0; out_dim * r],
            ),
            InitLoraWeights::Gaussian => {
                let std = 1.0 / r as f64;
                (
                    (0..r * in_dim).map(|_| rng.normal() * std).collect(),
                    vec![0.0; out_dim * r],
                )
            }
            InitLoraWeights::Random => (
                kaiming_uniform(&mut rng, r * in_dim, in_dim),
                kaiming_uniform(&mut rng, out_dim * r, r),
            ),
        };
        let dev = self.base.weight.device();
        let a = Tensor::from_vec(a, (r, in_dim), dev)?.to_dtype(init.dtype)?;
        let b = Tensor::from_vec(b, (out_dim, r), dev)?.to_dtype(init.dtype)?;
        self.insert_adapter(name, a, b, init.scale, init.dropout, config)
    }

    /// Adds an adapter with given matrices (`a` `[r, in]`, `b` `[out, r]`), e.g. read from a file.
    pub fn insert_adapter(
        &mut self,
        name: &str,
        a: Tensor,
        b: Tensor,
        scale: f64,
        dropout: f64,
        config: Arc<LoraConfig>,
    ) -> Result<()> {
        if self.adapter(name).is_some() {
            return Err(Error::Invalid(format!(
                "adapter `{name}` already exists on this layer"
            )));
        }
        let (out_dim, in_dim) = self.base.dims();
        let r = a.dims().first().copied().unwrap_or(0);
        if a.dims() != [r, in_dim] || r == 0 {
            return Err(Error::TensorShape {
                name: format!("{name}.lora_A"),
                expected: vec![r.max(1), in_dim],
                found: a.dims().to_vec(),
            });
        }
        if b.dims() != [out_dim, r] {
            return Err(Error::TensorShape {
                name: format!("{name}.lora_B"),
                expected: vec![out_dim, r],
                found: b.dims().to_vec(),
            });
        }
        let dev = self.base.weight.device();
        let adapter = LoraAdapter {
            a: Var::from_tensor(&a.to_device(dev)?)?,
            b: Var::from_tensor(&b.to_device(dev)?)?,
            scale,
            dropout,
            config,
        };
        self.adapters.push((name.to_owned(), adapter));
        Ok(())
    }

    /// Removes an adapter (unmerging first if it is merged).
    pub fn remove_adapter(&mut self, name: &str) -> Result<bool> {
        if self.merged.iter().any(|(n, _)| n == name) {
            self.unmerge()?;
        }
        self.active.retain(|(n, _)| n != name);
        let before = self.adapters.len();
        self.adapters.retain(|(n, _)| n != name);
        Ok(self.adapters.len() != before)
    }

    pub fn adapter(&self, name: &str) -> Option<&LoraAdapter> {
        self.adapters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
    }

    /// All adapters in insertion order.
    pub fn adapters(&self) -> impl Iterator<Item = (&str, &LoraAdapter)> {
        self.adapters.iter().map(|(n, a)| (n.as_str(), a))
    }

    /// The active adapters and their weights (empty: disabled).
    pub fn active(&self) -> &[(String, f64)] {
        &self.active
    }

    /// Sets the active adapters and their weights; names this layer lacks are skipped in forward
    /// (an adapter may target only some modules). Unmerges first if anything is merged, so that
    /// the output always reflects the active set.
    pub fn set_active(&mut self, active: &[(String, f64)]) -> Result<()> {
        if !self.merged.is_empty() && self.merged != active {
            self.unmerge()?;
        }
        self.active = active.to_vec();
        Ok(())
    }

    /// Training mode turns dropout on.
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Restarts the dropout mask stream from `seed` (a trainer reseeds per step so that a resumed
    /// run draws the same masks).
    pub fn reseed_dropout(&mut self, seed: u64) {
        self.dropout_seed = seed;
        self.dropout_calls.store(0, Ordering::Relaxed);
    }

    /// Whether any adapter is folded into the base weight.
    pub fn is_merged(&self) -> bool {
        !self.merged.is_empty()
    }

    /// Folds the active adapters into `W` (`W += w * s * B A`, computed in f32 and cast back), so
    /// that forward costs one GEMM. Merging is exact only up to the weight dtype's rounding.
    pub fn merge(&mut self) -> Result<()> {
        if !self.merged.is_empty() {
            return Ok(());
        }
        let present: Vec<(String, f64)> = self
            .active
            .iter()
            .filter(|(n, _)| self.adapter(n).is_some())
            .cloned()
            .collect();
        self.apply_delta(&present, 1.0)?;
        self.merged = self.active.clone();
        Ok(())
    }

    /// Subtracts what [`LoraLinear::merge`] added.
    pub fn unmerge(&mut self) -> Result<()> {
        if self.merged.is_empty() {
            return Ok(());
        }
        let merged = std::mem::take(&mut self.merged);
        let present: Vec<(String, f64)> = merged
            .into_iter()
            .filter(|(n, _)| self.adapter(n).is_some())
            .collect();
        self.apply_delta(&present, -1.0)
    }

    fn apply_delta(&mut self, adapters: &[(String, f64)], sign: f64) -> Result<()> {
        if adapters.is_empty() {
            return Ok(());
        }
        let dtype = self.base.weight.dtype();
        let mut w = self.base.weight.to_dtype(DType::F32)?;
        for (name, weight) in adapters {
            if let Some(a) = self.adapter(name) {
                w = (w + (a.delta_weight()? * (sign * weight))?)?;
            }
        }
        self.base.weight = w.to_dtype(dtype)?;
        Ok(())
    }

    /// The base layer (with merged adapters folded in, if merged).
    pub fn into_base(self) -> Linear {
        self.base
    }

    /// Inverted dropout with a reproducible mask (`x * mask / (1 - p)`). On CPU the mask comes
    /// from this layer's seeded stream; elsewhere from the device RNG (seed it with
    /// `Device::set_seed`), since drawing it on the host and copying would dominate a GPU step.
    fn dropout(&self, x: &Tensor, p: f64, salt: u64) -> candle_core::Result<Tensor> {
        let keep = 1.0 / (1.0 - p);
        let mask = if x.device().is_cpu() {
            let call = self.dropout_calls.load(Ordering::Relaxed);
            let mut rng = SplitMix64::new(mix64(self.dropout_seed ^ mix64(call ^ (salt << 40))));
            let p32 = p as f32;
            let m: Vec<f32> = (0..x.elem_count())
                .map(|_| {
                    if rng.next_f32() >= p32 {
                        keep as f32
                    } else {
                        0.0
                    }
                })
                .collect();
            Tensor::from_vec(m, x.shape(), x.device())?.to_dtype(x.dtype())?
        } else {
            let u = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
            (u.ge(p)?.to_dtype(x.dtype())? * keep)?
        };
        x.mul(&mask)
    }
}

impl LinearLayer for LoraLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let live: Vec<(&LoraAdapter, f64)> = if self.merged.is_empty() {
            self.active
                .iter()
                .filter_map(|(n, w)| self.adapter(n).map(|a| (a, *w)))
                .collect()
        } else {
            Vec::new()
        };
        // Inference on a quantized base (`models::quantized`): the base product from the
        // quantized copy, each adapter's delta on top in its own dtype. Training stays dense.
        if !self.training {
            if let Some(mut y) = self.base.forward_quantized(x)? {
                for (a, weight) in &live {
                    let xa = x.to_dtype(a.a.dtype())?;
                    let (la, lb) = (a.a.as_tensor(), a.b.as_tensor());
                    let d = lorafuse_ops::lora_delta(&xa, la, lb, a.scale * weight)?;
                    let d = d.to_dtype(y.dtype())?;
                    y = (y + d)?;
                }
                return Ok(y);
            }
        }
        let w = &self.base.weight;
        let bias = self.base.bias.as_ref();
        let dropping = |a: &LoraAdapter| self.training && a.dropout > 0.0;
        if let [(a, weight)] = live.as_slice() {
            if !dropping(a) && a.a.dtype() == x.dtype() {
                return lorafuse_ops::lora_linear(
                    x,
                    w,
                    bias,
                    a.a.as_tensor(),
                    a.b.as_tensor(),
                    a.scale * weight,
                );
            }
            // f32 master weights under a half-precision model on a GPU: the (small) factors are
            // cast to the activations' dtype instead of the (large) activations to f32. The GEMMs
            // still accumulate in f32 and the `Var`s get f32 gradients. This avoids an f32 copy
            // of every adapter input kept for the backward, the f32 delta and its cast back, and
            // f32 gradient copies of the same size (the op does the casts itself where it can).
            if !dropping(a) && half_on_gpu(x, a) {
                let (la, lb) = (a.a.as_tensor(), a.b.as_tensor());
                return lorafuse_ops::lora_linear(x, w, bias, la, lb, a.scale * weight);
            }
        }
        let mut y = lorafuse_ops::frozen_linear(x, w, bias)?;
        for (i, (a, weight)) in live.iter().enumerate() {
            // As PEFT: the LoRA path runs in the adapter's dtype, the result is cast back.
            let mut xa = x.to_dtype(a.a.dtype())?;
            if dropping(a) {
                xa = self.dropout(&xa, a.dropout, i as u64)?;
            }
            let d =
                lorafuse_ops::lora_delta(&xa, a.a.as_tensor(), a.b.as_tensor(), a.scale * weight)?;
            let d = d.to_dtype(y.dtype())?;
            y = (y + d)?;
        }
        if live.iter().any(|(a, _)| dropping(a)) {
            self.dropout_calls.fetch_add(1, Ordering::Relaxed);
        }
        Ok(y)
    }
    fn base(&self) -> &Linear {
        &self.base
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    fn is_plain(&self) -> bool {
        // Merged adapters live in `base.weight`; otherwise no active adapter may exist.
        !self.merged.is_empty() || self.active.iter().all(|(n, _)| self.adapter(n).is_none())
    }
}

/// True for a bf16/f16 input on a GPU with an f32 adapter: the case where the adapter's factors
/// are cast down rather than the input up. The CPU keeps PEFT's f32 LoRA path.
fn half_on_gpu(x: &Tensor, a: &LoraAdapter) -> bool {
    !x.device().is_cpu()
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && a.a.dtype() == DType::F32
        && a.b.dtype() == DType::F32
}

/// The init seed of adapter `name` on module `path`: independent of module visiting order.
pub fn module_seed(seed: u64, name: &str, path: &str) -> u64 {
    derive_seed(seed, &format!("{name}\u{0}{path}"))
}
