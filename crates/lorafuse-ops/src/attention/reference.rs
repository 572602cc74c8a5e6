//! Causal attention composed from stock Candle ops (materialises the scores): fallback and oracle.

use crate::error::shape_err;
use candle_core::{DType, Result, Tensor};

/// Repeats each KV head `n_rep` times along the head dimension.
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, h, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, h, n_rep, t, d))?
        .reshape((b, h * n_rep, t, d))
}

/// `softmax(q k^T * scale + causal_mask) v`, softmax in f32.
pub fn causal_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, hq, tq, d) = q.dims4()?;
    let (kb, hkv, tk, kd) = k.dims4()?;
    if kb != b || kd != d || hkv == 0 || hq % hkv != 0 || tk < tq || v.dims() != k.dims() {
        return Err(shape_err(
            "causal_attention",
            format!("q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims()),
        ));
    }
    let k = repeat_kv(k, hq / hkv)?.contiguous()?;
    let v = repeat_kv(v, hq / hkv)?.contiguous()?;
    let scores = (q.contiguous()?.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let offset = tk - tq;
    let mask: Vec<f32> = (0..tq)
        .flat_map(|i| {
            (0..tk).map(move |j| {
                if j <= i + offset {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (tq, tk), q.device())?;
    let scores = scores.broadcast_add(&mask)?;
    let probs = crate::softmax::reference::softmax_reference(&scores)?.to_dtype(q.dtype())?;
    probs.matmul(&v)
}
