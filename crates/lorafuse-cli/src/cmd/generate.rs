//! `lorafuse generate`: prompt or chat, streaming, with speed reported at the end.

use super::adapters::AdapterArgs;
use super::common::ModelArgs;
use anyhow::Context;
use clap::Args;
use lorafuse::generate::chat::{render_chat, ChatMessage};
use lorafuse::generate::{generate, GenerateOptions, SamplingParams};
use std::io::Write;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// Fold the adapters into the base weights before generating, in memory (as `lorafuse merge`
    /// does on disk). Batch-1 decoding on CUDA then takes the fused decode step, which live
    /// adapters rule out; with bf16/f16 weights the merged weights are rounded to that dtype.
    #[arg(long, requires = "adapters")]
    pub merge_adapters: bool,
    /// The prompt (with --chat: the user's message).
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template (as a user turn) and open an assistant turn.
    #[arg(long)]
    pub chat: bool,
    /// A system message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Keep only the K most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (1.0: off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Drop tokens less likely than this fraction of the most likely one (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f64,
    /// Penalise tokens already present (divide positive logits, multiply negative ones; 1.0: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print one JSON object (text, tokens, speeds) instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let mut loaded = args.model.load()?;
    args.adapters.apply(&mut loaded.model)?;
    if args.merge_adapters {
        lorafuse::lora::merge_adapters(&mut loaded.model)?;
        eprintln!("adapters merged into the weights");
    }
    let tok = &loaded.tokenizer;
    let prompt = if args.chat {
        let template = tok.chat_template.as_deref().with_context(|| {
            format!(
                "{} has no chat template: run without --chat",
                args.model.model.display()
            )
        })?;
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(ChatMessage::new("system", s.clone()));
        }
        messages.push(ChatMessage::new("user", args.prompt.clone()));
        render_chat(
            template,
            &messages,
            true,
            tok.bos_token.as_deref(),
            tok.eos_token.as_deref(),
        )?
    } else {
        args.prompt.clone()
    };
    // A rendered chat template already holds its special tokens, as in transformers.
    let ids = tok.encode(&prompt, !args.chat)?;
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        },
        stop: args.stop.clone(),
    };
    let stdout = std::io::stdout();
    let streaming = !args.json;
    let mut on_text = |piece: &str| {
        if streaming {
            let mut out = stdout.lock();
            // A closed pipe (e.g. `| head`) is not worth aborting generation over.
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    };
    let g = generate(&loaded.model, tok, &ids, &opts, &mut on_text)?;
    if args.json {
        let v = serde_json::json!({
            "text": g.text,
            "tokens": g.tokens,
            "prompt_tokens": g.prompt_tokens,
            "stop_reason": g.stop_reason,
            "prompt_tokens_per_s": g.prompt_tps(),
            "decode_tokens_per_s": g.decode_tps(),
        });
        println!("{v}");
    } else {
        println!();
    }
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s | generation: {} tokens, {:.1} tokens/s ({:?})",
        g.prompt_tokens,
        g.prompt_tps(),
        g.tokens.len(),
        g.decode_tps(),
        g.stop_reason
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::GenerateArgs;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GenerateArgs,
    }

    #[test]
    fn merge_adapters_needs_an_adapter() {
        let base = [
            "lorafuse",
            "--model",
            "m.gguf",
            "--prompt",
            "hi",
            "--merge-adapters",
        ];
        let err = Cli::try_parse_from(base).err().map(|e| e.kind());
        assert_eq!(err, Some(clap::error::ErrorKind::MissingRequiredArgument));
        let ok = Cli::try_parse_from(base.iter().copied().chain(["--adapter", "a"])).unwrap();
        assert!(ok.args.merge_adapters);
        assert_eq!(ok.args.adapters.adapters, vec!["a".to_string()]);
    }
}
