//! Causal attention with grouped-query heads: the fused flash-style op against the stock-Candle
//! reference (forward and the gradients of q, k and v), against finite differences in f64, on
//! prefill (`tq == tk`), decode (`tq == 1`) and chunked-prefill (`1 < tq < tk`) shapes.

use crate::common;

use candle_core::{DType, Device, Result, Tensor};
use common::{check_finite_differences, check_fused_vs_reference, rand_tensor};
use lorafuse_ops::attention::causal_attention_fused;
use lorafuse_ops::attention::reference::causal_attention_reference;

/// `(b, hq, hkv, tq, tk, d)`.
const SHAPES: &[(usize, usize, usize, usize, usize, usize)] = &[
    (2, 6, 2, 37, 37, 16),
    (2, 6, 2, 1, 9, 16),
    (1, 4, 4, 5, 12, 8),
    (1, 3, 1, 2, 2, 64),
];

fn inputs(s: (usize, usize, usize, usize, usize, usize), seed: u64) -> Result<Vec<Tensor>> {
    let (b, hq, hkv, tq, tk, d) = s;
    let cpu = &Device::Cpu;
    Ok(vec![
        rand_tensor(&[b, hq, tq, d], 1.0, seed, DType::F64, cpu)?,
        rand_tensor(&[b, hkv, tk, d], 1.0, seed + 1, DType::F64, cpu)?,
        rand_tensor(&[b, hkv, tk, d], 1.0, seed + 2, DType::F64, cpu)?,
    ])
}

fn scale_for(t: &[Tensor]) -> f64 {
    1.0 / (t[0].dims()[3] as f64).sqrt()
}
fn fused(t: &[Tensor]) -> Result<Tensor> {
    causal_attention_fused(&t[0], &t[1], &t[2], scale_for(t))
}
fn reference(t: &[Tensor]) -> Result<Tensor> {
    causal_attention_reference(&t[0], &t[1], &t[2], scale_for(t))
}

/// Gradient tolerance against the reference: f32 sums over up to 37 keys and 3 query heads; bf16
/// rounds the reference's own probabilities, so its bound is the dtype's, with the sum's growth.
fn grad_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::BF16 => 3e-2,
        _ => 5e-3,
    }
}

fn attention_matches_reference_on(dev: &Device) -> Result<()> {
    // not f64: the reference's softmax runs in f32 whatever the input (finite differences check
    // the f64 kernel instead)
    for dtype in common::dtypes(dev).into_iter().filter(|d| *d != DType::F64) {
        for (i, &s) in SHAPES.iter().enumerate() {
            let ins = inputs(s, 10 * i as u64)?;
            let what = format!("attention (b, hq, hkv, tq, tk, d) = {s:?}");
            check_fused_vs_reference(
                dev,
                dtype,
                &ins,
                3,
                &fused,
                &reference,
                grad_tol(dtype),
                &what,
            )?;
        }
    }
    Ok(())
}
test_device!(
    attention_matches_reference_on,
    attention_fwd_and_grads_match_reference_cpu,
    attention_fwd_and_grads_match_reference_cuda
);

#[test]
fn attention_bwd_matches_finite_differences() -> Result<()> {
    for (i, s) in [(1, 2, 1, 3, 5, 4), (1, 2, 2, 4, 4, 3)]
        .into_iter()
        .enumerate()
    {
        let ins = inputs(s, 100 + 10 * i as u64)?;
        check_finite_differences(&ins, 3, &fused, &format!("attention {s:?}"))?;
    }
    Ok(())
}

#[test]
fn attention_first_query_sees_only_first_key() -> Result<()> {
    // with tq == tk, row 0 attends to key 0 alone: its output is v[0] exactly
    let ins = inputs((1, 2, 1, 6, 6, 8), 200)?;
    let o = fused(&ins)?;
    for h in 0..2 {
        let got = o.get(0)?.get(h)?.get(0)?;
        let want = ins[2].get(0)?.get(0)?.get(0)?;
        assert!(
            common::max_abs_diff(&got, &want)? < 1e-15,
            "head {h}: first row is not v[0]"
        );
    }
    Ok(())
}

#[test]
fn attention_rejects_bad_shapes() -> Result<()> {
    let cpu = &Device::Cpu;
    let q = Tensor::zeros((1, 6, 4, 8), DType::F32, cpu)?;
    let k = Tensor::zeros((1, 4, 4, 8), DType::F32, cpu)?; // 6 % 4 != 0
    let err = causal_attention_fused(&q, &k, &k, 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("causal_attention") && err.contains("[1, 4, 4, 8]"),
        "unhelpful error: {err}"
    );
    let short_k = Tensor::zeros((1, 2, 3, 8), DType::F32, cpu)?; // tk < tq
    assert!(causal_attention_fused(&q, &short_k, &short_k, 1.0).is_err());
    Ok(())
}

#[test]
fn attention_public_fn_matches_reference() -> Result<()> {
    let _guard = common::mode_read();
    let ins = inputs((1, 4, 2, 7, 7, 8), 300)?;
    let got = lorafuse_ops::causal_attention(&ins[0], &ins[1], &ins[2], 0.3)?;
    let want = causal_attention_reference(&ins[0], &ins[1], &ins[2], 0.3)?;
    // f64 inputs, but the reference's softmax is f32
    common::assert_close(&got, &want, 1e-6, "causal_attention (dispatching)")
}
