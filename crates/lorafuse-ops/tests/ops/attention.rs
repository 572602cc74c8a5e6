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
    inputs_q_scaled(s, seed, 1.0)
}

/// `q` uniform in `[-q_scale, q_scale)`, `k` and `v` in `[-1, 1)` (f64, CPU).
fn inputs_q_scaled(
    s: (usize, usize, usize, usize, usize, usize),
    seed: u64,
    q_scale: f64,
) -> Result<Vec<Tensor>> {
    let (b, hq, hkv, tq, tk, d) = s;
    let cpu = &Device::Cpu;
    Ok(vec![
        rand_tensor(&[b, hq, tq, d], q_scale, seed, DType::F64, cpu)?,
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

/// Shapes that take the CUDA tensor-core kernels in bf16/f16 (head dims 64 and 128): lengths that
/// are not multiples of the 64-row tiles, several query and key tiles, `tq < tk` with offsets
/// below and above one tile, GQA groups of 1, 2 and 3, and a decode-sized `tq` (split-key
/// forward, tensor-core backward). f32 runs them through the tiled SIMT kernels.
const TC_SHAPES: &[(usize, usize, usize, usize, usize, usize)] = &[
    (2, 4, 2, 100, 100, 64),
    (1, 4, 4, 64, 64, 64),
    (1, 2, 1, 260, 260, 64),
    (1, 2, 1, 200, 333, 64),
    (1, 6, 2, 77, 130, 128),
    (1, 2, 1, 150, 150, 128),
    (1, 2, 2, 12, 70, 64),
];

/// The fused op on `TC_SHAPES` against the f32 reference on the same (rounded) inputs: the
/// forward within `common::tol(dtype)` (bf16 1e-2, f16 2e-3, relative to |want| + 1, as
/// `assert_close` measures), the gradients of q, k and v within `grad_tol(dtype)` (bf16 3e-2,
/// f16 5e-3). The tensor-core kernels round P and dS to the storage dtype before their matrix
/// products (as FlashAttention does), which these bounds cover with room. q is drawn from
/// [-2, 2) so that the softmax is far from uniform.
fn attention_tensor_core_shapes_on(dev: &Device) -> Result<()> {
    check_tc_shapes(dev, TC_SHAPES)
}

fn check_tc_shapes(
    dev: &Device,
    shapes: &[(usize, usize, usize, usize, usize, usize)],
) -> Result<()> {
    for dtype in common::dtypes(dev).into_iter().filter(|d| *d != DType::F64) {
        for (i, &s) in shapes.iter().enumerate() {
            let ins: Vec<Tensor> = inputs_q_scaled(s, 500 + 10 * i as u64, 2.0)?
                .iter()
                .map(|t| t.to_dtype(dtype)?.to_device(dev))
                .collect::<Result<_>>()?;
            let what = format!("attention (b, hq, hkv, tq, tk, d) = {s:?} {dtype:?}");
            let (out, grads) = common::grads_of(&ins, 3, 7, &fused)?;
            assert_eq!(out.dtype(), dtype, "{what}: output dtype");
            let oracle: Vec<Tensor> = ins
                .iter()
                .map(|t| t.to_dtype(common::oracle_dtype(dtype)))
                .collect::<Result<_>>()?;
            let (want, want_grads) = common::grads_of(&oracle, 3, 7, &reference)?;
            common::assert_close(&out, &want, common::tol(dtype), &format!("{what} forward"))?;
            for (n, (g, w)) in grads.iter().zip(&want_grads).enumerate() {
                assert_eq!(g.dtype(), dtype, "{what}: grad {n} dtype");
                common::assert_close(g, w, grad_tol(dtype), &format!("{what} grad of input {n}"))?;
            }
        }
    }
    Ok(())
}
test_device!(
    attention_tensor_core_shapes_on,
    attention_tensor_core_shapes_match_reference_cpu,
    attention_tensor_core_shapes_match_reference_cuda
);

/// A grid of two full waves or more of 128-row blocks takes the two-row-tile forward
/// (`attention_fwd_tc64x2`): here 4 x 32 heads x 9 query tiles = 1,152 blocks, two waves at two
/// blocks an SM on cards of up to 288 SMs. 1090 queries (not a multiple of the tile) over 1150
/// keys (an offset causal mask).
#[cfg(feature = "cuda")]
#[test]
fn attention_two_row_tile_forward_matches_reference_cuda() -> Result<()> {
    let Some(dev) = common::devices().into_iter().find(|d| d.is_cuda()) else {
        eprintln!("no CUDA device: skipping attention_two_row_tile_forward_matches_reference_cuda");
        return Ok(());
    };
    check_tc_shapes(&dev, &[(4, 32, 8, 1090, 1150, 64)])
}

/// Microseconds per call of the fused attention on CUDA, bf16, b 4, hq 14, hkv 2 (Qwen2.5-0.5B's
/// heads): the forward alone, and forward + backward through autograd as `(o * r).backward()`
/// (so the output gradient is the random `r`). That adds an elementwise product, its backward and
/// a ones-fill, timed alone on a variable of o's shape and printed as `harness`; the op's own
/// fwd+bwd is about the difference. (A `sum_all` loss would be no good here: Candle reduces to
/// one element with one block.) Warm-up, then many calls between two device synchronisations.
/// `LORAFUSE_ATTENTION_KERNEL=simple` times the warp-per-row kernels.
/// Run: `ops attention_timing --ignored --nocapture`.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "timing on a GPU, run by hand"]
fn attention_timing_cuda() -> Result<()> {
    use candle_core::Var;
    use std::time::Instant;
    let Some(dev) = common::devices().into_iter().find(|d| d.is_cuda()) else {
        eprintln!("no CUDA device: skipping attention_timing_cuda");
        return Ok(());
    };
    let kernel = std::env::var("LORAFUSE_ATTENTION_KERNEL").unwrap_or_else(|_| "default".into());
    for &(t, d) in &[(512usize, 64usize), (2048, 64), (2048, 128)] {
        let (b, hq, hkv) = (4, 14, 2);
        let ins = inputs_q_scaled((b, hq, hkv, t, t, d), 900, 1.0)?
            .iter()
            .map(|x| x.to_dtype(DType::BF16)?.to_device(&dev))
            .collect::<Result<Vec<_>>>()?;
        let scale = 1.0 / (d as f64).sqrt();
        let r = rand_tensor(&[b, hq, t, d], 1.0, 901, DType::BF16, &dev)?;
        let iters = if t <= 512 { 200 } else { 50 };
        let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
            for _ in 0..5 {
                f()?;
            }
            dev.synchronize()?;
            let start = Instant::now();
            for _ in 0..iters {
                f()?;
            }
            dev.synchronize()?;
            Ok(start.elapsed().as_secs_f64() * 1e6 / iters as f64)
        };
        let fwd = time(&|| causal_attention_fused(&ins[0], &ins[1], &ins[2], scale).map(drop))?;
        let vars = ins
            .iter()
            .map(Var::from_tensor)
            .collect::<Result<Vec<_>>>()?;
        let fwd_bwd = time(&|| {
            let (q, k, v) = (
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
            );
            (causal_attention_fused(q, k, v, scale)? * &r)?
                .backward()
                .map(drop)
        })?;
        let o_like = Var::from_tensor(&r)?;
        let harness = time(&|| (o_like.as_tensor() * &r)?.backward().map(drop))?;
        println!(
            "attention bf16 b{b} hq{hq} hkv{hkv} d{d} T={t} kernel={kernel}: fwd {fwd:.1} us, \
             fwd+bwd {fwd_bwd:.1} us (harness {harness:.1} us)"
        );
    }
    Ok(())
}

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
