//! Model files in, model files out: Hugging Face folders (safetensors, memory-mapped) and GGUF
//! files (dequantized, renamed and un-permuted to the HF layout) open into the same
//! [`ModelFiles`], so one decoder and HF-layout adapters serve both.

pub mod export;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod safetensors;

pub use export::save_hf_folder;
pub use gguf::{read_gguf_tensors, GgufFile};
pub use safetensors::open_hf_folder;

use crate::config::LlamaConfig;
use crate::tokenizer::TextTokenizer;
use crate::{Error, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// Everything needed to build and run a model: its config, its weights under Hugging Face names,
/// and its tokenizer.
pub struct ModelFiles {
    pub config: LlamaConfig,
    /// Weights under HF names (`model.layers.0.self_attn.q_proj.weight`, ...), in the requested
    /// dtype on the requested device.
    pub vb: candle_nn::VarBuilder<'static>,
    pub tokenizer: TextTokenizer,
    /// The folder or file the model came from.
    pub source: PathBuf,
}

impl std::fmt::Debug for ModelFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFiles")
            .field("config", &self.config)
            .field("tokenizer", &self.tokenizer)
            .field("source", &self.source)
            .finish()
    }
}

/// Opens a model: a Hugging Face folder (`config.json`, tokenizer files, safetensors weights) or
/// a `.gguf` file (tokenizer and config from its metadata).
pub fn open_model(path: &Path, dtype: DType, device: &Device) -> Result<ModelFiles> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return open_hf_folder(path, dtype, device);
    }
    let (config, tensors, tokenizer) = read_gguf_tensors(path, dtype, device)?;
    Ok(ModelFiles {
        config,
        vb: candle_nn::VarBuilder::from_tensors(tensors, dtype, device),
        tokenizer,
        source: path.to_path_buf(),
    })
}
