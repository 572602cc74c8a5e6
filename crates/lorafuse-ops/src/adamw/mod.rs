//! AdamW over a set of parameters, decoupled weight decay, bias-corrected, f32 state.
//!
//! The fused step updates every tensor's parameter and both moments in one pass: on CUDA one
//! kernel launch covers all tensors (their device pointers packed into one table), in place; on
//! Metal one dispatch per tensor in Candle's one command encoder, in place; on the CPU a rayon
//! pass per tensor. The arithmetic is f32 in the reference's exact order of
//! operations (`m*b1 + g*(1-b1)`, `m_hat = m * (1/bc1)`, ...), so the two agree to the last bit
//! or two. Tensors the fused kernels do not cover (another device, an unusual dtype pair) go
//! through the reference.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "metal")]
mod metal;
pub mod reference;

use crate::dispatch::fused_enabled;
use crate::error::shape_err;
use candle_core::{DType, Device, Result, Tensor, Var};

const OP: &str = "adamw";

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

/// The per-step constants, rounded to f32 exactly where the reference's scalar ops round them.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct Coeffs {
    pub b1: f32,
    pub one_minus_b1: f32,
    pub b2: f32,
    pub one_minus_b2: f32,
    pub inv_bc1: f32,
    pub inv_bc2: f32,
    pub eps: f32,
    pub decay: f32,
    pub lr: f32,
}

impl Coeffs {
    fn new(hp: &AdamWParams, step: usize) -> Self {
        let t = step.max(1) as i32;
        Self {
            b1: hp.beta1 as f32,
            one_minus_b1: (1.0 - hp.beta1) as f32,
            b2: hp.beta2 as f32,
            one_minus_b2: (1.0 - hp.beta2) as f32,
            inv_bc1: (1.0 / (1.0 - hp.beta1.powi(t))) as f32,
            inv_bc2: (1.0 / (1.0 - hp.beta2.powi(t))) as f32,
            eps: hp.eps as f32,
            decay: (1.0 - hp.lr * hp.weight_decay) as f32,
            lr: hp.lr as f32,
        }
    }

    /// `(p, m, v)` after one step; the same expression tree as the reference and the CUDA kernel.
    #[inline(always)]
    pub(crate) fn apply(&self, p: f32, g: f32, m: f32, v: f32) -> (f32, f32, f32) {
        let m = m * self.b1 + g * self.one_minus_b1;
        let v = v * self.b2 + (g * g) * self.one_minus_b2;
        let m_hat = m * self.inv_bc1;
        let v_hat = v * self.inv_bc2;
        let update = m_hat / (v_hat.sqrt() + self.eps);
        (p * self.decay - update * self.lr, m, v)
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
    check(params, grads, m, v)?;
    if fused_enabled() {
        adamw_step_fused(params, grads, m, v, step, hp)
    } else {
        reference::adamw_step_reference(params, grads, m, v, step, hp)
    }
}

/// Counts, shapes and moment dtypes agree.
fn check(params: &[Var], grads: &[Tensor], m: &[Var], v: &[Var]) -> Result<()> {
    if grads.len() != params.len() || m.len() != params.len() || v.len() != params.len() {
        let msg = format!(
            "{} params, {} grads, {} m, {} v",
            params.len(),
            grads.len(),
            m.len(),
            v.len()
        );
        return Err(shape_err(OP, msg));
    }
    for (i, p) in params.iter().enumerate() {
        let ok = grads[i].shape() == p.shape()
            && m[i].shape() == p.shape()
            && v[i].shape() == p.shape()
            && m[i].dtype() == DType::F32
            && v[i].dtype() == DType::F32;
        if !ok {
            let msg = format!(
                "tensor {i}: param {:?} {:?}, grad {:?}, m {:?} {:?}, v {:?} {:?} (moments must be f32)",
                p.dims(),
                p.dtype(),
                grads[i].dims(),
                m[i].dims(),
                m[i].dtype(),
                v[i].dims(),
                v[i].dtype()
            );
            return Err(shape_err(OP, msg));
        }
    }
    Ok(())
}

/// The fused [`adamw_step`], whatever the kernel mode (tensors no kernel covers still go through
/// the reference).
pub fn adamw_step_fused(
    params: &[Var],
    grads: &[Tensor],
    m: &[Var],
    v: &[Var],
    step: usize,
    hp: &AdamWParams,
) -> Result<()> {
    check(params, grads, m, v)?;
    let coeffs = Coeffs::new(hp, step);
    let grads = grads
        .iter()
        .map(|g| g.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let contiguous =
        |i: &usize| params[*i].is_contiguous() && m[*i].is_contiguous() && v[*i].is_contiguous();
    let same_device = |i: &usize| {
        let d = params[*i].device();
        [grads[*i].device(), m[*i].device(), v[*i].device()]
            .iter()
            .all(|o| o.same_device(d))
    };
    let (eligible, mut rest): (Vec<usize>, Vec<usize>) =
        (0..params.len()).partition(|i| contiguous(i) && same_device(i));
    let (on_cpu, on_gpu): (Vec<usize>, Vec<usize>) = eligible
        .into_iter()
        .partition(|&i| params[i].device().is_cpu());
    rest.extend(cpu::step(&coeffs, &on_cpu, params, &grads, m, v)?);
    rest.extend(step_gpu(&coeffs, &on_gpu, params, &grads, m, v)?);
    if rest.is_empty() {
        return Ok(());
    }
    let pick_var = |xs: &[Var]| rest.iter().map(|&i| xs[i].clone()).collect::<Vec<_>>();
    let gs: Vec<Tensor> = rest.iter().map(|&i| grads[i].clone()).collect();
    reference::adamw_step_reference(&pick_var(params), &gs, &pick_var(m), &pick_var(v), step, hp)
}

/// Steps the GPU-resident tensors it can; returns the indices it left for the reference.
fn step_gpu(
    c: &Coeffs,
    idx: &[usize],
    params: &[Var],
    grads: &[Tensor],
    m: &[Var],
    v: &[Var],
) -> Result<Vec<usize>> {
    let (cuda_idx, other): (Vec<usize>, Vec<usize>) = idx
        .iter()
        .partition(|&&i| matches!(params[i].device(), Device::Cuda(_)));
    let (metal_idx, mut rest): (Vec<usize>, Vec<usize>) = other
        .into_iter()
        .partition(|&i| matches!(params[i].device(), Device::Metal(_)));
    #[cfg(feature = "cuda")]
    rest.extend(cuda::step(c, &cuda_idx, params, grads, m, v)?);
    #[cfg(not(feature = "cuda"))]
    rest.extend(cuda_idx);
    #[cfg(feature = "metal")]
    rest.extend(metal::step(c, &metal_idx, params, grads, m, v)?);
    #[cfg(not(feature = "metal"))]
    rest.extend(metal_idx);
    let _ = (c, grads, m, v);
    Ok(rest)
}
