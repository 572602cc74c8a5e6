//! Sentence embeddings with BERT-family encoders, computed as sentence-transformers computes
//! them: tokenise (truncated at `max_seq_length`), pad to the longest in the batch, encode, pool
//! under the attention mask, optionally L2-normalise.
//!
//! ```no_run
//! use lorafuse::embed::Embedder;
//! let emb = Embedder::load("models/all-MiniLM-L6-v2".as_ref(), &candle_core::Device::Cpu,
//!     candle_core::DType::F32)?;
//! let vecs = emb.encode(&["A cat sits on the mat.", "Un chat est assis."])?;
//! assert_eq!(vecs[0].len(), emb.dim());
//! # Ok::<(), lorafuse::Error>(())
//! ```

pub mod input;
pub mod pooling;
pub mod st_folder;

pub use input::read_texts;
pub use pooling::PoolingMode;
pub use st_folder::{load_bert, StFolder};

use crate::models::bert::BertModel;
use crate::models::quantized::{quantize_linears, QuantFormat, QuantizeReport, QuantizeSpec};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::borrow::Cow;
use std::path::Path;

/// The instruction prefixes E5-family models expect in front of every input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    /// `query: `
    Query,
    /// `passage: `
    Passage,
}

impl Prefix {
    /// The text put in front of each input.
    pub fn as_str(self) -> &'static str {
        match self {
            Prefix::Query => "query: ",
            Prefix::Passage => "passage: ",
        }
    }
}

/// How [`Embedder::encode`] batches its inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedOptions {
    /// Documents per forward pass (sentence-transformers' default: 32).
    pub batch_size: usize,
    /// Batch documents of similar length together to waste less work on padding; results come
    /// back in input order either way.
    pub sort_by_length: bool,
    /// Text put in front of every input (see [`Prefix`]).
    pub prefix: Option<String>,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        Self {
            batch_size: 32,
            sort_by_length: true,
            prefix: None,
        }
    }
}

/// A sentence-transformers model ready to embed text.
pub struct Embedder {
    model: BertModel,
    tokenizer: tokenizers::Tokenizer,
    folder: StFolder,
    max_seq_length: usize,
    pad_id: u32,
    options: EmbedOptions,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("folder", &self.folder)
            .field("max_seq_length", &self.max_seq_length)
            .field("options", &self.options)
            .finish()
    }
}

impl Embedder {
    /// Loads a sentence-transformers folder (see [`StFolder::read`]) onto `device` in `dtype`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let folder = StFolder::read(dir)?;
        let model = load_bert(&folder.transformer_dir, device, dtype)?;
        let mpe = model.config().max_position_embeddings;
        let max_seq_length = match folder.max_seq_length {
            Some(n) if n > mpe => {
                tracing::warn!(
                    "{}: max_seq_length {n} exceeds max_position_embeddings {mpe}; using {mpe}",
                    folder
                        .transformer_dir
                        .join("sentence_bert_config.json")
                        .display()
                );
                mpe
            }
            Some(n) => n,
            None => mpe.min(512),
        };
        let tok_path = folder.transformer_dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(Error::format(
                &tok_path,
                "missing (the model folder needs tokenizer.json)",
            ));
        }
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::format(&tok_path, e.to_string()))?;
        // tokenizer.json often carries fixed-length padding and its own truncation from export
        // time; sentence-transformers overrides both, and so do we (padding happens per batch).
        let pad_id = tokenizer
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| tokenizer.token_to_id("[PAD]"))
            .unwrap_or(0);
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_seq_length,
                ..Default::default()
            }))
            .map_err(|e| Error::format(&tok_path, format!("setting truncation: {e}")))?;
        let mut embedder = Self {
            model,
            tokenizer,
            folder,
            max_seq_length,
            pad_id,
            options: EmbedOptions::default(),
        };
        // The exact weights, packed once for the tiled f32 GEMM: a short batch (one document)
        // ran 1.6-1.7x faster than on the unpacked products. It costs a second copy of the
        // projections (MiniLM: 91 MB). Reference kernels keep the stock products, for A/B timing.
        if device.is_cpu()
            && dtype == DType::F32
            && lorafuse_ops::kernel_mode() == lorafuse_ops::KernelMode::Fused
        {
            embedder.quantize(QuantFormat::F32)?;
        }
        Ok(embedder)
    }

    /// Replaces the batching options.
    pub fn with_options(mut self, options: EmbedOptions) -> Self {
        self.options = options;
        self
    }

    /// The batching options in force.
    pub fn options(&self) -> &EmbedOptions {
        &self.options
    }

    /// Mutable batching options.
    pub fn options_mut(&mut self) -> &mut EmbedOptions {
        &mut self.options
    }

    /// Length of the vectors [`Embedder::encode`] returns.
    pub fn dim(&self) -> usize {
        self.model.config().hidden_size * self.folder.pooling.len()
    }

    /// Inputs are cut to this many tokens, special tokens included.
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// What the model folder said about pooling and normalisation.
    pub fn folder(&self) -> &StFolder {
        &self.folder
    }

    /// The encoder (read-only).
    pub fn model(&self) -> &BertModel {
        &self.model
    }

    /// The encoder, for adapters to wrap its projections.
    pub fn model_mut(&mut self) -> &mut BertModel {
        &mut self.model
    }

    /// Gives every projection of the encoder a `format` copy of its frozen weight, which
    /// inference then multiplies with instead of the dense weight (CPU only; see
    /// [`crate::models::quantized`]). [`QuantFormat::Bf16`] is the one meant for embeddings: the
    /// encoder is bound by multiply-adds, which its tiled GEMM does faster than the dense f32
    /// product, while staying within bf16 rounding of it; the block formats quantize activations
    /// to 8 bits, which moves embeddings more. Call it before loading adapters (an error naming
    /// the projection otherwise); adapters loaded afterwards add their delta, in f32, on top.
    pub fn quantize(&mut self, format: QuantFormat) -> Result<QuantizeReport> {
        let spec = QuantizeSpec {
            linears: format,
            lm_head: None,
        };
        quantize_linears(&mut self.model, spec)
    }

    /// Loads a PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`, as
    /// `PeftModel.save_pretrained` writes it for the encoder, keys
    /// `base_model.model.encoder.layer.N....lora_{A,B}.weight`) as adapter `name`. Its matrices
    /// stay in f32 whatever the model's dtype, as PEFT keeps them. The first adapter loaded becomes
    /// active; later ones load inactive, as in PEFT (choose with
    /// [`Embedder::set_active_adapters`]). A key naming a module the encoder lacks, or a matrix
    /// of the wrong shape, is an error naming the key and the file. Returns the wrapped module
    /// paths.
    pub fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<Vec<String>> {
        crate::lora::load_peft(&mut self.model, dir, name, DType::F32)
    }

    /// Activates the named adapters together, each with a weight on its delta (see
    /// [`crate::lora::set_active_adapters`]).
    pub fn set_active_adapters(&mut self, active: &[(&str, f64)]) -> Result<()> {
        crate::lora::set_active_adapters(&mut self.model, active)
    }

    /// Turns every adapter off: embeddings are the base model's again.
    pub fn disable_adapters(&mut self) -> Result<()> {
        crate::lora::disable_adapters(&mut self.model)
    }

    /// Token ids of each text, prefixed, lowercased if the folder says so, truncated.
    pub fn tokenize<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>> {
        let prefix = self.options.prefix.as_deref().unwrap_or("");
        let inputs: Vec<Cow<str>> = texts
            .iter()
            .map(|t| {
                let t = t.as_ref();
                match (prefix.is_empty(), self.folder.do_lower_case) {
                    (true, false) => Cow::Borrowed(t),
                    (_, lower) => {
                        let s = format!("{prefix}{t}");
                        Cow::Owned(if lower { s.to_lowercase() } else { s })
                    }
                }
            })
            .collect();
        let encodings = self
            .tokenizer
            .encode_batch_fast(inputs.iter().map(|c| c.as_ref()).collect(), true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }

    /// One vector per text, in input order. An empty list gives an empty result.
    pub fn encode<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        if self.options.batch_size == 0 {
            return Err(Error::Invalid("batch size must be at least 1".into()));
        }
        let ids = self.tokenize(texts)?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        if self.options.sort_by_length {
            order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        }
        let mut out = vec![Vec::new(); ids.len()];
        for chunk in order.chunks(self.options.batch_size) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
            let vecs = self.embed_ids(&batch)?.to_vec2::<f32>()?;
            for (&i, v) in chunk.iter().zip(vecs) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// Sentence vectors `[b, dim]` (f32, on the model's device) for one batch of token id lists,
    /// padded here to the longest.
    pub fn embed_ids(&self, batch: &[&[u32]]) -> Result<Tensor> {
        let b = batch.len();
        let t = batch.iter().map(|s| s.len()).max().unwrap_or(0);
        if b == 0 || t == 0 {
            return Err(Error::Invalid(
                "embed_ids: empty batch or empty sequence".into(),
            ));
        }
        let mut flat = vec![self.pad_id; b * t];
        let mut mask = vec![0f32; b * t];
        for (row, seq) in batch.iter().enumerate() {
            flat[row * t..row * t + seq.len()].copy_from_slice(seq);
            mask[row * t..row * t + seq.len()].fill(1.0);
        }
        let device = self.model.device();
        let ids = Tensor::from_vec(flat, (b, t), device)?;
        let mask = Tensor::from_vec(mask, (b, t), device)?;
        // A batch of equal lengths needs no attention mask: skip building and adding it.
        let padded = batch.iter().any(|s| s.len() != t);
        let hidden = self.model.forward(&ids, None, padded.then_some(&mask))?;
        let pooled = pooling::pool(&hidden, &mask, &self.folder.pooling)?;
        Ok(if self.folder.normalize {
            pooling::l2_normalize(&pooled)?
        } else {
            pooled
        })
    }
}
