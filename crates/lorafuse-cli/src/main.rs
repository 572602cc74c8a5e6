//! `lorafuse`: LoRA fine-tuning, generation, perplexity and sentence embeddings on Candle.

mod alloc;
mod cmd;

use clap::{Parser, Subcommand};

/// LoRA fine-tuning, text generation and sentence embeddings on Candle, with fused kernels.
///
/// Models are Hugging Face folders (config.json, tokenizer.json, *.safetensors) or GGUF files.
/// `LORAFUSE_KERNELS=reference` runs every op through stock Candle ops instead of fused kernels.
#[derive(Parser, Debug)]
#[command(name = "lorafuse", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt (or chat with --chat), streaming tokens as they decode.
    Generate(cmd::generate::GenerateArgs),
    /// Score JSONL records ({"text": ...}): mean next-token NLL and perplexity, as transformers does.
    Perplexity(cmd::perplexity::PerplexityArgs),
    /// Benchmarks: fused ops vs stock Candle, and batch-1 decode speed (GPU synchronised).
    Bench(cmd::bench::BenchArgs),
    /// Sentence embeddings with a sentence-transformers folder (BERT family), as it computes them.
    Embed(cmd::embed::EmbedArgs),
    /// Merge LoRA adapters into the base weights and write a Hugging Face model folder.
    Merge(cmd::merge::MergeArgs),
    /// Fine-tune a LoRA adapter (PEFT format); with no arguments, the shipped job.
    ///
    /// With no arguments: SmolLM2-135M-Instruct learns the answer format of data/ (`Answer: ...` /
    /// `Confidence: high|medium|low`), the adapter goes to adapters/main-job/, and the base and
    /// tuned models' greedy answers to data/heldout.jsonl are printed side by side.
    ///
    /// The data folder holds train.jsonl and optionally valid.jsonl, one JSON object per line in
    /// one of mlx-lm's formats: {"text"}, {"messages": [...]} (loss on assistant turns) or
    /// {"prompt", "completion"} (loss on the completion). Outputs in --adapter-out:
    /// adapter_config.json + adapter_model.safetensors (PEFT loads them), train_log.jsonl,
    /// loss.png, train_config.json, and checkpoints/step-N/ every --save-every steps.
    Train(Box<cmd::train::TrainArgs>),
}

fn main() -> anyhow::Result<()> {
    alloc::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match &cli.command {
        Command::Generate(a) => cmd::generate::run(a),
        Command::Perplexity(a) => cmd::perplexity::run(a),
        Command::Merge(a) => cmd::merge::run(a),
        Command::Embed(a) => cmd::embed::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Train(a) => cmd::train::run(a),
    }
}
