//! Embedding throughput: docs/s for 1, 32 and 1000 documents, with the documents of
//! `../shared/bench/peers_infer.py` (its sentence-transformers part is the peer; run
//! `benches/embed_peer.py` in the same session for the figures to compare).
//!
//! `cargo bench -p lorafuse-cli --bench embed -- [--model DIR] [--device D] [--dtype T]
//! [--repeat R] [--sizes 1,32,1000] [--quantize bf16]` prints one JSON line per size. `--repeat R` repeats the base sentence R times (1: 29 tokens per
//! document as in peers_infer.py; 2: 53 tokens).

use candle_core::Device;
use clap::Parser;
use lorafuse::embed::{EmbedOptions, Embedder};
use std::path::PathBuf;
use std::time::Instant;

// The same allocator as the `lorafuse` binary, so the figures match what users run.
#[path = "../src/alloc.rs"]
mod alloc;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
    model: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Document counts to time.
    #[arg(long, value_delimiter = ',', default_value = "1,32,1000")]
    sizes: Vec<usize>,
    /// Minimum timed passes per size (more for small sizes: at least 200 documents in all).
    #[arg(long, default_value_t = 3)]
    min_reps: usize,
    /// Quantized copy of the encoder's projections (bf16, q8_0, q4_1, q4_0), as `lorafuse embed
    /// --quantize`. Default: the dense weights.
    #[arg(long)]
    quantize: Option<lorafuse::models::QuantFormat>,
    /// Documents per forward pass (default: the peer's `min(docs, 256)`).
    #[arg(long)]
    batch_size: Option<usize>,
    // `cargo bench` passes `--bench`; accept and ignore it.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Waits for queued device work so that the clock measures it (a no-op on the CPU).
fn sync(device: &Device) -> candle_core::Result<()> {
    device.synchronize()
}

fn main() -> anyhow::Result<()> {
    alloc::keep_freed_memory();
    let args = Args::parse();
    let device = lorafuse::device::parse_device(Some(&args.device))?;
    let dtype = lorafuse::device::parse_dtype(&args.dtype)?;
    let model = if args.model.is_relative() && !args.model.exists() {
        // `cargo bench` runs in the crate folder; the models live at the workspace root.
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(&args.model)
    } else {
        args.model.clone()
    };
    let mut emb = Embedder::load(&model, &device, dtype)?;
    if let Some(format) = args.quantize {
        emb.quantize(format)?;
    }
    let doc =
        "Low-rank adaptation freezes the pretrained weights and trains small matrices in each \
               layer, which makes fine-tuning cheap. "
            .repeat(args.repeat);
    let docs: Vec<String> = (0..1000).map(|i| format!("{doc}{i}")).collect();
    let tokens = emb.tokenize(&docs[..1])?[0].len();
    for &n in &args.sizes {
        let n = n.min(docs.len());
        // The peer script's batch size.
        *emb.options_mut() = EmbedOptions {
            batch_size: args.batch_size.unwrap_or(n.clamp(1, 256)),
            ..Default::default()
        };
        let batch = &docs[..n];
        emb.encode(batch)?;
        sync(&device)?;
        let reps = args.min_reps.max(200 / n.max(1));
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let t = Instant::now();
            emb.encode(batch)?;
            sync(&device)?;
            times.push(t.elapsed().as_secs_f64());
        }
        let mean = times.iter().sum::<f64>() / reps as f64;
        let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
        println!(
            "{}",
            serde_json::json!({
                "impl": "lorafuse", "model": "all-MiniLM-L6-v2",
                "device": lorafuse::device::device_name(&device), "dtype": args.dtype,
                "quantize": args.quantize.map(|q| q.name()),
                "kernels": format!("{:?}", lorafuse_ops::kernel_mode()),
                "docs": n, "tokens_per_doc": tokens, "reps": reps,
                "ms": (mean * 1e5).round() / 100.0, "best_ms": (best * 1e5).round() / 100.0,
                "docs_per_s": (n as f64 / mean * 10.0).round() / 10.0,
            })
        );
    }
    Ok(())
}
