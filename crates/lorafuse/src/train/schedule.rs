//! Learning-rate schedules, as a pure function of the 1-based optimizer step.
//!
//! With peak rate `lr`, `W` warmup steps and `T` steps in all:
//! - warmup (`s <= W`): `lr * s / W`, so the first step already moves (transformers' warmup
//!   starts at 0 and wastes a step) and step `W` runs at the peak;
//! - after it, with progress `p = (s - W - 1) / (T - W)` in `[0, 1)`:
//!   constant `lr`; linear `min + (lr - min) (1 - p)`; cosine `min + (lr - min) (1 + cos(pi p)) / 2`.
//!   The first step after warmup runs at the peak and the last one just above `min`, so no step
//!   is spent at a zero rate.

use super::config::{Schedule, TrainConfig};

/// The learning rate of step `step` (1-based) under `cfg`.
pub fn lr_at(cfg: &TrainConfig, step: usize) -> f64 {
    let (lr, w, t) = (cfg.lr, cfg.warmup, cfg.iters);
    let s = step.max(1);
    if s <= w {
        return lr * s as f64 / w as f64;
    }
    let span = t.saturating_sub(w).max(1);
    let p = ((s - w - 1) as f64 / span as f64).min(1.0);
    let min = cfg.min_lr;
    match cfg.schedule {
        Schedule::Constant => lr,
        Schedule::Linear => min + (lr - min) * (1.0 - p),
        Schedule::Cosine => min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
    }
}
