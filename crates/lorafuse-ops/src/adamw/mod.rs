//! AdamW over a set of parameters, decoupled weight decay, bias-corrected, f32 state.

pub mod reference;

use candle_core::{Result, Tensor, Var};

/// AdamW hyper-parameters (PyTorch's defaults apart from `lr`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One AdamW step at `step` (1-based) over `params` with gradients `grads` and f32 moments `m`, `v`
/// (same shapes as the params). Updates params and moments in place.
pub fn adamw_step(
    params: &[Var],
    grads: &[Tensor],
    m: &[Var],
    v: &[Var],
    step: usize,
    hp: &AdamWParams,
) -> Result<()> {
    reference::adamw_step_reference(params, grads, m, v, step, hp)
}
