//! The BERT encoder (all-MiniLM, BGE, E5), as Hugging Face transformers' `BertModel` computes it:
//! word + position + token-type embeddings, then post-LayerNorm transformer layers with
//! bidirectional attention under a padding mask. LayerNorm and softmax go through the fused ops of
//! `lorafuse-ops`; every projection is a [`LinearSlot`] named by its checkpoint path so that
//! adapters can take its place.

use crate::error::read_json;
use crate::models::linear::{Linear, LinearSlot};
use crate::{Error, Result};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use serde::Deserialize;
use std::mem::MaybeUninit;
use std::path::Path;

/// The activation between the two feed-forward projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenAct {
    /// `gelu` in transformers: the exact erf form.
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    Relu,
}

/// A BERT encoder's shape and numerics, from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: HiddenAct,
}

#[derive(Deserialize)]
struct RawBertConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: Option<usize>,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    position_embedding_type: Option<String>,
}

impl BertConfig {
    /// Reads a Hugging Face `config.json`; anything but `model_type: bert` with absolute position
    /// embeddings is refused with the file and key named.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let raw: serde_json::Value = read_json(path)?;
        Self::from_value(raw, path)
    }

    /// Parses a config from JSON text; `origin` names it in errors.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self> {
        let raw: serde_json::Value = serde_json::from_str(text).map_err(|source| Error::Json {
            path: origin.to_path_buf(),
            source,
        })?;
        Self::from_value(raw, origin)
    }

    fn from_value(value: serde_json::Value, path: &Path) -> Result<Self> {
        // The architecture is checked before the fields so that a decoder's config reports
        // "unsupported architecture" rather than a missing BERT key.
        match value.get("model_type").and_then(|v| v.as_str()) {
            Some("bert") => {}
            Some(other) => {
                return Err(Error::Architecture {
                    path: path.to_path_buf(),
                    arch: format!("model_type: {other}"),
                    supported: "bert",
                })
            }
            None => {
                return Err(Error::key(
                    path,
                    "model_type",
                    "missing (expected \"bert\")",
                ))
            }
        }
        let raw: RawBertConfig = serde_json::from_value(value).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        if let Some(kind) = raw.position_embedding_type.as_deref() {
            if kind != "absolute" {
                return Err(Error::key(
                    path,
                    "position_embedding_type",
                    format!("`{kind}` is not supported (only absolute)"),
                ));
            }
        }
        if raw.num_attention_heads == 0 || !raw.hidden_size.is_multiple_of(raw.num_attention_heads)
        {
            return Err(Error::key(
                path,
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    raw.num_attention_heads, raw.hidden_size
                ),
            ));
        }
        let hidden_act = match raw.hidden_act.as_deref().unwrap_or("gelu") {
            "gelu" => HiddenAct::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => HiddenAct::GeluTanh,
            "relu" => HiddenAct::Relu,
            other => {
                return Err(Error::key(
                    path,
                    "hidden_act",
                    format!("`{other}` is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu)"),
                ))
            }
        };
        Ok(BertConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            intermediate_size: raw.intermediate_size,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(512),
            type_vocab_size: raw.type_vocab_size.unwrap_or(2),
            layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-12),
            hidden_act,
        })
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// LayerNorm with gain and bias, through `lorafuse_ops::layer_norm`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    fn load(vb: &VarBuilder, dim: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        lorafuse_ops::layer_norm(x, &self.weight, Some(&self.bias), self.eps)
    }
}

/// Word, position and token-type embeddings, summed and normalised.
#[derive(Debug)]
pub struct BertEmbeddings {
    word: candle_nn::Embedding,
    position: Tensor,
    token_type: Tensor,
    norm: LayerNorm,
}

impl BertEmbeddings {
    fn load(vb: &VarBuilder, cfg: &BertConfig) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let word = vb.get((cfg.vocab_size, h), "word_embeddings.weight")?;
        Ok(Self {
            word: candle_nn::Embedding::new(word, h),
            position: vb.get(
                (cfg.max_position_embeddings, h),
                "position_embeddings.weight",
            )?,
            token_type: vb.get((cfg.type_vocab_size, h), "token_type_embeddings.weight")?,
            norm: LayerNorm::load(&vb.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
        })
    }

    fn forward(
        &self,
        ids: &Tensor,
        token_type_ids: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let words = self.word.forward(ids)?;
        let positions = self.position.narrow(0, 0, t)?;
        let x = words.broadcast_add(&positions)?;
        // Single sentences have token type 0 everywhere: one broadcast row instead of a gather.
        let x = match token_type_ids {
            Some(tt) => {
                (x + candle_nn::Embedding::new(self.token_type.clone(), self.token_type.dim(1)?)
                    .forward(tt)?)?
            }
            None => x.broadcast_add(&self.token_type.narrow(0, 0, 1)?)?,
        };
        self.norm.forward(&x)
    }
}

/// One post-LayerNorm transformer layer.
#[derive(Debug)]
pub struct BertLayer {
    query: LinearSlot,
    key: LinearSlot,
    value: LinearSlot,
    attn_out: LinearSlot,
    attn_norm: LayerNorm,
    intermediate: LinearSlot,
    output: LinearSlot,
    out_norm: LayerNorm,
    heads: usize,
    act: HiddenAct,
}

impl BertLayer {
    fn load(vb: &VarBuilder, cfg: &BertConfig) -> candle_core::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let lin = |path: &str, inp, out| {
            Linear::load(&vb.pp(path), inp, out, true).map(Linear::into_slot)
        };
        Ok(Self {
            query: lin("attention.self.query", h, h)?,
            key: lin("attention.self.key", h, h)?,
            value: lin("attention.self.value", h, h)?,
            attn_out: lin("attention.output.dense", h, h)?,
            attn_norm: LayerNorm::load(
                &vb.pp("attention.output.LayerNorm"),
                h,
                cfg.layer_norm_eps,
            )?,
            intermediate: lin("intermediate.dense", h, i)?,
            output: lin("output.dense", i, h)?,
            out_norm: LayerNorm::load(&vb.pp("output.LayerNorm"), h, cfg.layer_norm_eps)?,
            heads: cfg.num_attention_heads,
            act: cfg.hidden_act,
        })
    }

    /// `x [b, t, h]`; `mask` is additive, `[b, t]`, or `None` when nothing is padded.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (_, _, h) = x.dims3()?;
        let scale = 1.0 / ((h / self.heads) as f64).sqrt();
        let ctx = lorafuse_ops::encoder_attention(
            &self.query.forward(x)?,
            &self.key.forward(x)?,
            &self.value.forward(x)?,
            mask,
            self.heads,
            scale,
        )?;
        let x = self
            .attn_norm
            .forward(&(self.attn_out.forward(&ctx)? + x)?)?;
        let inner = self.intermediate.forward(&x)?;
        let inner = match self.act {
            HiddenAct::Gelu => gelu_erf(&inner)?,
            HiddenAct::GeluTanh => inner.gelu()?,
            HiddenAct::Relu => inner.relu()?,
        };
        self.out_norm.forward(&(self.output.forward(&inner)? + x)?)
    }
}

/// The BERT encoder: token ids in, last hidden states out. Sentence-transformers pools the token
/// states itself, so the pooler never runs here; its projection is still kept as the slot
/// `pooler.dense`, because PEFT's suffix matching makes a `dense` target wrap it and adapters
/// saved from a `BertModel` carry its `lora_A`/`lora_B`.
#[derive(Debug)]
pub struct BertModel {
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    pooler: LinearSlot,
    cfg: BertConfig,
    dtype: DType,
    device: Device,
}

impl BertModel {
    /// Builds the encoder from `vb`, whose names are the checkpoint's without any `bert.` prefix
    /// (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`, ...).
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> candle_core::Result<Self> {
        let embeddings = BertEmbeddings::load(&vb.pp("embeddings"), cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BertLayer::load(&vb.pp(format!("encoder.layer.{i}")), cfg))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let h = cfg.hidden_size;
        // transformers' `BertModel` has a pooler even when the checkpoint lacks its weights (it
        // initialises them randomly), so PEFT may have attached an adapter to it. It never runs
        // here: zeros stand in for weights the checkpoint does not have.
        let pooler = if vb.contains_tensor("pooler.dense.weight") {
            Linear::load(&vb.pp("pooler.dense"), h, h, true)?
        } else {
            let zeros = |shape: &[usize]| Tensor::zeros(shape, vb.dtype(), vb.device());
            Linear::new(zeros(&[h, h])?, Some(zeros(&[h])?))
        }
        .into_slot();
        Ok(Self {
            embeddings,
            layers,
            pooler,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// The dtype of the weights and hidden states.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Last hidden states `[b, t, hidden]` for `input_ids [b, t]` (u32). `attention_mask [b, t]`
    /// (1 for real tokens, 0 for padding, any dtype) may be `None` when no row is padded;
    /// `token_type_ids` `None` means all zeros.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence of {t} tokens exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            );
        }
        let mask = attention_mask.map(|m| self.additive_mask(m)).transpose()?;
        let mut x = self.embeddings.forward(input_ids, token_type_ids)?;
        for layer in &self.layers {
            x = layer.forward(&x, mask.as_ref())?;
        }
        Ok(x)
    }

    /// `(1 - mask) * dtype_min` shaped `[b, t]`, as transformers builds it, so that padded keys
    /// get zero attention weight.
    fn additive_mask(&self, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = mask.dims2()?;
        let min = match self.dtype {
            DType::F16 => f64::from(half::f16::MIN),
            DType::BF16 => f64::from(half::bf16::MIN),
            DType::F64 => f64::MIN,
            _ => f64::from(f32::MIN),
        };
        let keep = mask.to_dtype(DType::F32)?;
        let add = ((1.0 - keep)? * min)?;
        add.to_dtype(self.dtype)?.reshape((b, t))
    }

    /// Every projection with its checkpoint path (`encoder.layer.0.attention.self.query`, ...,
    /// then `pooler.dense`, which never runs: see [`BertModel`]), in the order of transformers'
    /// `named_modules`, for adapters to wrap.
    pub fn named_linears_mut(&mut self) -> Vec<(String, &mut LinearSlot)> {
        let mut out = Vec::with_capacity(self.layers.len() * 6 + 1);
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("encoder.layer.{i}");
            out.push((format!("{p}.attention.self.query"), &mut l.query));
            out.push((format!("{p}.attention.self.key"), &mut l.key));
            out.push((format!("{p}.attention.self.value"), &mut l.value));
            out.push((format!("{p}.attention.output.dense"), &mut l.attn_out));
            out.push((format!("{p}.intermediate.dense"), &mut l.intermediate));
            out.push((format!("{p}.output.dense"), &mut l.output));
        }
        out.push(("pooler.dense".to_owned(), &mut self.pooler));
        out
    }

    /// Every projection with its checkpoint path, as [`BertModel::named_linears_mut`] lists them.
    pub fn named_linears(&self) -> Vec<(String, &LinearSlot)> {
        let mut out = Vec::with_capacity(self.layers.len() * 6 + 1);
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("encoder.layer.{i}");
            out.push((format!("{p}.attention.self.query"), &l.query));
            out.push((format!("{p}.attention.self.key"), &l.key));
            out.push((format!("{p}.attention.self.value"), &l.value));
            out.push((format!("{p}.attention.output.dense"), &l.attn_out));
            out.push((format!("{p}.intermediate.dense"), &l.intermediate));
            out.push((format!("{p}.output.dense"), &l.output));
        }
        out.push(("pooler.dense".to_owned(), &self.pooler));
        out
    }
}

impl crate::lora::HasLinears for BertModel {
    fn named_linears_mut(&mut self) -> Vec<(String, &mut LinearSlot)> {
        BertModel::named_linears_mut(self)
    }
    fn named_linears(&self) -> Vec<(String, &LinearSlot)> {
        BertModel::named_linears(self)
    }
    /// PEFT's default for `bert` (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
    fn default_lora_targets(&self) -> Vec<String> {
        vec!["query".to_owned(), "value".to_owned()]
    }
}

/// Exact (erf) GELU, `0.5 x (1 + erf(x / sqrt 2))`. On the CPU in f32 a multi-threaded kernel
/// with a rational erf replaces Candle's scalar libm `erff`, which took a tenth of the encoder's
/// time; elsewhere (and under `LORAFUSE_KERNELS=reference`) Candle's `gelu_erf`. Both have a
/// backward, so LoRA training through the encoder keeps its gradient.
fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    let fused = lorafuse_ops::kernel_mode() == lorafuse_ops::KernelMode::Fused;
    if fused && x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(GeluErfCpu)
    } else {
        x.gelu_erf()
    }
}

/// `erf` for f32 as a rational function on [-4, 4] (Eigen's `generic_fast_erf_float`; absolute
/// error under 5e-7 there), saturating outside, where `erf` rounds to +-1 in f32. Branch-free,
/// so that the loop over a tensor vectorises.
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p - 2.101_024e-6;
    p = x2 * p - 5.692_506_4e-5;
    p = x2 * p - 7.349_906_3e-4;
    p = x2 * p - 2.954_600_1e-3;
    p = x2 * p - 1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 - 2.133_740_6e-4;
    q = x2 * q - 1.682_827e-3;
    q = x2 * q - 7.373_329_3e-3;
    q = x2 * q - 1.426_474e-2;
    x * p / q
}

#[inline(always)]
fn gelu_f32(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

super::simd::wide_fn!(
    /// `o[i] = gelu(x[i])`.
    fn gelu_into(o: &mut [MaybeUninit<f32>], x: &[f32]) => gelu_into_body
);

#[inline(always)]
fn gelu_into_body(o: &mut [MaybeUninit<f32>], x: &[f32]) {
    for (o, &v) in o.iter_mut().zip(x) {
        o.write(gelu_f32(v));
    }
}

/// The CPU f32 GELU as a Candle op (forward kernel, backward from stock ops).
struct GeluErfCpu;

impl CustomOp1 for GeluErfCpu {
    fn name(&self) -> &'static str {
        "bert_gelu_erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("bert_gelu_erf: input must be contiguous, layout {l:?}");
        };
        let src = &s.as_slice::<f32>()?[start..end];
        let n = src.len();
        let mut out: Vec<f32> = Vec::with_capacity(n);
        // Below this many elements, handing work to other threads costs more than it saves.
        const PAR_MIN: usize = 1 << 16;
        const CHUNK: usize = 1 << 14;
        let dst = &mut out.spare_capacity_mut()[..n];
        if n < PAR_MIN {
            gelu_into(dst, src);
        } else {
            dst.par_chunks_mut(CHUNK)
                .zip(src.par_chunks(CHUNK))
                .for_each(|(o, x)| gelu_into(o, x));
        }
        // SAFETY: both branches wrote every one of the first `n` slots.
        unsafe { out.set_len(n) };
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// `d gelu / dx = Phi(x) + x phi(x)`.
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let cdf = (((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5)?;
        let inv_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
        let pdf = ((x.sqr()? * -0.5)?.exp()? * inv_sqrt_2pi)?;
        Ok(Some(grad.mul(&(cdf + x.mul(&pdf)?)?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_erf_matches_libm_erf_within_5e_7() {
        let mut worst = 0f64;
        for i in -80_000..=80_000 {
            let x = i as f32 * 1e-4; // [-8, 8]
            let want = candle_core::cpu::erf::erf_f64(f64::from(x));
            worst = worst.max((f64::from(erf_f32(x)) - want).abs());
        }
        assert!(worst < 5e-7, "max abs error {worst}");
    }

    #[test]
    fn cpu_gelu_matches_candle_gelu_erf_and_its_gradient() {
        let x = Tensor::arange(-600f32, 600., &Device::Cpu).unwrap();
        let x = (x * 0.01).unwrap().reshape((3, 400)).unwrap();
        let ours = gelu_erf(&x).unwrap();
        let want = x.gelu_erf().unwrap();
        let diff = (ours - want).unwrap().abs().unwrap().max_all().unwrap();
        // |x| <= 6 here: 0.5 |x| times erf's error.
        assert!(diff.to_scalar::<f32>().unwrap() < 2e-6);
        // Backward against central finite differences in f64.
        let var = candle_core::Var::from_tensor(&x).unwrap();
        let grads = gelu_erf(var.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let gelu64 = |v: f64| 0.5 * v * (1.0 + candle_core::cpu::erf::erf_f64(v / 2f64.sqrt()));
        for (&v, &gv) in xs.iter().zip(&g) {
            let h = 1e-5;
            let fd = (gelu64(f64::from(v) + h) - gelu64(f64::from(v) - h)) / (2.0 * h);
            assert!(
                (f64::from(gv) - fd).abs() < 1e-5,
                "x {v}: grad {gv} vs {fd}"
            );
        }
    }
}
