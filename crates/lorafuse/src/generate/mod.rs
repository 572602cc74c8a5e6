//! Text generation with a KV cache: prefill the prompt once, then one cached step per token,
//! sampling, stop on EOS / stop strings / max tokens, streaming text as it decodes.

pub mod chat;
pub mod sampler;
pub mod stop;

use crate::models::Llama;
use crate::tokenizer::{TextTokenizer, TokenStream};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
pub use sampler::{Sampler, SamplingParams};
use std::time::Instant;
pub use stop::StopWatch;

/// What to generate and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// At most this many new tokens.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before any of these strings; they are not part of the output.
    pub stop: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: vec![],
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
}

/// The result of one generation, with timings (prefill and decode separately).
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// New token ids, EOS excluded.
    pub tokens: Vec<u32>,
    /// New text, cut before any stop string.
    pub text: String,
    pub stop_reason: StopReason,
    /// Seconds to process the prompt and produce the first token.
    pub prompt_secs: f64,
    /// Cached single-token forward passes after the prompt.
    pub decode_steps: usize,
    /// Seconds for those steps (sampling included).
    pub decode_secs: f64,
}

impl Generation {
    /// Prompt tokens per second.
    pub fn prompt_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_secs.max(1e-9)
    }

    /// Decode tokens per second: cached steps over their time.
    pub fn decode_tps(&self) -> f64 {
        self.decode_steps as f64 / self.decode_secs.max(1e-9)
    }
}

fn last_logits(logits: &Tensor) -> Result<Vec<f32>> {
    Ok(logits
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Generates from `prompt_ids`, calling `on_text` with each piece of text as soon as it is final.
pub fn generate(
    model: &Llama,
    tok: &TextTokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    if prompt_ids.is_empty() {
        return Err(Error::Invalid(
            "empty prompt: nothing to condition on".into(),
        ));
    }
    let context = model.config().max_position_embeddings;
    if prompt_ids.len() >= context {
        return Err(Error::ContextOverflow {
            tokens: prompt_ids.len(),
            context,
        });
    }
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let max_new = opts.max_tokens.min(context - prompt_ids.len());
    let mut cache = model.new_cache(prompt_ids.len() + max_new);
    let mut eos: Vec<u32> = tok.eos_ids.clone();
    eos.extend(model.config().eos_token_ids.iter().copied());
    let mut history = prompt_ids.to_vec();
    let mut stream = TokenStream::new();
    let mut stops = StopWatch::new(&opts.stop);
    let mut tokens = Vec::new();
    let mut stop_reason = StopReason::MaxTokens;

    let start = Instant::now();
    let input = Tensor::new(prompt_ids, model.device())?.unsqueeze(0)?;
    let mut logits = last_logits(&model.forward_last(&input, Some(&mut cache))?)?;
    // On CUDA the steps after the prefill run as one fused graph per token where it applies.
    let mut fused = if max_new > 1 {
        model.fused_decoder(&cache, prompt_ids.len() + max_new)?
    } else {
        None
    };
    let mut first_token_at = None;
    let mut decode_steps = 0;
    // The fused greedy step returns the next token itself (argmax on the device).
    let mut chosen: Option<u32> = None;
    let greedy = sampler.is_greedy();
    for step in 0..max_new {
        let next = match chosen.take() {
            Some(id) => id,
            None => sampler.sample(&logits, &history)?,
        };
        first_token_at.get_or_insert_with(Instant::now);
        if eos.contains(&next) {
            stop_reason = StopReason::Eos;
            break;
        }
        tokens.push(next);
        history.push(next);
        if let Some(piece) = stream.push(tok, next)? {
            let shown = stops.push(&piece);
            if !shown.is_empty() {
                on_text(&shown);
            }
            if stops.stopped() {
                stop_reason = StopReason::StopString;
                break;
            }
        }
        if step + 1 == max_new {
            break;
        }
        match fused.as_mut() {
            Some(dec) if greedy => chosen = Some(dec.step_greedy(next, history.len() - 1)?),
            Some(dec) => logits = dec.step(next, history.len() - 1)?,
            None => {
                let input = Tensor::new(&[next], model.device())?.unsqueeze(0)?;
                logits = last_logits(&model.forward_last(&input, Some(&mut cache))?)?;
            }
        }
        decode_steps += 1;
    }
    if !stops.stopped() {
        let rest = stops.finish();
        if !rest.is_empty() {
            on_text(&rest);
        }
    }
    let first = first_token_at.unwrap_or_else(Instant::now);
    let prompt_secs = first.duration_since(start).as_secs_f64();
    let decode_secs = first.elapsed().as_secs_f64();
    Ok(Generation {
        prompt_tokens: prompt_ids.len(),
        tokens,
        text: stops.text().to_string(),
        stop_reason,
        prompt_secs,
        decode_steps,
        decode_secs,
    })
}
