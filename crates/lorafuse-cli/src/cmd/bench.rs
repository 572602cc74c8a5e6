//! `lorafuse bench`: timings of the fused ops (against the stock-Candle reference, in the same
//! process) and of batch-1 decoding. The device is synchronised before every clock read, after
//! warm-up, over many iterations. Shapes and op names follow `../shared/bench/peers_ops.py` so the
//! two outputs join on (op, dtype, shape).

use super::common::ModelArgs;
use candle_core::{DType, Device, Tensor, Var, D};
use clap::{Args, Subcommand};
use lorafuse_ops::{KernelMode, Reduction};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// Every fused op, forward and forward+backward, fused vs stock-Candle reference.
    Ops(OpsArgs),
    /// Batch-1 greedy decode speed of a model (prefill, then one cached step per token).
    Decode(DecodeArgs),
    /// LoRA training-step throughput (forward, backward, AdamW) on random tokens.
    Train(TrainArgs),
    /// Sentence-embedding throughput (docs/s) for 1, 32 and 1000 documents, as peers_infer.py.
    Embed(EmbedBenchArgs),
}

#[derive(Args, Debug)]
pub struct EmbedBenchArgs {
    /// A sentence-transformers folder.
    #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
    pub model: PathBuf,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Repeat the peers' sentence this many times per document (1: ~29 tokens, 2: ~53).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Time the encoder with a quantized copy of its projections, as `lorafuse embed
    /// --quantize` runs it (i16, bf16, q8_0, q4_1, q4_0; CPU only). Default: the dense weights.
    #[arg(long, value_name = "FORMAT", value_parser = super::common::parse_quant_format)]
    pub quantize: Option<lorafuse::models::QuantFormat>,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// LoRA rank (alpha is twice the rank, as in the peers' script).
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Timed steps (after `--warmup` untimed ones).
    #[arg(long, default_value_t = 12)]
    pub steps: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct OpsArgs {
    /// cpu, cuda, cuda:N, metal or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Comma-separated dtypes to time (f32, bf16, f16).
    #[arg(long, default_value = "f32,bf16")]
    pub dtypes: String,
    /// Only ops whose name contains this.
    #[arg(long)]
    pub only: Option<String>,
    /// Only shapes whose label contains this (e.g. `16384x4096`, `T=2048`).
    #[arg(long)]
    pub shape: Option<String>,
    /// Small shapes only (for CPUs).
    #[arg(long)]
    pub quick: bool,
    /// Time the fused kernels only (skip the reference).
    #[arg(long)]
    pub fused_only: bool,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Random prompt length.
    #[arg(long, default_value_t = 32)]
    pub prompt_tokens: usize,
    /// New tokens to decode (EOS ignored, as transformers' min_new_tokens).
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Timed runs after the warm-up; the median is reported (other processes on the cores make
    /// single runs noisy).
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Serialize, Debug)]
struct Row {
    #[serde(rename = "impl")]
    imp: String,
    op: String,
    dtype: String,
    shape: String,
    us: f64,
    iters: usize,
}

/// Mean microseconds per call: warm-up, then at least 10 calls and ~0.3 s, synchronised.
fn time_us(
    dev: &Device,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> anyhow::Result<(f64, usize)> {
    for _ in 0..5 {
        f()?;
    }
    dev.synchronize()?;
    let budget = Duration::from_millis(300);
    let start = Instant::now();
    let mut iters = 0;
    while iters < 10 || (start.elapsed() < budget && iters < 2000) {
        f()?;
        iters += 1;
        if iters % 10 == 0 {
            dev.synchronize()?;
        }
    }
    dev.synchronize()?;
    Ok((start.elapsed().as_secs_f64() * 1e6 / iters as f64, iters))
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

struct Bencher {
    dev: Device,
    only: Option<String>,
    shape: Option<String>,
    fused_only: bool,
    rows: Vec<Row>,
}

impl Bencher {
    fn wants(&self, op: &str, shape: &str) -> bool {
        self.only.as_deref().is_none_or(|o| op.contains(o))
            && self.shape.as_deref().is_none_or(|s| shape.contains(s))
    }

    /// Times `f` under the fused kernels and, unless disabled, under the reference.
    fn run(
        &mut self,
        op: &str,
        dtype: DType,
        shape: String,
        mut f: impl FnMut() -> candle_core::Result<()>,
    ) -> anyhow::Result<()> {
        if !self.wants(op, &shape) {
            return Ok(());
        }
        let mut modes = vec![(KernelMode::Fused, "lorafuse")];
        if !self.fused_only {
            modes.push((KernelMode::Reference, "candle-reference"));
        }
        for (mode, imp) in modes {
            lorafuse_ops::set_kernel_mode(mode);
            // One shape failing (e.g. the reference running out of GPU memory) must not lose the
            // rest of the table: report it and go on.
            let (us, iters) = match time_us(&self.dev, &mut f) {
                Ok(r) => r,
                Err(e) => {
                    println!(
                        "{imp:17} {op:15} {:5} {shape:24} failed: {e}",
                        dtype_name(dtype)
                    );
                    continue;
                }
            };
            println!(
                "{imp:17} {op:15} {:5} {shape:24} {us:10.2} us",
                dtype_name(dtype)
            );
            self.rows.push(Row {
                imp: imp.into(),
                op: op.into(),
                dtype: dtype_name(dtype).into(),
                shape: shape.clone(),
                us,
                iters,
            });
        }
        lorafuse_ops::set_kernel_mode(KernelMode::Fused);
        Ok(())
    }
}

fn randn(shape: &[usize], scale: f64, dt: DType, dev: &Device) -> candle_core::Result<Tensor> {
    (Tensor::randn(0f32, 1f32, shape, dev)? * scale)?.to_dtype(dt)
}

fn bench_ops(args: &OpsArgs) -> anyhow::Result<()> {
    let dev = lorafuse::device::parse_device(Some(&args.device))?;
    println!("device: {}", lorafuse::device::device_name(&dev));
    let mut b = Bencher {
        dev: dev.clone(),
        only: args.only.clone(),
        shape: args.shape.clone(),
        fused_only: args.fused_only,
        rows: vec![],
    };
    let lora_shapes: &[(usize, usize)] = if args.quick {
        &[(1, 512), (512, 512), (512, 1024)]
    } else {
        &[
            (1, 512),
            (512, 512),
            (512, 1024),
            (512, 2048),
            (2048, 4096),
            (8192, 4096),
        ]
    };
    let rows: &[(usize, usize)] = if args.quick {
        &[(1, 1024), (512, 1024)]
    } else {
        &[
            (1, 1024),
            (512, 1024),
            (4096, 4096),
            (16384, 4096),
            (16384, 32000),
        ]
    };
    for name in args.dtypes.split(',') {
        let dt = lorafuse::device::parse_dtype(name.trim())?;
        for &(t, d) in lora_shapes {
            let x = randn(&[t, d], 1.0, dt, &dev)?;
            let w = randn(&[d, d], 0.02, dt, &dev)?;
            for r in [8usize, 16] {
                let a = randn(&[r, d], 0.02, dt, &dev)?;
                let bb = randn(&[d, r], 0.02, dt, &dev)?;
                let sh = format!("t={t} d={d} r={r}");
                b.run("lora_delta", dt, sh.clone(), || {
                    lorafuse_ops::lora_delta(&x, &a, &bb, 2.0).map(drop)
                })?;
                b.run("lora_full", dt, sh.clone(), || {
                    lorafuse_ops::lora_linear(&x, &w, None, &a, &bb, 2.0).map(drop)
                })?;
                let xv = Var::from_tensor(&x)?;
                let av = Var::from_tensor(&a)?;
                let bv = Var::from_tensor(&bb)?;
                b.run("lora_full+bwd", dt, sh, || {
                    let y = lorafuse_ops::lora_linear(
                        xv.as_tensor(),
                        &w,
                        None,
                        av.as_tensor(),
                        bv.as_tensor(),
                        2.0,
                    )?;
                    y.backward().map(drop)
                })?;
            }
            let sh = format!("t={t} d={d}");
            b.run("base_gemm", dt, sh.clone(), || {
                lorafuse_ops::frozen_linear(&x, &w, None).map(drop)
            })?;
            let xv = Var::from_tensor(&x)?;
            b.run("base_gemm+bwd", dt, sh, || {
                lorafuse_ops::frozen_linear(xv.as_tensor(), &w, None)?
                    .backward()
                    .map(drop)
            })?;
        }
        for (i, &(r, c)) in rows.iter().enumerate() {
            let x = randn(&[r, c], 1.0, dt, &dev)?;
            let g = Tensor::ones(c, dt, &dev)?;
            let z = Tensor::zeros(c, dt, &dev)?;
            let sh = format!("{r}x{c}");
            b.run("softmax", dt, sh.clone(), || {
                lorafuse_ops::softmax_last_dim(&x).map(drop)
            })?;
            b.run("rms_norm", dt, sh.clone(), || {
                lorafuse_ops::rms_norm(&x, &g, 1e-5).map(drop)
            })?;
            b.run("layer_norm", dt, sh.clone(), || {
                lorafuse_ops::layer_norm(&x, &g, Some(&z), 1e-5).map(drop)
            })?;
            b.run("swiglu", dt, sh.clone(), || {
                lorafuse_ops::swiglu(&x, &x).map(drop)
            })?;
            // forward+backward on the four smaller shapes, as the peers do
            if i < 4 {
                let xv = Var::from_tensor(&x)?;
                let gv = Var::from_tensor(&g)?;
                let zv = Var::from_tensor(&z)?;
                b.run("softmax+bwd", dt, sh.clone(), || {
                    lorafuse_ops::softmax_last_dim(xv.as_tensor())?
                        .backward()
                        .map(drop)
                })?;
                b.run("rms_norm+bwd", dt, sh.clone(), || {
                    lorafuse_ops::rms_norm(xv.as_tensor(), gv.as_tensor(), 1e-5)?
                        .backward()
                        .map(drop)
                })?;
                b.run("layer_norm+bwd", dt, sh.clone(), || {
                    lorafuse_ops::layer_norm(
                        xv.as_tensor(),
                        gv.as_tensor(),
                        Some(zv.as_tensor()),
                        1e-5,
                    )?
                    .backward()
                    .map(drop)
                })?;
            }
        }
        let seqs: &[usize] = if args.quick { &[128] } else { &[512, 2048] };
        for &t in seqs {
            let q = randn(&[4, 14, t, 64], 1.0, dt, &dev)?;
            let k = randn(&[4, 2, t, 64], 1.0, dt, &dev)?;
            let v = randn(&[4, 2, t, 64], 1.0, dt, &dev)?;
            let sh = format!("b4 h14/2 T={t} d64");
            b.run("attention", dt, sh.clone(), || {
                lorafuse_ops::causal_attention(&q, &k, &v, 0.125).map(drop)
            })?;
            let qv = Var::from_tensor(&q)?;
            let kv = Var::from_tensor(&k)?;
            let vv = Var::from_tensor(&v)?;
            b.run("attention+bwd", dt, sh, || {
                lorafuse_ops::causal_attention(
                    qv.as_tensor(),
                    kv.as_tensor(),
                    vv.as_tensor(),
                    0.125,
                )?
                .backward()
                .map(drop)
            })?;
            // tables in the activations' dtype, as the decoder passes them (it casts its f32
            // tables once at load)
            let (cos, sin) = (
                randn(&[t, 32], 1.0, dt, &dev)?,
                randn(&[t, 32], 1.0, dt, &dev)?,
            );
            b.run("rope", dt, format!("b4 h14 T={t} d64"), || {
                lorafuse_ops::rope(&q, &cos, &sin, lorafuse_ops::RopeLayout::HalfRotation).map(drop)
            })?;
        }
        let vocab = if args.quick { 32000 } else { 151936 };
        let ce_rows: &[usize] = if args.quick { &[256] } else { &[4096, 16384] };
        for &n in ce_rows {
            if n * vocab * 2 > 8_000_000_000 {
                continue;
            }
            let logits = Var::from_tensor(&randn(&[n, vocab], 1.0, dt, &dev)?)?;
            let tgt = Tensor::rand(0f32, vocab as f32, n, &dev)?.to_dtype(DType::I64)?;
            b.run("xent+bwd", dt, format!("{n}x{vocab}"), || {
                lorafuse_ops::cross_entropy(logits.as_tensor(), &tgt, -100, Reduction::Mean)?
                    .backward()
                    .map(drop)
            })?;
        }
        // AdamW over a LoRA-sized parameter set: r=16 on 7 projections x 24 layers of width 896.
        let (count, r, d) = if args.quick {
            (14, 8, 256)
        } else {
            (336, 16, 896)
        };
        let adamw_shape = format!("{count} tensors of {r}x{d}");
        if b.wants("adamw", &adamw_shape) {
            let mk = |rows: usize, cols: usize| -> candle_core::Result<Var> {
                Var::from_tensor(&randn(&[rows, cols], 0.02, DType::F32, &dev)?)
            };
            let mut params = Vec::new();
            let mut grads = Vec::new();
            let mut m = Vec::new();
            let mut v = Vec::new();
            for _ in 0..count {
                params.push(mk(r, d)?);
                grads.push(randn(&[r, d], 0.01, DType::F32, &dev)?);
                m.push(Var::from_tensor(&Tensor::zeros((r, d), DType::F32, &dev)?)?);
                v.push(Var::from_tensor(&Tensor::zeros((r, d), DType::F32, &dev)?)?);
            }
            let hp = lorafuse_ops::AdamWParams::default();
            let mut step = 0;
            b.run("adamw", DType::F32, adamw_shape, || {
                step += 1;
                lorafuse_ops::adamw_step(&params, &grads, &m, &v, step, &hp)
            })?;
        }
    }
    if let Some(p) = &args.json {
        lorafuse::error::write_atomic(p, serde_json::to_string_pretty(&b.rows)?.as_bytes())?;
    }
    Ok(())
}

fn bench_decode(args: &DecodeArgs) -> anyhow::Result<()> {
    let loaded = args.model.load()?;
    let model = &loaded.model;
    let dev = &loaded.device;
    let vocab = model.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..args.prompt_tokens as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let mut path = "candle";
    let mut run = |new: usize| -> anyhow::Result<(f64, f64)> {
        let mut cache = model.new_cache(prompt.len() + new);
        dev.synchronize()?;
        let t0 = Instant::now();
        let input = Tensor::new(prompt.as_slice(), dev)?.unsqueeze(0)?;
        let logits = model.forward_last(&input, Some(&mut cache))?;
        // Greedy on the device, one id back to the host per step, as transformers' generate.
        let mut next = logits.argmax(D::Minus1)?.to_vec1::<u32>()?[0];
        // What `generate` does: the fused CUDA step where it applies (its setup counts as
        // prefill), else Candle's cached forward.
        let mut fused = model.fused_decoder(&cache, prompt.len() + new)?;
        let t1 = Instant::now();
        for i in 1..new {
            next = match fused.as_mut() {
                Some(f) => f.step_greedy(next, prompt.len() + i - 1)?,
                None => {
                    let input = Tensor::new(&[next], dev)?.unsqueeze(0)?;
                    let logits = model.forward_last(&input, Some(&mut cache))?;
                    logits.argmax(D::Minus1)?.to_vec1::<u32>()?[0]
                }
            };
        }
        dev.synchronize()?;
        path = match &fused {
            Some(f) if f.uses_graph() => "fused_graph",
            Some(_) => "fused",
            None => "candle",
        };
        Ok((
            t1.duration_since(t0).as_secs_f64(),
            t1.elapsed().as_secs_f64(),
        ))
    };
    run(8)?;
    let steps = args.new_tokens.saturating_sub(1);
    let mut runs = Vec::new();
    for _ in 0..args.repeat.max(1) {
        let (prefill, decode) = run(args.new_tokens)?;
        // tokens_per_s: decode steps only; with prefill: what transformers' generate reports
        // (new tokens over the whole call).
        runs.push((
            steps as f64 / decode.max(1e-9),
            args.new_tokens as f64 / (prefill + decode).max(1e-9),
            prefill,
        ));
    }
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (tps, tps_all, prefill) = runs[runs.len() / 2];
    let result = serde_json::json!({
        "impl": "lorafuse",
        "model": args.model.model.display().to_string(),
        "device": lorafuse::device::device_name(dev),
        "dtype": args.model.dtype,
        "quantize": args.model.quantize.map(|q| q.name()),
        "threads": candle_core::utils::get_num_threads(),
        "kernels": format!("{:?}", lorafuse_ops::kernel_mode()),
        "decode_path": path,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "prefill_ms": prefill * 1e3,
        "tokens_per_s": tps,
        "tokens_per_s_incl_prefill": tps_all,
        "runs_tokens_per_s": runs.iter().map(|r| r.0).collect::<Vec<_>>(),
        "load_average": std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_owned)),
    });
    println!("{result}");
    if let Some(p) = &args.json {
        lorafuse::error::write_atomic(p, result.to_string().as_bytes())?;
    }
    Ok(())
}

/// Device memory in use (total minus free), where the backend can tell.
fn device_mem_used(dev: &Device) -> Option<u64> {
    match dev {
        Device::Cpu => lorafuse::train::log::peak_rss_bytes(),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => candle_core::cuda::cudarc::driver::result::mem_get_info()
            .ok()
            .map(|(free, total)| (total - free) as u64),
        _ => None,
    }
}

fn bench_train(args: &TrainArgs) -> anyhow::Result<()> {
    use lorafuse::lora::{self, LoraConfig, TargetModules};
    let mut loaded = args.model.load()?;
    let dev = loaded.device.clone();
    let targets = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ];
    let cfg = LoraConfig::new(
        args.rank,
        2.0 * args.rank as f64,
        TargetModules::names(&targets),
    );
    lora::apply_lora(&mut loaded.model, "default", &cfg, DType::F32, 0)?;
    lora::set_training(&mut loaded.model, true);
    let named = lora::trainable_vars(&loaded.model);
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let opt = lorafuse::train::optim::AdamW::new(&named)?;
    let vocab = loaded.model.config().vocab_size as u32;
    let n = args.batch_size * args.seq_len;
    let ids: Vec<u32> = (0..n as u64)
        .map(|i| ((i * 2654435761) % vocab as u64) as u32)
        .collect();
    let batch = lorafuse::data::Batch {
        labels: ids.iter().map(|&i| i as i64).collect(),
        input_ids: ids,
        batch: args.batch_size,
        seq_len: args.seq_len,
        tokens: n,
    };
    let hp = lorafuse_ops::AdamWParams {
        lr: 1e-4,
        ..Default::default()
    };
    let mut step = 0;
    let mut loss = 0.0;
    let mut peak = 0u64;
    let mut run_step = |peak: &mut u64| -> anyhow::Result<f64> {
        step += 1;
        let g = lorafuse::train::loss::accumulate_grads(
            &loaded.model,
            &vars,
            std::slice::from_ref(&batch),
        )?;
        opt.step(&vars, &g.grads, step, &hp)?;
        *peak = (*peak).max(device_mem_used(&dev).unwrap_or(0));
        Ok(g.loss)
    };
    for _ in 0..args.warmup {
        run_step(&mut peak)?;
    }
    dev.synchronize()?;
    let t = Instant::now();
    for _ in 0..args.steps {
        loss = run_step(&mut peak)?;
    }
    dev.synchronize()?;
    let dt = t.elapsed().as_secs_f64();
    let result = serde_json::json!({
        "impl": "lorafuse",
        "model": args.model.model.display().to_string(),
        "device": lorafuse::device::device_name(&dev),
        "dtype": args.model.dtype,
        "kernels": format!("{:?}", lorafuse_ops::kernel_mode()),
        "batch": args.batch_size,
        "seq": args.seq_len,
        "rank": args.rank,
        "lora_params": vars.iter().map(|v| v.elem_count()).sum::<usize>(),
        "tokens_per_s": (n * args.steps) as f64 / dt,
        "step_ms": dt * 1e3 / args.steps as f64,
        "mem_used_gib": peak as f64 / (1u64 << 30) as f64,
        // torch.cuda.max_memory_allocated's measure (the peers' peak_gib), where the backend has it
        "peak_alloc_gib": lorafuse_ops::peak_allocated_bytes(&dev).map(|b| b as f64 / (1u64 << 30) as f64),
        "loss": loss,
    });
    println!("{result}");
    if let Some(p) = &args.json {
        lorafuse::error::write_atomic(p, result.to_string().as_bytes())?;
    }
    Ok(())
}

fn bench_embed(args: &EmbedBenchArgs) -> anyhow::Result<()> {
    let dev = lorafuse::device::parse_device(Some(&args.device))?;
    let dtype = lorafuse::device::parse_dtype(&args.dtype)?;
    let mut embedder = lorafuse::embed::Embedder::load(&args.model, &dev, dtype)?;
    if let Some(format) = args.quantize {
        super::embed::quantize_embedder(&mut embedder, format)?;
    }
    // The peers' documents: one sentence plus a number, ~29 tokens each.
    let doc = "Low-rank adaptation freezes the pretrained weights and trains small matrices in each layer, which makes fine-tuning cheap. ";
    let doc = doc.repeat(args.repeat.max(1));
    let docs: Vec<String> = (0..1000).map(|i| format!("{doc}{i}")).collect();
    let tokens = embedder.tokenize(&docs[..1])?[0].len();
    let mut rows = Vec::new();
    for n in [1usize, 32, 1000] {
        embedder.options_mut().batch_size = n.min(256);
        embedder.encode(&docs[..n])?;
        dev.synchronize()?;
        let reps = (200 / n).max(1);
        let t = Instant::now();
        for _ in 0..reps {
            embedder.encode(&docs[..n])?;
        }
        dev.synchronize()?;
        let s = t.elapsed().as_secs_f64() / reps as f64;
        let r = serde_json::json!({"impl": "lorafuse", "device": lorafuse::device::device_name(&dev),
            "dtype": args.dtype, "quantize": args.quantize.map(|q| q.name()), "docs": n, "tokens_per_doc": tokens, "ms": s * 1e3,
            "docs_per_s": n as f64 / s});
        println!("{r}");
        rows.push(r);
    }
    if let Some(p) = &args.json {
        lorafuse::error::write_atomic(p, serde_json::to_string_pretty(&rows)?.as_bytes())?;
    }
    Ok(())
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match &args.what {
        BenchWhat::Embed(a) => bench_embed(a),
        BenchWhat::Ops(a) => bench_ops(a),
        BenchWhat::Decode(a) => bench_decode(a),
        BenchWhat::Train(a) => bench_train(a),
    }
}
