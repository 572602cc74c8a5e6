//! AdamW from stock Candle ops, one parameter at a time: the fallback and the oracle.

use super::AdamWParams;
use crate::error::shape_err;
use candle_core::{DType, Result, Tensor, Var};

/// PyTorch's AdamW: `p -= lr*wd*p; p -= lr * m_hat / (sqrt(v_hat) + eps)`.
pub fn adamw_step_reference(
    params: &[Var],
    grads: &[Tensor],
    m: &[Var],
    v: &[Var],
    step: usize,
    hp: &AdamWParams,
) -> Result<()> {
    if grads.len() != params.len() || m.len() != params.len() || v.len() != params.len() {
        return Err(shape_err(
            "adamw",
            format!(
                "{} params, {} grads, {} m, {} v",
                params.len(),
                grads.len(),
                m.len(),
                v.len()
            ),
        ));
    }
    let t = step.max(1) as i32;
    let bc1 = 1.0 - hp.beta1.powi(t);
    let bc2 = 1.0 - hp.beta2.powi(t);
    for (((p, g), m), v) in params.iter().zip(grads).zip(m).zip(v) {
        let g = g.to_dtype(DType::F32)?;
        let pf = p.as_tensor().to_dtype(DType::F32)?;
        let m_new = ((m.as_tensor() * hp.beta1)? + (&g * (1.0 - hp.beta1))?)?;
        let v_new = ((v.as_tensor() * hp.beta2)? + (g.sqr()? * (1.0 - hp.beta2))?)?;
        let m_hat = (&m_new / bc1)?;
        let v_hat = (&v_new / bc2)?;
        let decayed = (&pf * (1.0 - hp.lr * hp.weight_decay))?;
        let update = (m_hat / (v_hat.sqrt()? + hp.eps)?)?;
        let p_new = (decayed - (update * hp.lr)?)?;
        p.set(&p_new.to_dtype(p.dtype())?)?;
        m.set(&m_new)?;
        v.set(&v_new)?;
    }
    Ok(())
}
