//! AdamW state over the LoRA parameters, and gradient clipping by global norm.
//!
//! The moments are f32 whatever the parameters' dtype (bf16 moments lose the small `(1 - beta2)
//! g^2` increments), and are keyed by parameter name so that a checkpoint restores them onto the
//! right tensors even if module order changes.

use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

/// AdamW moments for a fixed list of named parameters.
#[derive(Debug)]
pub struct AdamW {
    names: Vec<String>,
    m: Vec<Var>,
    v: Vec<Var>,
}

impl AdamW {
    /// Zero moments shaped like `params`, on their devices.
    pub fn new(params: &[(String, Var)]) -> Result<Self> {
        let zeros = |p: &Var| -> Result<Var> { Ok(Var::zeros(p.shape(), DType::F32, p.device())?) };
        Ok(Self {
            names: params.iter().map(|(n, _)| n.clone()).collect(),
            m: params
                .iter()
                .map(|(_, p)| zeros(p))
                .collect::<Result<_>>()?,
            v: params
                .iter()
                .map(|(_, p)| zeros(p))
                .collect::<Result<_>>()?,
        })
    }

    /// One step (`step` is 1-based and sets the bias correction) over `params` with `grads`, both in
    /// the order given to [`AdamW::new`].
    pub fn step(
        &self,
        params: &[Var],
        grads: &[Tensor],
        step: usize,
        hp: &lorafuse_ops::AdamWParams,
    ) -> Result<()> {
        // The fused step wants gradients in the parameters' dtype.
        let grads = grads
            .iter()
            .zip(params)
            .map(|(g, p)| g.to_dtype(p.dtype()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        lorafuse_ops::adamw_step(params, &grads, &self.m, &self.v, step, hp)?;
        Ok(())
    }

    /// The moments as `<name>.exp_avg` / `<name>.exp_avg_sq` (PyTorch's names), for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.names.len() * 2);
        for (i, n) in self.names.iter().enumerate() {
            out.push((format!("{n}.exp_avg"), self.m[i].as_detached_tensor()));
            out.push((format!("{n}.exp_avg_sq"), self.v[i].as_detached_tensor()));
        }
        out
    }

    /// Restores the moments from [`AdamW::state_tensors`]' output; every parameter must be there
    /// with its shape, else the error names the key and `source`.
    pub fn load_state(
        &self,
        mut tensors: HashMap<String, Tensor>,
        source: &std::path::Path,
    ) -> Result<()> {
        for (i, n) in self.names.iter().enumerate() {
            for (suffix, var) in [("exp_avg", &self.m[i]), ("exp_avg_sq", &self.v[i])] {
                let key = format!("{n}.{suffix}");
                let t = tensors.remove(&key).ok_or_else(|| {
                    Error::key(source, &key, "missing optimizer state for this parameter")
                })?;
                if t.dims() != var.dims() {
                    return Err(Error::key(
                        source,
                        &key,
                        format!("expected shape {:?}, found {:?}", var.dims(), t.dims()),
                    ));
                }
                var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
            }
        }
        if let Some(k) = tensors.keys().next() {
            return Err(Error::key(
                source,
                k,
                "optimizer state for a parameter the adapter does not have",
            ));
        }
        Ok(())
    }
}

/// The L2 norm over all `grads` together, computed in f32.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        let sq = g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?;
        total += sq as f64;
    }
    Ok(total.sqrt())
}

/// Scales `grads` so that their global norm is at most `max_norm` (PyTorch's `clip_grad_norm_`:
/// factor `max_norm / (norm + 1e-6)` when it is below 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    let factor = max_norm / (norm + 1e-6);
    if norm.is_finite() && factor < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * factor)?;
        }
    }
    Ok(norm)
}
