//! `lorafuse train`: LoRA fine-tuning with a progress bar, mlx-lm-style log lines, checkpoints,
//! `--resume`, a JSONL log and a loss plot. With no arguments it runs the shipped job: SmolLM2 on
//! `data/`, then the base and tuned answers to the held-out prompts side by side.
//!
//! Every training option is an `Option` here and falls back to `TrainConfig::default()` (or, on
//! `--resume`, to the checkpoint's config), so defaults live in the library only.

use super::common::ModelArgs;
use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lorafuse::data::{self, DataOptions};
use lorafuse::generate::chat::{render_chat, ChatMessage};
use lorafuse::generate::{generate, GenerateOptions, SamplingParams};
use lorafuse::lora;
use lorafuse::models::Llama;
use lorafuse::tokenizer::TextTokenizer;
use lorafuse::train::{self, TrainConfig, TrainData, TrainEvent, Trainer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

fn d() -> TrainConfig {
    TrainConfig::default()
}

fn dflt(text: &str, v: impl std::fmt::Display) -> String {
    format!("{text} [default: {v}]")
}

/// Fine-tune a LoRA adapter (PEFT format) on a JSONL data folder.
#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Data folder with train.jsonl and optional valid.jsonl (and heldout.jsonl for --compare).
    #[arg(long, default_value = "data")]
    pub data: PathBuf,
    /// Where the adapter, log, plot and checkpoints go [default: adapters/main-job, or with
    /// --resume the adapter folder the checkpoint belongs to].
    #[arg(long)]
    pub adapter_out: Option<PathBuf>,
    /// A JSON file with a TrainConfig (any subset of its fields); options given here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Continue from a checkpoint: a checkpoints/step-N folder, or an adapter folder (its latest
    /// checkpoint). Its config is the base; options given here override it.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,

    #[arg(long, help = dflt("LoRA rank", d().lora.rank))]
    pub rank: Option<usize>,
    #[arg(long, help = dflt("LoRA alpha (scale = alpha / rank)", d().lora.alpha))]
    pub alpha: Option<f64>,
    #[arg(long, help = dflt("Dropout on the adapters' input", d().lora.dropout))]
    pub dropout: Option<f64>,
    #[arg(
        long,
        help = "Modules to adapt: all-linear, names like q_proj,v_proj, or re:<regex> over the module path [default: all-linear]"
    )]
    pub targets: Option<String>,
    #[arg(long, help = dflt("Adapt only the last N layers; 0 adapts every layer (fewer layers train faster)", d().lora.num_layers.unwrap_or(0)))]
    pub num_layers: Option<usize>,
    /// rsLoRA scaling: alpha / sqrt(rank).
    #[arg(long)]
    pub use_rslora: bool,

    #[arg(long, help = dflt("Peak learning rate", d().lr))]
    pub lr: Option<f64>,
    #[arg(long, value_parser = ["constant", "linear", "cosine"], help = dflt("Learning-rate schedule after warmup", d().schedule))]
    pub schedule: Option<String>,
    #[arg(long, help = dflt("Linear warmup steps", d().warmup))]
    pub warmup: Option<usize>,
    #[arg(long, help = dflt("Learning rate that linear/cosine decay head for", d().min_lr))]
    pub min_lr: Option<f64>,
    #[arg(long, help = dflt("Optimizer steps", d().iters))]
    pub iters: Option<usize>,
    #[arg(long, help = dflt("Sequences per micro-batch", d().batch_size))]
    pub batch_size: Option<usize>,
    #[arg(long, help = dflt("Micro-batches per optimizer step", d().grad_accum))]
    pub grad_accum: Option<usize>,
    #[arg(long, help = dflt("Truncate examples to this many tokens", d().max_seq_len))]
    pub max_seq_len: Option<usize>,
    /// Pack several examples per row instead of padding one per row.
    #[arg(long)]
    pub packing: bool,
    #[arg(long, help = dflt("Validation loss every N steps (0: never)", d().val_every))]
    pub val_every: Option<usize>,
    #[arg(long, help = dflt("Validation batches per evaluation (0: all)", d().val_batches))]
    pub val_batches: Option<usize>,
    #[arg(long, help = dflt("Checkpoint every N steps (0: final adapter only)", d().save_every))]
    pub save_every: Option<usize>,
    #[arg(long, help = dflt("A log line every N steps", d().steps_per_report))]
    pub steps_per_report: Option<usize>,
    #[arg(long, help = dflt("Seed of the data order, LoRA init and dropout", d().seed))]
    pub seed: Option<u64>,
    #[arg(long, help = dflt("Clip gradients to this global norm (0: off)", d().clip_grad_norm.unwrap_or(0.0)))]
    pub clip_grad_norm: Option<f64>,
    #[arg(long, help = dflt("AdamW decoupled weight decay", d().weight_decay))]
    pub weight_decay: Option<f64>,

    /// Held-out prompts ({"prompt": ...} per line) to answer with the base and the tuned model
    /// after training [default: <data>/heldout.jsonl when it exists].
    #[arg(long, value_name = "FILE")]
    pub compare: Option<PathBuf>,
    /// Skip the base/tuned comparison.
    #[arg(long)]
    pub no_compare: bool,
    /// New tokens per answer in the comparison.
    #[arg(long, default_value_t = 48)]
    pub compare_tokens: usize,
    /// Print JSON lines (reports, validations, the summary) on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

impl TrainArgs {
    /// Lays the options given on the command line over `cfg`.
    fn overlay(&self, mut cfg: TrainConfig) -> anyhow::Result<TrainConfig> {
        macro_rules! set {
            ($($field:ident).+ = $opt:expr) => {
                if let Some(v) = $opt {
                    cfg.$($field).+ = v;
                }
            };
        }
        set!(lora.rank = self.rank);
        set!(lora.alpha = self.alpha);
        set!(lora.dropout = self.dropout);
        if let Some(t) = &self.targets {
            cfg.lora.targets = train::parse_targets(t)?;
        }
        if let Some(n) = self.num_layers {
            cfg.lora.num_layers = (n > 0).then_some(n);
        }
        if self.use_rslora {
            cfg.lora.use_rslora = true;
        }
        set!(lr = self.lr);
        if let Some(s) = &self.schedule {
            cfg.schedule = s.parse()?;
        }
        set!(warmup = self.warmup);
        set!(min_lr = self.min_lr);
        set!(iters = self.iters);
        set!(batch_size = self.batch_size);
        set!(grad_accum = self.grad_accum);
        set!(max_seq_len = self.max_seq_len);
        if self.packing {
            cfg.packing = true;
        }
        set!(val_every = self.val_every);
        set!(val_batches = self.val_batches);
        set!(save_every = self.save_every);
        set!(steps_per_report = self.steps_per_report);
        set!(seed = self.seed);
        if let Some(c) = self.clip_grad_norm {
            cfg.clip_grad_norm = (c > 0.0).then_some(c);
        }
        set!(weight_decay = self.weight_decay);
        cfg.validate()?;
        Ok(cfg)
    }
}

/// One held-out prompt.
#[derive(serde::Deserialize)]
struct HeldOut {
    prompt: String,
    #[serde(default)]
    system: Option<String>,
}

fn read_heldout(path: &Path) -> anyhow::Result<Vec<HeldOut>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let h: HeldOut = serde_json::from_str(line).with_context(|| {
            format!("{}:{}: expected {{\"prompt\": ...}}", path.display(), i + 1)
        })?;
        out.push(h);
    }
    Ok(out)
}

fn answer(
    model: &Llama,
    tok: &TextTokenizer,
    h: &HeldOut,
    max_tokens: usize,
) -> anyhow::Result<String> {
    let template = tok
        .chat_template
        .as_deref()
        .context("the model has no chat template: --compare needs one")?;
    let mut messages = Vec::new();
    if let Some(s) = &h.system {
        messages.push(ChatMessage::new("system", s.clone()));
    }
    messages.push(ChatMessage::new("user", h.prompt.clone()));
    let prompt = render_chat(
        template,
        &messages,
        true,
        tok.bos_token.as_deref(),
        tok.eos_token.as_deref(),
    )?;
    let ids = tok.encode(&prompt, false)?;
    let opts = GenerateOptions {
        max_tokens,
        sampling: SamplingParams::default(),
        stop: vec![],
    };
    Ok(generate(model, tok, &ids, &opts, &mut |_| {})?
        .text
        .trim()
        .to_owned())
}

/// Wraps `s` into lines of at most `width` characters.
fn wrap(s: &str, width: usize) -> Vec<String> {
    let mut out = Vec::new();
    for para in s.lines() {
        let mut line = String::new();
        for word in para.split_whitespace() {
            if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
                out.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        out.push(line);
    }
    out
}

fn side_by_side(left_title: &str, left: &str, right_title: &str, right: &str) -> String {
    const W: usize = 44;
    let (l, r) = (wrap(left, W), wrap(right, W));
    let mut s = format!(
        "  {left_title:<W$} | {right_title}\n  {:-<W$}-+-{:-<W$}\n",
        "", ""
    );
    for i in 0..l.len().max(r.len()) {
        let a = l.get(i).map(String::as_str).unwrap_or("");
        let b = r.get(i).map(String::as_str).unwrap_or("");
        s.push_str(&format!("  {a:<W$} | {b}\n"));
    }
    s
}

/// Prints a line above the progress bar (indicatif drops `println` while the bar is hidden, as it
/// is when stderr is not a terminal).
fn say(pb: &ProgressBar, line: &str) {
    if pb.is_hidden() {
        println!("{line}");
    } else {
        pb.suspend(|| println!("{line}"));
    }
}

fn compare(
    model: &mut Llama,
    tok: &TextTokenizer,
    prompts: &[HeldOut],
    args: &TrainArgs,
) -> anyhow::Result<Vec<serde_json::Value>> {
    lora::set_training(model, false);
    let mut out = Vec::new();
    for h in prompts {
        lora::disable_adapters(model)?;
        let base = answer(model, tok, h, args.compare_tokens)?;
        lora::set_active_adapter(model, train::ADAPTER_NAME)?;
        let tuned = answer(model, tok, h, args.compare_tokens)?;
        if !args.json {
            println!("\nHeld-out prompt: {}", h.prompt);
            print!(
                "{}",
                side_by_side("base model", &base, "tuned (LoRA)", &tuned)
            );
        }
        out.push(serde_json::json!({"prompt": h.prompt, "base": base, "tuned": tuned}));
    }
    Ok(out)
}

pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let ckpt = args
        .resume
        .as_deref()
        .map(train::resolve_checkpoint)
        .transpose()?;
    let base_cfg = match (&ckpt, &args.config) {
        (Some(c), _) => train::checkpoint::read_state(c)?.config,
        (None, Some(f)) => lorafuse::error::read_json::<TrainConfig>(f)?,
        (None, None) => TrainConfig::default(),
    };
    let cfg = args.overlay(base_cfg)?;
    let out = match (&args.adapter_out, &ckpt) {
        (Some(o), _) => o.clone(),
        // checkpoints/step-N -> the adapter folder two levels up.
        (None, Some(c)) => c
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .context("cannot tell the adapter folder of the checkpoint: pass --adapter-out")?,
        (None, None) => PathBuf::from("adapters/main-job"),
    };
    let heldout_path = match (&args.compare, args.no_compare) {
        (_, true) => None,
        (Some(p), false) => Some(p.clone()),
        (None, false) => Some(args.data.join("heldout.jsonl")).filter(|p| p.exists()),
    };
    let heldout = heldout_path.as_deref().map(read_heldout).transpose()?;

    let mut loaded = args.model.load()?;
    let tok = loaded.tokenizer.clone();
    let splits = data::load_dir(
        &args.data,
        &tok,
        &DataOptions {
            max_seq_len: cfg.max_seq_len,
        },
    )?;
    let data = TrainData {
        train: Arc::from(splits.train.examples.clone()),
        valid: splits
            .valid
            .as_ref()
            .map(|v| v.examples.clone())
            .unwrap_or_default(),
        pad_id: data::pad_id(&tok),
    };
    if !args.json {
        eprintln!(
            "data: {} training examples ({} tokens), {} validation examples",
            splits.train.examples.len(),
            splits.train.tokens(),
            data.valid.len()
        );
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let model = &mut loaded.model;
    let mut trainer = match &ckpt {
        Some(c) => {
            eprintln!("resuming from {}", c.display());
            Trainer::resume(model, cfg.clone(), c, data, Some(&out))?
        }
        None => Trainer::new(model, cfg.clone(), data, Some(&out))?,
    };
    let n_params: usize = trainer.params().iter().map(|(_, v)| v.elem_count()).sum();
    if !args.json {
        eprintln!(
            "LoRA: rank {} alpha {} on {} tensors ({} trainable parameters); {} steps of batch {} x {} accum, lr {:e} {}",
            cfg.lora.rank,
            cfg.lora.alpha,
            trainer.params().len(),
            n_params,
            cfg.iters,
            cfg.batch_size,
            cfg.grad_accum,
            cfg.lr,
            cfg.schedule
        );
    }
    let pb = ProgressBar::new(cfg.iters as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_position(trainer.step_count() as u64);
    let json = args.json;
    let mut on_event = |e: TrainEvent<'_>| match e {
        TrainEvent::Step(s) => {
            pb.set_position(s.step as u64);
            pb.set_message(format!("loss {:.3}", s.loss));
        }
        TrainEvent::Report(r) => {
            if json {
                let v = serde_json::json!({"event": "report", "step": r.step, "train_loss": r.train_loss,
                    "lr": r.lr, "it_per_s": r.it_per_s, "tokens_per_s": r.tokens_per_s,
                    "trained_tokens": r.trained_tokens, "peak_mem_bytes": r.peak_mem_bytes});
                say(&pb, &v.to_string());
            } else {
                say(&pb, &r.to_string());
            }
        }
        TrainEvent::Validation { step, loss } => {
            if json {
                let v = serde_json::json!({"event": "validation", "step": step, "val_loss": loss});
                say(&pb, &v.to_string());
            } else {
                say(&pb, &format!("Iter {step}: val loss {loss:.3}"));
            }
        }
        TrainEvent::Checkpoint { step, dir } => {
            if !json {
                say(
                    &pb,
                    &format!("Iter {step}: checkpoint saved to {}", dir.display()),
                );
            }
        }
    };
    let summary = trainer.run(&mut on_event);
    pb.finish_and_clear();
    let summary = summary?;
    drop(trainer);
    let train_secs = summary.secs;
    if !json {
        println!(
            "Trained {} steps in {:.1} s ({} tokens); adapter, train_log.jsonl and loss.png in {}",
            summary.steps,
            train_secs,
            summary.trained_tokens,
            out.display()
        );
        if let (Some(first), Some(last)) = (summary.val_losses.first(), summary.val_losses.last()) {
            println!(
                "val loss {:.3} (step {}) -> {:.3} (step {})",
                first.1, first.0, last.1, last.0
            );
        }
    }
    let comparison = match &heldout {
        Some(prompts) if !prompts.is_empty() => compare(model, &tok, prompts, args)?,
        _ => Vec::new(),
    };
    if json {
        let v = serde_json::json!({"event": "done", "steps": summary.steps, "train_secs": train_secs,
            "total_secs": started.elapsed().as_secs_f64(), "trained_tokens": summary.trained_tokens,
            "val_losses": summary.val_losses, "adapter": out, "comparison": comparison});
        println!("{v}");
    } else {
        println!("\nTotal time {:.1} s", started.elapsed().as_secs_f64());
    }
    Ok(())
}
