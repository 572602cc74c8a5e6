//! One decoder for the whole Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5), configured by
//! [`LlamaConfig`]: grouped-query attention, QKV bias, tied or separate LM head, RoPE with optional
//! Llama 3 scaling, RMSNorm and SwiGLU, all through `lorafuse_ops`.
//!
//! Module paths (`model.layers.N.self_attn.q_proj`, ...) are the checkpoint's own names, so adapters
//! find their targets by the same strings PEFT writes.

use super::linear::{Linear, LinearSlot};
use crate::config::{LlamaConfig, RopeScaling};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use lorafuse_ops::{DecoderWeights, FusedDecoder, LayerWeights, RopeLayout};

/// Cosine and sine tables for every position up to the context length, `[max_pos, head_dim / 2]`,
/// kept in f32 and cast per call (transformers computes them in f32 too).
#[derive(Debug, Clone)]
struct RotaryTables {
    /// f32, as transformers computes them (the fused decode step takes these).
    cos: Tensor,
    sin: Tensor,
    /// The same in the model's dtype, cast once here: transformers casts its f32 tables to the
    /// activations' dtype for every call, which is what each RoPE call would otherwise pay too
    /// (two casts per call, four per layer).
    cos_model: Tensor,
    sin_model: Tensor,
}

/// The inverse frequencies of RoPE, with Llama 3 or linear scaling applied.
fn inverse_frequencies(cfg: &LlamaConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64))
        .collect();
    match &cfg.rope_scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl RotaryTables {
    fn new(cfg: &LlamaConfig, device: &Device, dtype: DType) -> candle_core::Result<Self> {
        let inv = inverse_frequencies(cfg);
        let half = inv.len();
        let n = cfg.max_position_embeddings;
        // f32 products as transformers forms them (inv_freq f32 times positions f32).
        let inv32: Vec<f32> = inv.iter().map(|&f| f as f32).collect();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for &f in &inv32 {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (n, half), device)?;
        let sin = Tensor::from_vec(sin, (n, half), device)?;
        Ok(Self {
            cos_model: cos.to_dtype(dtype)?,
            sin_model: sin.to_dtype(dtype)?,
            cos,
            sin,
        })
    }

    /// Positions `offset..offset + len` of the tables in the model's dtype.
    fn slice(&self, offset: usize, len: usize) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.cos_model.narrow(0, offset, len)?,
            self.sin_model.narrow(0, offset, len)?,
        ))
    }
}

/// Per-layer key/value cache for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<candle_nn::kv_cache::KvCache>,
}

impl KvCache {
    /// An empty cache for `layers` layers that starts with room for `capacity` positions and
    /// grows as needed.
    pub fn new(layers: usize, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            layers: (0..layers)
                .map(|_| candle_nn::kv_cache::KvCache::new(2, capacity))
                .collect(),
        }
    }

    /// Number of positions already cached.
    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .map(|l| l.k_cache().current_seq_len())
            .unwrap_or(0)
    }

    /// Empties the cache, keeping nothing.
    pub fn reset(&mut self) {
        for l in &mut self.layers {
            l.reset();
        }
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: LinearSlot,
    k_proj: LinearSlot,
    v_proj: LinearSlot,
    o_proj: LinearSlot,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &LlamaConfig) -> candle_core::Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let q_out = cfg.num_attention_heads * hd;
        let kv_out = cfg.num_key_value_heads * hd;
        let bias = cfg.attention_bias;
        Ok(Self {
            q_proj: Linear::load(&vb.pp("q_proj"), h, q_out, bias)?.into_slot(),
            k_proj: Linear::load(&vb.pp("k_proj"), h, kv_out, bias)?.into_slot(),
            v_proj: Linear::load(&vb.pp("v_proj"), h, kv_out, bias)?.into_slot(),
            o_proj: Linear::load(&vb.pp("o_proj"), q_out, h, false)?.into_slot(),
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
        })
    }

    /// `x` is `[b * t, hidden]` (rows of `b` sequences of `t` positions); so is the result.
    fn forward(
        &self,
        x: &Tensor,
        (b, t): (usize, usize),
        rope: (&Tensor, &Tensor),
        cache: Option<&mut candle_nn::kv_cache::KvCache>,
    ) -> candle_core::Result<Tensor> {
        let split = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
            y.reshape((b, t, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward(x)?, self.heads)?;
        let k = split(self.k_proj.forward(x)?, self.kv_heads)?;
        let v = split(self.v_proj.forward(x)?, self.kv_heads)?;
        let q = lorafuse_ops::rope(&q, rope.0, rope.1, RopeLayout::HalfRotation)?;
        let k = lorafuse_ops::rope(&k, rope.0, rope.1, RopeLayout::HalfRotation)?;
        let (k, v) = match cache {
            // The cache returns views into its buffer; the attention op makes its operands
            // contiguous itself (one copy of the cached keys and values per step).
            Some(c) => c.append(&k, &v)?,
            None => (k, v),
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let y = lorafuse_ops::causal_attention(&q, &k, &v, scale)?;
        let y = y
            .transpose(1, 2)?
            .reshape((b * t, self.heads * self.head_dim))?;
        self.o_proj.forward(&y)
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: LinearSlot,
    up_proj: LinearSlot,
    down_proj: LinearSlot,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &LlamaConfig) -> candle_core::Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: Linear::load(&vb.pp("gate_proj"), h, i, bias)?.into_slot(),
            up_proj: Linear::load(&vb.pp("up_proj"), h, i, bias)?.into_slot(),
            down_proj: Linear::load(&vb.pp("down_proj"), i, h, bias)?.into_slot(),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let act = lorafuse_ops::swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&act)
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    self_attn: Attention,
    mlp: Mlp,
}

/// The Llama-family decoder.
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: LinearSlot,
    rope: RotaryTables,
    dtype: DType,
    device: Device,
}

impl Llama {
    /// Builds the decoder from checkpoint tensors named as in Hugging Face checkpoints
    /// (`model.embed_tokens.weight`, `model.layers.N...`, `model.norm.weight`, `lm_head.weight`).
    /// A missing tensor or a tensor of the wrong shape is an error naming it.
    pub fn load(vb: VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let m = vb.pp("model");
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed_tokens = m.get((v, h), "embed_tokens.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = m.pp(format!("layers.{i}"));
                Ok(DecoderLayer {
                    input_layernorm: l.get(h, "input_layernorm.weight")?,
                    post_attention_layernorm: l.get(h, "post_attention_layernorm.weight")?,
                    self_attn: Attention::load(l.pp("self_attn"), cfg)?,
                    mlp: Mlp::load(l.pp("mlp"), cfg)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = m.get(h, "norm.weight")?;
        // Some tied checkpoints still carry lm_head.weight; the flag decides, as in transformers.
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.clone(), None)
        } else {
            Linear::load(&vb.pp("lm_head"), h, v, false)?
        };
        Ok(Self {
            rope: RotaryTables::new(cfg, vb.device(), vb.dtype())?,
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head: lm_head.into_slot(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The input embedding matrix `[vocab, hidden]`.
    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// A KV cache sized for `capacity` positions (it grows if exceeded).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers, capacity)
    }

    /// Final normalised hidden states `[b, t, hidden]` for `input_ids` (`[b, t]`, u32). With a
    /// cache, the ids continue the cached sequence and their keys/values are appended.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        // On the CPU the whole pass runs on a worker of Candle's pool: the ops' parallel sections
        // then start on a pool thread instead of each handing off from (and blocking) the
        // caller's thread, ~200 hand-offs per decode step that cost a wake-up each.
        self.device
            .with_context(|| self.hidden_states(input_ids, cache))
    }

    /// [`Llama::forward_hidden`] flattened to `[b * t, hidden]` rows, without a cache: what a
    /// training loss reads (the rows go straight to the LM head, with no reshape in the graph).
    pub fn forward_hidden_rows(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.device
            .with_context(|| self.hidden_rows(input_ids, None))
    }

    /// [`Llama::forward_hidden`] without the device context.
    fn hidden_states(&self, input_ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let rows = self.hidden_rows(input_ids, cache)?;
        Ok(rows.reshape((b, t, self.cfg.hidden_size))?)
    }

    /// The final normalised hidden states as `[b * t, hidden]` rows. The whole stack runs on rows
    /// (every op but attention is row-wise), so that no layer adds reshapes to the autograd graph.
    fn hidden_rows(&self, input_ids: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let offset = cache.as_ref().map(|c| c.seq_len()).unwrap_or(0);
        if offset + t > self.cfg.max_position_embeddings {
            return Err(Error::ContextOverflow {
                tokens: offset + t,
                context: self.cfg.max_position_embeddings,
            });
        }
        let (cos, sin) = self.rope.slice(offset, t)?;
        let ids = input_ids.flatten_all()?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?;
        let eps = self.cfg.rms_norm_eps;
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let normed = lorafuse_ops::rms_norm(&x, &layer.input_layernorm, eps)?;
            let attn = layer
                .self_attn
                .forward(&normed, (b, t), (&cos, &sin), layer_cache)?;
            let (resid, normed) =
                lorafuse_ops::add_rms_norm(&attn, &x, &layer.post_attention_layernorm, eps)?;
            x = (layer.mlp.forward(&normed)? + resid)?;
        }
        Ok(lorafuse_ops::rms_norm(&x, &self.norm, eps)?)
    }

    /// Logits `[b, t, vocab]` for every position.
    pub fn forward(&self, input_ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.device.with_context(|| {
            let h = self.hidden_states(input_ids, cache)?;
            Ok(self.lm_head.forward(&h)?)
        })
    }

    /// Logits `[b, vocab]` of the last position only: generation needs nothing else, and skipping
    /// the LM head for the other prompt positions saves most of a prefill's head GEMM.
    pub fn forward_last(&self, input_ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.device.with_context(|| {
            let h = self.hidden_states(input_ids, cache)?;
            let t = h.dim(1)?;
            let last = h.narrow(1, t - 1, 1)?.squeeze(1)?;
            Ok(self.lm_head.forward(&last)?)
        })
    }

    /// A fused batch-1 decode engine over this model's weights with a KV cache of `capacity`
    /// positions (see `lorafuse_ops::fused_decode`), holding the keys and values already in
    /// `cache` (e.g. after a prefill), so that its next step is position `cache.seq_len()`.
    /// `None` where it does not apply: not on CUDA, reference kernels forced, a projection with a
    /// live (unmerged) LoRA adapter, or shapes the kernels do not take. Callers then go on with
    /// [`Llama::forward_last`] and `cache` as usual.
    pub fn fused_decoder(&self, cache: &KvCache, capacity: usize) -> Result<Option<FusedDecoder>> {
        if !self.device.is_cuda() || !self.named_linears().iter().all(|(_, s)| s.is_plain()) {
            return Ok(None);
        }
        let base = |s: &LinearSlot| s.base().clone();
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                let (q, k, v, o) = (
                    base(&a.q_proj),
                    base(&a.k_proj),
                    base(&a.v_proj),
                    base(&a.o_proj),
                );
                let (g, u, d) = (base(&m.gate_proj), base(&m.up_proj), base(&m.down_proj));
                LayerWeights {
                    input_norm: l.input_layernorm.clone(),
                    q: q.weight,
                    k: k.weight,
                    v: v.weight,
                    q_bias: q.bias,
                    k_bias: k.bias,
                    v_bias: v.bias,
                    o: o.weight,
                    o_bias: o.bias,
                    post_norm: l.post_attention_layernorm.clone(),
                    gate: g.weight,
                    up: u.weight,
                    down: d.weight,
                    gate_bias: g.bias,
                    up_bias: u.bias,
                    down_bias: d.bias,
                }
            })
            .collect();
        let head = self.lm_head.base();
        if head.bias.is_some() {
            return Ok(None);
        }
        let weights = DecoderWeights {
            embed: self.embed_tokens.clone(),
            layers,
            norm: self.norm.clone(),
            lm_head: head.weight.clone(),
            rope_cos: self.rope.cos.clone(),
            rope_sin: self.rope.sin.clone(),
            rms_norm_eps: self.cfg.rms_norm_eps,
            heads: self.cfg.num_attention_heads,
            kv_heads: self.cfg.num_key_value_heads,
            head_dim: self.cfg.head_dim,
        };
        let Some(mut decoder) = FusedDecoder::new(weights, capacity)? else {
            return Ok(None);
        };
        for (i, layer) in cache.layers.iter().enumerate() {
            let (Some(k), Some(v)) = (layer.k()?, layer.v()?) else {
                continue;
            };
            // [1, kv_heads, t, head_dim] -> [t, kv_heads, head_dim]
            let k = k.squeeze(0)?.transpose(0, 1)?;
            let v = v.squeeze(0)?.transpose(0, 1)?;
            decoder.load_prefix(i, &k, &v)?;
        }
        Ok(Some(decoder))
    }

    /// The LM head, applied to hidden states (chunked losses call it per chunk).
    pub fn lm_head(&self) -> &LinearSlot {
        &self.lm_head
    }

    /// Every linear projection by its checkpoint path, for adapters.
    pub fn named_linears(&self) -> Vec<(String, &LinearSlot)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7 + 1);
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &l.self_attn;
            let m = &l.mlp;
            out.push((format!("{p}.self_attn.q_proj"), &a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &a.o_proj));
            out.push((format!("{p}.mlp.gate_proj"), &m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &m.down_proj));
        }
        out.push(("lm_head".to_string(), &self.lm_head));
        out
    }

    /// Mutable access to every linear projection by its checkpoint path.
    pub fn named_linears_mut(&mut self) -> Vec<(String, &mut LinearSlot)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7 + 1);
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &mut l.self_attn;
            let m = &mut l.mlp;
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
        }
        out.push(("lm_head".to_string(), &mut self.lm_head));
        out
    }

    /// The model's tensors under their checkpoint names (base weights, merged adapters included),
    /// for exporting a Hugging Face folder. Tied models have no `lm_head.weight`.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                l.input_layernorm.clone(),
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.clone(),
            ));
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        for (name, slot) in self.named_linears() {
            if name == "lm_head" && self.cfg.tie_word_embeddings {
                continue;
            }
            let base = slot.base();
            out.push((format!("{name}.weight"), base.weight.clone()));
            if let Some(b) = &base.bias {
                out.push((format!("{name}.bias"), b.clone()));
            }
        }
        out
    }
}

impl crate::lora::HasLinears for Llama {
    fn named_linears_mut(&mut self) -> Vec<(String, &mut LinearSlot)> {
        Llama::named_linears_mut(self)
    }
    fn named_linears(&self) -> Vec<(String, &LinearSlot)> {
        Llama::named_linears(self)
    }
}
