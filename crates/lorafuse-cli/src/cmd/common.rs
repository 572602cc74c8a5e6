//! Options every model-running subcommand shares, and loading the model they name.

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use lorafuse::models::{quantize_linears, Llama, QuantFormat, QuantizeSpec};
use lorafuse::tokenizer::TextTokenizer;
use std::path::PathBuf;

/// Where the model is and how to run it.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face model folder (config.json, tokenizer.json, *.safetensors) or a .gguf file.
    #[arg(
        long,
        short = 'm',
        default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
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
    /// Inference with quantized frozen weights (CPU only): bf16 or i16 (2x fewer bytes, tiled
    /// GEMMs meant for batched encoding; decode gains little from them), q8_0 (near-lossless, 3.6x fewer bytes
    /// than f32), q4_1 (5.3x fewer; keeps the weights of a q4_1 GGUF such as the default model exactly) or q4_0 (6x
    /// fewer, least accurate). The projections use this format and the LM head q8_0; activations
    /// and LoRA adapters stay in the compute dtype. A decode step reads that many fewer bytes, so
    /// it runs several times faster. Gradients never flow through the quantized copy: anything
    /// that trains uses the dense weights. Default: off (weights as loaded).
    #[arg(long, value_name = "FORMAT", value_parser = parse_quant_format)]
    pub quantize: Option<QuantFormat>,
}

/// Parses a `--quantize` value (`bf16`, `i16`, `q8_0`, `q4_1`, `q4_0`).
pub fn parse_quant_format(s: &str) -> Result<QuantFormat, String> {
    s.parse().map_err(|e: lorafuse::Error| e.to_string())
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
        if device.is_cpu() {
            pin_cpu_thread_count();
        }
        let dtype = lorafuse::device::parse_dtype(&self.dtype)?;
        eprintln!(
            "device: {}, dtype: {}, kernels: {:?}",
            lorafuse::device::device_name(&device),
            self.dtype,
            lorafuse_ops::kernel_mode()
        );
        let files = lorafuse::loading::open_model(&self.model, dtype, &device)
            .with_context(|| format!("loading {}", self.model.display()))?;
        let mut model = Llama::load(files.vb, &files.config)
            .with_context(|| format!("building the decoder from {}", self.model.display()))?;
        if let Some(format) = self.quantize {
            let r = quantize_linears(&mut model, QuantizeSpec::new(format))
                .with_context(|| format!("--quantize {format}"))?;
            eprintln!(
                "quantized {} projections to {format} (LM head q8_0): {:.0} MB read per token instead of {:.0} MB",
                r.layers,
                r.quantized_bytes as f64 / 1e6,
                r.dense_bytes as f64 / 1e6
            );
        }
        Ok(LoadedModel {
            model,
            tokenizer: files.tokenizer,
            device,
        })
    }
}

/// Candle asks for its thread count before every CPU matmul and, unless `RAYON_NUM_THREADS` is
/// set, recounts physical cores from /proc/cpuinfo each time: ~10% of an f32 decode step. Setting
/// the variable to the count Candle computes changes nothing but that cost (Rayon's global pool,
/// if not yet built, then also takes Candle's physical-core count).
fn pin_cpu_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // Called before the model loads, while no other thread reads the environment.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
