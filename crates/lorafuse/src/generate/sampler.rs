//! Next-token sampling with the logits processors of transformers' `generate`, in its order:
//! repetition penalty, then temperature, top-k, top-p and min-p.

use crate::{Error, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// How the next token is chosen. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to at least `p` (1.0: off).
    pub top_p: f64,
    /// Drop tokens less likely than `min_p` times the most likely one (0: off).
    pub min_p: f64,
    /// Divides positive and multiplies negative logits of tokens seen before (1.0: off).
    pub repetition_penalty: f64,
    /// Seed of the sampling RNG: the same seed gives the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges, naming the option at fault.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &str, v: f64, range: &str| {
            Err(Error::Invalid(format!("--{name} {v}: must be {range}")))
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", self.temperature, ">= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top-p", self.top_p, "in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min-p", self.min_p, "in [0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition-penalty", self.repetition_penalty, "> 0");
        }
        Ok(())
    }
}

/// A seeded sampler.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// True when the choice is the plain argmax of the logits (temperature 0, no repetition
    /// penalty), which a decoder may then compute on the device.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0 && self.params.repetition_penalty == 1.0
    }

    /// Picks the next token from `logits` (one row over the vocabulary), given the ids so far
    /// (prompt and generated) for the repetition penalty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::Invalid("sampling from empty logits".into()));
        }
        let mut logits = logits.to_vec();
        apply_repetition_penalty(&mut logits, history, self.params.repetition_penalty as f32);
        if self.params.temperature == 0.0 {
            return Ok(argmax(&logits));
        }
        let probs = filtered_probs(&logits, &self.params);
        let total: f64 = probs.iter().map(|&(_, p)| p).sum();
        let mut r = self.rng.random::<f64>() * total;
        for &(id, p) in &probs {
            if r < p {
                return Ok(id);
            }
            r -= p;
        }
        // Rounding left r at the very end: the last kept token.
        Ok(probs
            .last()
            .map(|&(id, _)| id)
            .unwrap_or_else(|| argmax(&logits)))
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each distinct seen token once.
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &id in history {
        let i = id as usize;
        if i < logits.len() && !seen[i] {
            seen[i] = true;
            let l = logits[i];
            logits[i] = if l > 0.0 { l / penalty } else { l * penalty };
        }
    }
}

/// Index of the largest logit (the first one on ties, as torch's argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The tokens that survive temperature, top-k, top-p and min-p, with their (unnormalised)
/// probabilities, most likely first.
pub fn filtered_probs(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
    let t = p.temperature.max(f64::MIN_POSITIVE);
    let mut scored: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (i as u32, l as f64 / t))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if p.top_k > 0 && p.top_k < scored.len() {
        scored.truncate(p.top_k);
    }
    let Some(&(_, max)) = scored.first() else {
        return scored;
    };
    let mut probs: Vec<(u32, f64)> = scored
        .into_iter()
        .map(|(i, l)| (i, (l - max).exp()))
        .collect();
    let total: f64 = probs.iter().map(|&(_, q)| q).sum();
    if p.top_p < 1.0 {
        // Keep tokens until the kept mass reaches top_p (always at least one).
        let mut cum = 0.0;
        let mut keep = 0;
        for &(_, q) in &probs {
            keep += 1;
            cum += q / total;
            if cum >= p.top_p {
                break;
            }
        }
        probs.truncate(keep.max(1));
    }
    if p.min_p > 0.0 {
        // probs[0] is the most likely token, exp(0) = 1 before normalisation.
        let cut = p.min_p * probs[0].1;
        probs.retain(|&(_, q)| q >= cut);
    }
    probs
}
