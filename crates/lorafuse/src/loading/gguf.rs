//! GGUF files: the decoder config from metadata, tensors dequantized and renamed to Hugging Face
//! names, so that one decoder (and HF-layout adapters) serve GGUF and safetensors checkpoints.

use super::gguf_tokenizer;
use crate::config::{LlamaConfig, RopeScaling, SUPPORTED_ARCHS};
use crate::tokenizer::TextTokenizer;
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The GGML tensor types we dequantize. Others (K-quants, ...) are refused by name rather than
/// loaded unchecked: each accepted type is covered by a parity test.
pub const SUPPORTED_GGML_TYPES: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q8_0,
];

/// An open GGUF file: its parsed header (metadata and tensor directory) and the file to read
/// tensor data from on demand.
pub struct GgufFile {
    path: PathBuf,
    file: std::fs::File,
    content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .field("metadata", &self.content.metadata.len())
            .finish()
    }
}

/// A short name for a metadata value's type, for error messages (never the value: a vocabulary
/// array would flood the message).
pub(crate) fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::U8(_) | Value::U16(_) | Value::U32(_) | Value::U64(_) => "unsigned integer",
        Value::I8(_) | Value::I16(_) | Value::I32(_) | Value::I64(_) => "signed integer",
        Value::F32(_) | Value::F64(_) => "float",
        Value::Bool(_) => "bool",
        Value::String(_) => "string",
        Value::Array(_) => "array",
    }
}

/// A metadata integer (any width or signedness, if non-negative).
pub(crate) fn value_usize(v: &Value) -> Option<usize> {
    let x: i128 = match v {
        Value::U8(x) => (*x).into(),
        Value::U16(x) => (*x).into(),
        Value::U32(x) => (*x).into(),
        Value::U64(x) => (*x).into(),
        Value::I8(x) => (*x).into(),
        Value::I16(x) => (*x).into(),
        Value::I32(x) => (*x).into(),
        Value::I64(x) => (*x).into(),
        _ => return None,
    };
    usize::try_from(x).ok()
}

fn value_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some((*x).into()),
        Value::F64(x) => Some(*x),
        other => value_usize(other).map(|x| x as f64),
    }
}

impl GgufFile {
    /// Parses the header of the GGUF file at `path`. A truncated or corrupt header is an error
    /// naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut reader = std::io::BufReader::new(&file);
        let content = Content::read(&mut reader).map_err(|e| {
            Error::format(
                path,
                format!("not a readable GGUF file (truncated or corrupt header?): {e}"),
            )
        })?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        // Check every tensor's extent now, so a truncated download fails at open with one clear
        // message rather than midway through loading.
        for (name, info) in &content.tensor_infos {
            // Checked: a corrupt header can declare dims whose product overflows.
            let elems = info
                .shape
                .dims()
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| {
                    Error::format(
                        path,
                        format!("tensor `{name}`: dims {:?} overflow", info.shape.dims()),
                    )
                })?;
            let block = info.ggml_dtype.block_size();
            if !elems.is_multiple_of(block) {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}`: {elems} elements is not a whole number of {block}-element blocks"),
                ));
            }
            let bytes = (elems / block).saturating_mul(info.ggml_dtype.type_size()) as u64;
            let end = content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(bytes);
            if end > file_len {
                return Err(Error::format(
                    path,
                    format!("truncated: tensor `{name}` ends at byte {end}, the file has {file_len} bytes"),
                ));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            content,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// A metadata value, if present.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => value_usize(v).map(Some).ok_or_else(|| {
                Error::key(
                    &self.path,
                    key,
                    format!("expected an integer, found a {}", value_kind(v)),
                )
            }),
        }
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        self.meta_usize_opt(key)?
            .ok_or_else(|| Error::key(&self.path, key, "missing"))
    }

    fn meta_f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => value_f64(v).map(Some).ok_or_else(|| {
                Error::key(
                    &self.path,
                    key,
                    format!("expected a number, found a {}", value_kind(v)),
                )
            }),
        }
    }

    fn meta_str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(Error::key(
                &self.path,
                key,
                format!("expected a string, found a {}", value_kind(v)),
            )),
        }
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.meta_str_opt("general.architecture")?
            .ok_or_else(|| Error::key(&self.path, "general.architecture", "missing"))
    }

    /// Whether the file holds a tensor of this GGUF name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The GGUF tensor names, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .content
            .tensor_infos
            .keys()
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names
    }

    /// The decoder config from the file's metadata (llama.cpp key names under the architecture
    /// prefix) and its tensor directory (tied embeddings, QKV bias, Llama 3 RoPE factors).
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = self.architecture()?.to_owned();
        if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(Error::Architecture {
                path: self.path.clone(),
                arch,
                supported: SUPPORTED_ARCHS,
            });
        }
        let key = |k: &str| format!("{arch}.{k}");
        let hidden_size = self.meta_usize(&key("embedding_length"))?;
        let num_attention_heads = self.meta_usize(&key("attention.head_count"))?;
        if num_attention_heads == 0 {
            return Err(Error::key(&self.path, key("attention.head_count"), "is 0"));
        }
        let num_key_value_heads = self
            .meta_usize_opt(&key("attention.head_count_kv"))?
            .unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(Error::key(
                &self.path,
                key("attention.head_count_kv"),
                format!(
                    "{num_key_value_heads} does not divide the head count {num_attention_heads}"
                ),
            ));
        }
        let head_dim = match self.meta_usize_opt(&key("attention.key_length"))? {
            Some(d) => d,
            None if hidden_size.is_multiple_of(num_attention_heads) => {
                hidden_size / num_attention_heads
            }
            None => {
                return Err(Error::key(
                    &self.path,
                    key("attention.head_count"),
                    format!("{num_attention_heads} does not divide embedding_length {hidden_size}"),
                ))
            }
        };
        if let Some(rot) = self.meta_usize_opt(&key("rope.dimension_count"))? {
            if rot != head_dim {
                return Err(Error::key(
                    &self.path,
                    key("rope.dimension_count"),
                    format!(
                        "partial rotary embeddings ({rot} of {head_dim} dims) are not supported"
                    ),
                ));
            }
        }
        let vocab_size = match self.meta_usize_opt(&key("vocab_size"))? {
            Some(v) => v,
            None => match self.meta("tokenizer.ggml.tokens") {
                Some(Value::Array(tokens)) => tokens.len(),
                _ => self.embedding_rows()?,
            },
        };
        let rope_theta = self
            .meta_f64_opt(&key("rope.freq_base"))?
            .unwrap_or(10_000.0);
        let max_position_embeddings = self.meta_usize_opt(&key("context_length"))?.unwrap_or(4096);
        let eps_key = key("attention.layer_norm_rms_epsilon");
        let rms_norm_eps = self
            .meta_f64_opt(&eps_key)?
            .ok_or_else(|| Error::key(&self.path, &eps_key, "missing"))?;
        let bos = self.meta_usize_opt("tokenizer.ggml.bos_token_id")?;
        let eos = self.meta_usize_opt("tokenizer.ggml.eos_token_id")?;
        Ok(LlamaConfig {
            model_type: arch.clone(),
            vocab_size,
            hidden_size,
            intermediate_size: self.meta_usize(&key("feed_forward_length"))?,
            num_hidden_layers: self.meta_usize(&key("block_count"))?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling: self.rope_scaling(&arch, head_dim, rope_theta)?,
            max_position_embeddings,
            // llama.cpp writes `output.weight` only when the LM head is not the embedding.
            tie_word_embeddings: !self.has_tensor("output.weight"),
            attention_bias: self.has_tensor("blk.0.attn_q.bias"),
            mlp_bias: self.has_tensor("blk.0.ffn_up.bias"),
            bos_token_id: bos.map(|b| b as u32),
            eos_token_ids: eos.map(|e| vec![e as u32]).unwrap_or_default(),
        })
    }

    fn embedding_rows(&self) -> Result<usize> {
        self.content
            .tensor_infos
            .get("token_embd.weight")
            .and_then(|t| t.shape.dims().first().copied())
            .ok_or_else(|| Error::key(&self.path, "token_embd.weight", "missing tensor"))
    }

    /// RoPE scaling: `rope.scaling.type` linear, or Llama 3's per-frequency factors, which
    /// llama.cpp stores as the `rope_freqs.weight` tensor rather than as metadata. We recover the
    /// Llama 3 parameters by matching the stored factors against the formula.
    fn rope_scaling(&self, arch: &str, head_dim: usize, rope_theta: f64) -> Result<RopeScaling> {
        let kind_key = format!("{arch}.rope.scaling.type");
        let factor_key = format!("{arch}.rope.scaling.factor");
        if self.has_tensor("rope_freqs.weight") {
            let freqs: Vec<f32> = self
                .dequantize("rope_freqs.weight")?
                .flatten_all()?
                .to_vec1()?;
            let orig = self
                .meta_usize_opt(&format!("{arch}.rope.scaling.original_context_length"))?
                .unwrap_or(8192);
            return llama3_from_factors(&freqs, head_dim, rope_theta, orig).ok_or_else(|| {
                Error::key(
                    &self.path,
                    "rope_freqs.weight",
                    "RoPE frequency factors that do not follow Llama 3 scaling are not supported",
                )
            });
        }
        match self.meta_str_opt(&kind_key)? {
            None | Some("none") => Ok(RopeScaling::Default),
            Some("linear") => {
                let factor = self.meta_f64_opt(&factor_key)?.unwrap_or(1.0);
                Ok(if factor == 1.0 {
                    RopeScaling::Default
                } else {
                    RopeScaling::Linear { factor }
                })
            }
            Some(other) => Err(Error::key(
                &self.path,
                kind_key,
                format!(
                    "unsupported RoPE scaling `{other}` (supported: none, linear, llama3 factors)"
                ),
            )),
        }
    }

    /// The tensor `name` (a GGUF name) dequantized to f32 on the CPU, in the file's layout
    /// (shape `[rows, cols]` as GGUF's reversed dims make it). Errors name the tensor.
    pub fn dequantize(&self, name: &str) -> Result<Tensor> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::format(&self.path, format!("no tensor `{name}`")))?;
        if !SUPPORTED_GGML_TYPES.contains(&info.ggml_dtype) {
            return Err(Error::format(
                &self.path,
                format!(
                    "tensor `{name}` has type {:?}, which is not supported (supported: {:?})",
                    info.ggml_dtype, SUPPORTED_GGML_TYPES
                ),
            ));
        }
        let mut reader = std::io::BufReader::new(&self.file);
        let q = info
            .read(&mut reader, self.content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| {
                Error::format(
                    &self.path,
                    format!("tensor `{name}`: cannot read its data: {e}"),
                )
            })?;
        q.dequantize(&Device::Cpu).map_err(|e| {
            Error::format(
                &self.path,
                format!("tensor `{name}`: cannot dequantize: {e}"),
            )
        })
    }

    /// The GGUF tensor `name` in the Hugging Face layout: dequantized to f32 on the CPU, with
    /// llama.cpp's q/k row permutation undone for llama/mistral files.
    pub fn load_hf(&self, name: &str, cfg: &LlamaConfig) -> Result<Tensor> {
        let t = self.dequantize(name)?;
        if !matches!(cfg.model_type.as_str(), "llama" | "mistral") {
            return Ok(t);
        }
        let heads = if name.contains(".attn_q.") {
            cfg.num_attention_heads
        } else if name.contains(".attn_k.") {
            cfg.num_key_value_heads
        } else {
            return Ok(t);
        };
        unpermute_rows(&t, heads)
            .map_err(|e| Error::format(&self.path, format!("tensor `{name}`: {e}")))
    }

    /// Every tensor the decoder uses, under its Hugging Face name, in the HF layout (see
    /// [`GgufFile::load_hf`]), cast to `dtype` and placed on `device`.
    pub fn hf_tensors(
        &self,
        cfg: &LlamaConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for name in self.tensor_names() {
            let Some(hf) = hf_name(name) else {
                if name != "rope_freqs.weight" {
                    tracing::warn!("{}: ignoring tensor `{name}`", self.path.display());
                }
                continue;
            };
            let t = self
                .load_hf(name, cfg)?
                .to_dtype(dtype)?
                .to_device(device)?;
            out.insert(hf, t);
        }
        Ok(out)
    }

    /// The tokenizer, special tokens and chat template from the file's metadata.
    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        gguf_tokenizer::tokenizer_from_gguf(&self.content.metadata, &self.path)
    }
}

/// The Hugging Face name of a GGUF tensor, or `None` for one the decoder does not use.
pub fn hf_name(gguf: &str) -> Option<String> {
    let (stem, suffix) = gguf.rsplit_once('.')?;
    if !matches!(suffix, "weight" | "bias") {
        return None;
    }
    let top = match stem {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(top) = top {
        return Some(format!("{top}.{suffix}"));
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, module) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let module = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{suffix}"))
}

/// Undoes llama.cpp's q/k row permutation. Its converter regroups each head's rows from HF's
/// "first half, second half" rotary layout into interleaved pairs (`reshape(h, 2, d/2, ..)
/// .swapaxes(1, 2)`); this is the inverse, as transformers' `_reverse_permute_weights`:
/// `reshape(h, d/2, 2, ..).swapaxes(1, 2)`. Works on weights `[rows, in]` and biases `[rows]`.
pub fn unpermute_rows(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let Some(&rows) = dims.first() else {
        candle_core::bail!("a scalar has no rows to un-permute")
    };
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        candle_core::bail!("{rows} rows cannot be split into {n_head} heads of rotary pairs")
    }
    let half = rows / n_head / 2;
    let mut split = vec![n_head, half, 2];
    split.extend_from_slice(&dims[1..]);
    t.reshape(split)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// Llama 3 scaling parameters whose per-frequency factors (llama.cpp's `rope_freqs`) equal
/// `factors`, trying the published low/high frequency factors; `None` if none fit.
fn llama3_from_factors(
    factors: &[f32],
    head_dim: usize,
    rope_theta: f64,
    original_max_position_embeddings: usize,
) -> Option<RopeScaling> {
    if factors.len() * 2 != head_dim {
        return None;
    }
    let factor = factors.iter().copied().fold(f32::MIN, f32::max) as f64;
    let (low_freq_factor, high_freq_factor) = (1.0, 4.0);
    let old = original_max_position_embeddings as f64;
    let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
    let fits = factors.iter().enumerate().all(|(i, &got)| {
        let freq = 1.0 / rope_theta.powf((2 * i) as f64 / head_dim as f64);
        let wavelen = 2.0 * std::f64::consts::PI / freq;
        let want = if wavelen < high_wavelen {
            1.0
        } else if wavelen > low_wavelen {
            factor
        } else {
            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
            1.0 / ((1.0 - smooth) / factor + smooth)
        };
        (want - got as f64).abs() <= 1e-3 * want.abs().max(1.0)
    });
    fits.then_some(RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    })
}

/// Reads a GGUF checkpoint whole: its config, every decoder tensor under its HF name (in
/// `dtype` on `device`), and its tokenizer.
pub fn read_gguf_tensors(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(LlamaConfig, HashMap<String, Tensor>, TextTokenizer)> {
    let file = GgufFile::open(path)?;
    let config = file.config()?;
    let tokenizer = file.tokenizer()?;
    let tensors = file.hf_tensors(&config, dtype, device)?;
    Ok((config, tensors, tokenizer))
}
