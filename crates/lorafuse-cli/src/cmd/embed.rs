//! `lorafuse embed`: sentence embeddings of texts given on the command line or in a file.

use super::adapters::AdapterArgs;
use super::common::parse_quant_format;
use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use lorafuse::embed::{EmbedOptions, Embedder, Prefix};
use lorafuse::models::QuantFormat;
use std::io::Write;
use std::path::PathBuf;

/// The E5-style instruction prefix put in front of every input.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixArg {
    /// `query: `
    Query,
    /// `passage: `
    Passage,
}

/// Embed sentences with a sentence-transformers model (BERT family: all-MiniLM, BGE, E5).
#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// A sentence-transformers model folder (modules.json, config.json, model.safetensors,
    /// tokenizer.json, 1_Pooling/config.json).
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// A text to embed; repeat for several.
    #[arg(long, short = 't', conflicts_with = "input")]
    pub text: Vec<String>,
    /// A file of texts: .jsonl with one {"text": ...} per line, or plain text with one per line.
    #[arg(long, short = 'i')]
    pub input: Option<PathBuf>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = EmbedOptions::default().batch_size)]
    pub batch_size: usize,
    /// Keep input order inside batches instead of grouping texts of similar length (output order
    /// is the input order either way).
    #[arg(long)]
    pub no_sort: bool,
    /// Print {"embeddings": [[...], ...]} instead of one line of numbers per text.
    #[arg(long)]
    pub json: bool,
    /// Put E5's `query: ` or `passage: ` in front of every text.
    #[arg(long, value_enum)]
    pub prefix: Option<PrefixArg>,
    /// cpu, cuda, cuda:N, metal, or auto (the best available).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute dtype: f32, bf16 or f16 (vectors are printed as f32 either way).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Kernels: fused (default) or reference (stock Candle ops, for debugging and A/B timing).
    #[arg(long, value_parser = ["fused", "reference"])]
    pub kernels: Option<String>,
    /// Multiply with a reduced-precision copy of the encoder's frozen projection weights (CPU
    /// only). i16: the fast one for embeddings. Weights in int16 with a scale per output,
    /// activations quantized to int16 per row for each product, exact integer sums (AVX512-VNNI
    /// `vpdpwssd`, twice the f32 multiply-add rate; a scalar loop on CPUs without it);
    /// embeddings stay within ~5e-6 of sentence-transformers in cosine. bf16: weights and
    /// activations rounded to bf16, summed in f32 (~5e-5 in cosine); where the CPU's bf16 dot
    /// product is slow (Sapphire/Emerald Rapids) it helps single documents only. q8_0, q4_1,
    /// q4_0: llama.cpp-style blocks with 8-bit activations, built for batch-1 decoding; they move
    /// embeddings more (cosine ~0.998 for q8_0). Attention, LayerNorm, pooling and LoRA adapters
    /// stay in the compute dtype. f32: the exact weights, packed once for a tiled f32 GEMM;
    /// the CPU f32 default (no option given), a second copy of the projections in memory.
    #[arg(long, value_name = "FORMAT", value_parser = parse_quant_format)]
    pub quantize: Option<QuantFormat>,
    /// LoRA adapters on the encoder: PEFT folders saved from the model's `BertModel` (e.g.
    /// `get_peft_model(st[0].auto_model, LoraConfig(target_modules=["query", "key", "value",
    /// "dense"]))`).
    #[command(flatten)]
    pub adapters: AdapterArgs,
}

/// `--json` output. A struct rather than `json!`, which would widen every f32 to f64 and print
/// digits the vectors do not have.
#[derive(serde::Serialize)]
struct JsonOutput<'a> {
    embeddings: &'a [Vec<f32>],
}

/// Runs `lorafuse embed`.
pub fn run(args: &EmbedArgs) -> anyhow::Result<()> {
    let texts: Vec<String> = match &args.input {
        Some(path) => lorafuse::embed::read_texts(path)?,
        None => args.text.clone(),
    };
    if texts.is_empty() {
        match &args.input {
            Some(path) => bail!("{}: no texts to embed", path.display()),
            None => bail!("nothing to embed: give --text TEXT (repeatable) or --input FILE"),
        }
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    match args.kernels.as_deref() {
        Some("reference") => lorafuse_ops::set_kernel_mode(lorafuse_ops::KernelMode::Reference),
        Some(_) => lorafuse_ops::set_kernel_mode(lorafuse_ops::KernelMode::Fused),
        None => {}
    }
    let device = lorafuse::device::parse_device(Some(&args.device))?;
    let dtype = lorafuse::device::parse_dtype(&args.dtype)?;
    eprintln!(
        "device: {}, dtype: {}, kernels: {:?}",
        lorafuse::device::device_name(&device),
        args.dtype,
        lorafuse_ops::kernel_mode()
    );
    let mut embedder = Embedder::load(&args.model, &device, dtype)
        .with_context(|| format!("loading {}", args.model.display()))?
        .with_options(EmbedOptions {
            batch_size: args.batch_size,
            sort_by_length: !args.no_sort,
            prefix: args.prefix.map(|p| {
                match p {
                    PrefixArg::Query => Prefix::Query,
                    PrefixArg::Passage => Prefix::Passage,
                }
                .as_str()
                .to_owned()
            }),
        });
    if let Some(format) = args.quantize {
        quantize_embedder(&mut embedder, format)?;
    }
    args.adapters.apply(embedder.model_mut())?;
    let vectors = embedder.encode(&texts)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if args.json {
        serde_json::to_writer(
            &mut out,
            &JsonOutput {
                embeddings: &vectors,
            },
        )?;
        writeln!(out)?;
    } else {
        for v in &vectors {
            let line: Vec<String> = v.iter().map(|x| format!("{x:.7}")).collect();
            writeln!(out, "{}", line.join(" "))?;
        }
    }
    out.flush()?;
    Ok(())
}

/// `--quantize`: quantizes the encoder's projections (before any adapter) and says so on stderr.
pub fn quantize_embedder(embedder: &mut Embedder, format: QuantFormat) -> anyhow::Result<()> {
    let r = embedder
        .quantize(format)
        .with_context(|| format!("--quantize {format}"))?;
    eprintln!(
        "quantized {} encoder projections to {format}: {:.1} MB instead of {:.1} MB",
        r.layers,
        r.quantized_bytes as f64 / 1e6,
        r.dense_bytes as f64 / 1e6
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: EmbedArgs,
    }

    fn parse(argv: &[&str]) -> EmbedArgs {
        Cli::try_parse_from(std::iter::once("embed").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn adapter_is_repeatable_with_optional_weights_as_in_generate() {
        let a = parse(&["-m", "m", "-t", "x", "--adapter", "a", "--adapter", "b:0.5"]);
        assert_eq!(a.adapters.adapters, vec!["a", "b:0.5"]);
        assert!(parse(&["-m", "m", "-t", "x"]).adapters.adapters.is_empty());
    }

    #[test]
    fn quantize_takes_every_format_and_rejects_others() {
        assert_eq!(parse(&["-m", "m", "-t", "x"]).quantize, None);
        let q = parse(&["-m", "m", "-t", "x", "--quantize", "i16"]).quantize;
        assert_eq!(q, Some(QuantFormat::I16));
        let q = parse(&["-m", "m", "-t", "x", "--quantize", "bf16"]).quantize;
        assert_eq!(q, Some(QuantFormat::Bf16));
        let q = parse(&["-m", "m", "-t", "x", "--quantize", "q8_0"]).quantize;
        assert_eq!(q, Some(QuantFormat::Q8_0));
        let err = Cli::try_parse_from(["embed", "-m", "m", "-t", "x", "--quantize", "f8"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("bf16") && err.contains("q8_0"), "{err}");
    }

    #[test]
    fn no_texts_is_an_error_that_says_what_to_give() {
        // Checked before the model loads, so the folder need not exist.
        let err = run(&parse(&["-m", "no/such/model"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nothing to embed") && err.contains("--text"),
            "{err}"
        );
    }
}
