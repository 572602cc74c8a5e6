//! Options every model-running subcommand shares, and loading the model they name.

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use lorafuse::models::Llama;
use lorafuse::tokenizer::TextTokenizer;
use std::path::PathBuf;

/// Where the model is and how to run it.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face model folder (config.json, tokenizer.json, *.safetensors) or a .gguf file.
    #[arg(long, short = 'm', default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Compute dtype: f32, bf16 or f16 (GGUF tensors are dequantized to it on load).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu, cuda, cuda:N, metal, or auto (the best available).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Kernels: fused (default) or reference (stock Candle ops, for debugging and A/B timing).
    #[arg(long, value_parser = ["fused", "reference"])]
    pub kernels: Option<String>,
}

/// A loaded decoder with its tokenizer.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    pub device: Device,
}

impl ModelArgs {
    /// Applies `--kernels`, picks the device (printed to stderr) and loads the model.
    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        match self.kernels.as_deref() {
            Some("reference") => lorafuse_ops::set_kernel_mode(lorafuse_ops::KernelMode::Reference),
            Some(_) => lorafuse_ops::set_kernel_mode(lorafuse_ops::KernelMode::Fused),
            None => {}
        }
        let device = lorafuse::device::parse_device(Some(&self.device))?;
        let dtype = lorafuse::device::parse_dtype(&self.dtype)?;
        eprintln!(
            "device: {}, dtype: {}, kernels: {:?}",
            lorafuse::device::device_name(&device),
            self.dtype,
            lorafuse_ops::kernel_mode()
        );
        let files = lorafuse::loading::open_model(&self.model, dtype, &device)
            .with_context(|| format!("loading {}", self.model.display()))?;
        let model = Llama::load(files.vb, &files.config)
            .with_context(|| format!("building the decoder from {}", self.model.display()))?;
        Ok(LoadedModel {
            model,
            tokenizer: files.tokenizer,
            device,
        })
    }
}
