//! LoRA linear (frozen base + low-rank delta): the fused ops against the stock-Candle reference
//! (forward and autograd) and against finite differences, and the claims LoRA training rests on:
//! the frozen base weight gets no gradient, and a zero `B` leaves the base output untouched.

use crate::common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{
    assert_close, bitwise_equal, check_finite_differences, grad_tol, grads_of, oracle_dtype,
    rand_tensor, OpFn,
};
use lorafuse_ops::lora_linear::reference::{frozen_linear_reference, lora_delta_reference};
use lorafuse_ops::lora_linear::{frozen_linear_fused, lora_delta_fused, lora_linear_fused};

/// `(x shape, out features)`: one token of 7 features, 5 x 33, and a 3-D batch of 3 x 17 x 65.
const SHAPES: &[(&[usize], usize)] = &[(&[1, 7], 5), (&[5, 33], 20), (&[3, 17, 65], 40)];
const RANKS: &[usize] = &[1, 4, 8];
const SCALE: f64 = 2.0;

/// Inputs `[x, A, B, W, bias]`: the first three train, the last two are frozen.
fn inputs(x_shape: &[usize], out: usize, r: usize, seed: u64) -> Result<Vec<Tensor>> {
    let cpu = &Device::Cpu;
    let d = *x_shape.last().unwrap_or(&1);
    Ok(vec![
        rand_tensor(x_shape, 1.0, seed, DType::F64, cpu)?,
        rand_tensor(&[r, d], 0.5, seed + 1, DType::F64, cpu)?,
        rand_tensor(&[out, r], 0.5, seed + 2, DType::F64, cpu)?,
        rand_tensor(&[out, d], 0.5, seed + 3, DType::F64, cpu)?,
        rand_tensor(&[out], 0.5, seed + 4, DType::F64, cpu)?,
    ])
}

fn lora_fused(t: &[Tensor]) -> Result<Tensor> {
    lora_linear_fused(&t[0], &t[3], Some(&t[4]), &t[1], &t[2], SCALE)
}
fn lora_ref(t: &[Tensor]) -> Result<Tensor> {
    frozen_linear_reference(&t[0], &t[3], Some(&t[4]))?
        + lora_delta_reference(&t[0], &t[1], &t[2], SCALE)?
}
fn delta_fused(t: &[Tensor]) -> Result<Tensor> {
    lora_delta_fused(&t[0], &t[1], &t[2], SCALE)
}
fn delta_ref(t: &[Tensor]) -> Result<Tensor> {
    lora_delta_reference(&t[0], &t[1], &t[2], SCALE)
}
/// `frozen_linear` over inputs `[x, W, bias]`.
fn frozen_fused(t: &[Tensor]) -> Result<Tensor> {
    frozen_linear_fused(&t[0], &t[1], Some(&t[2]))
}
fn frozen_ref(t: &[Tensor]) -> Result<Tensor> {
    frozen_linear_reference(&t[0], &t[1], Some(&t[2]))
}
fn frozen_nobias_fused(t: &[Tensor]) -> Result<Tensor> {
    frozen_linear_fused(&t[0], &t[1], None)
}
fn frozen_nobias_ref(t: &[Tensor]) -> Result<Tensor> {
    frozen_linear_reference(&t[0], &t[1], None)
}

/// Gradient tolerance: bf16 gradients sum ~50 rows into values near 20, where the bf16 spacing
/// is 0.125; the stock reference run in bf16 lands exactly as far from the f32 oracle (3e-2).
fn lora_grad_tol(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 6e-2,
        DType::F16 => 2e-2,
        d => grad_tol(d),
    }
}

/// Forward tolerance against the oracle (the reference in f32 for half types, on the same rounded
/// inputs). The fused op rounds three times in the storage dtype (the base GEMM output, the
/// rank-r intermediate, the sum: cuBLAS and gemm accumulate the low-rank product onto the rounded
/// base output), so half types get a few output ulps: bf16's ulp is 2^-8 (3.9e-3) relative, and
/// the worst case seen on CPU and CUDA is 1.2e-2 to 1.3e-2.
fn lora_fwd_tol(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2e-2,
        DType::F16 => 5e-3,
        d => common::tol(d),
    }
}

/// The fused op against the reference on `dev` in `dtype`: forward against the reference in
/// [`oracle_dtype`] (a bf16 reference chain rounds at every step and is no oracle), and the
/// gradients of the first `n_vars` inputs against the reference's autograd in that dtype.
fn check_vs_reference(
    dev: &Device,
    dtype: DType,
    inputs: &[Tensor],
    n_vars: usize,
    fns: (OpFn, OpFn),
    what: &str,
) -> Result<()> {
    check_vs_reference_scaled(dev, dtype, inputs, n_vars, fns, what, 1.0)
}

/// [`check_vs_reference`] with the half-precision tolerances times `half_scale`.
fn check_vs_reference_scaled(
    dev: &Device,
    dtype: DType,
    inputs: &[Tensor],
    n_vars: usize,
    (fused, reference): (OpFn, OpFn),
    what: &str,
    half_scale: f64,
) -> Result<()> {
    let scale = if matches!(dtype, DType::BF16 | DType::F16) {
        half_scale
    } else {
        1.0
    };
    let ins: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(dtype)?.to_device(dev))
        .collect::<Result<_>>()?;
    let ref_ins: Vec<Tensor> = ins
        .iter()
        .map(|t| t.to_dtype(oracle_dtype(dtype)))
        .collect::<Result<_>>()?;
    let (out, grads) = grads_of(&ins, n_vars, 7, fused)?;
    let (want, want_grads) = grads_of(&ref_ins, n_vars, 7, reference)?;
    assert_eq!(out.dtype(), dtype, "{what}: output dtype");
    let fwd_what = format!("{what} {dtype:?} forward");
    assert_close(&out, &want, lora_fwd_tol(dtype) * scale, &fwd_what)?;
    for (i, (g, w)) in grads.iter().zip(&want_grads).enumerate() {
        assert_eq!(g.dtype(), dtype, "{what}: grad {i} dtype");
        let grad_what = format!("{what} {dtype:?} grad of input {i}");
        assert_close(g, w, lora_grad_tol(dtype) * scale, &grad_what)?;
    }
    Ok(())
}

fn lora_ops_match_reference(dev: &Device) -> Result<()> {
    for dtype in common::dtypes(dev) {
        for (si, &(shape, out)) in SHAPES.iter().enumerate() {
            for &r in RANKS {
                let ins = inputs(shape, out, r, (si * 10 + r) as u64)?;
                let what = format!("lora_linear x{shape:?} out {out} r {r}");
                check_vs_reference(dev, dtype, &ins, 3, (&lora_fused, &lora_ref), &what)?;
                let what = format!("lora_delta x{shape:?} out {out} r {r}");
                check_vs_reference(dev, dtype, &ins[..3], 3, (&delta_fused, &delta_ref), &what)?;
            }
            let ins = inputs(shape, out, 1, 100 + si as u64)?;
            let frozen = [ins[0].clone(), ins[3].clone(), ins[4].clone()];
            let what = format!("frozen_linear x{shape:?} out {out}");
            check_vs_reference(dev, dtype, &frozen, 1, (&frozen_fused, &frozen_ref), &what)?;
            let what = format!("frozen_linear (no bias) x{shape:?} out {out}");
            let fns: (OpFn, OpFn) = (&frozen_nobias_fused, &frozen_nobias_ref);
            check_vs_reference(dev, dtype, &frozen[..2], 1, fns, &what)?;
        }
    }
    Ok(())
}
test_device!(
    lora_ops_match_reference,
    lora_fwd_and_grads_match_reference_cpu,
    lora_fwd_and_grads_match_reference_cuda
);

/// Decode-sized inputs (1 to 16 rows), which CUDA runs as one kernel (`lora_linear.cu`): rows
/// rounded up to 1, 4 and 16 accumulators, 16-byte rows (`in` a multiple of 8) and a ragged
/// output count, ranks up to the kernel's 64, and one call past its P-work limit
/// (16 * 32 * 2304 multiply-adds) that takes the GEMM route, checked in f32 and f64 only (half
/// types over 2304-long sums need bounds of their own). Forward and the gradients of x, A, B.
/// Half types round each of the r terms of P before the rank-r sum, so their tolerances grow as
/// sqrt(r / 8) past the rank 8 the shared bounds were set for (the CPU engine needs that too).
fn lora_decode_sizes_match_reference(dev: &Device) -> Result<()> {
    let cases: &[(&[usize], usize, usize)] = &[
        (&[1, 512], 96, 8),
        (&[3, 256], 40, 16),
        (&[9, 64], 17, 4),
        (&[16, 136], 33, 64),
        (&[16, 2304], 24, 32),
    ];
    for dtype in common::dtypes(dev) {
        for (ci, &(shape, out, r)) in cases.iter().enumerate() {
            let long = shape.last().is_some_and(|&k| k > 1024);
            if long && matches!(dtype, DType::BF16 | DType::F16) {
                continue;
            }
            let ins = inputs(shape, out, r, 300 + ci as u64)?;
            let half_scale = (r as f64 / 8.0).sqrt().max(1.0);
            let what = format!("lora_linear x{shape:?} out {out} r {r}");
            let fns: (OpFn, OpFn) = (&lora_fused, &lora_ref);
            check_vs_reference_scaled(dev, dtype, &ins, 3, fns, &what, half_scale)?;
            let what = format!("lora_delta x{shape:?} out {out} r {r}");
            let fns: (OpFn, OpFn) = (&delta_fused, &delta_ref);
            check_vs_reference_scaled(dev, dtype, &ins[..3], 3, fns, &what, half_scale)?;
        }
    }
    Ok(())
}
test_device!(
    lora_decode_sizes_match_reference,
    lora_decode_sizes_match_reference_cpu,
    lora_decode_sizes_match_reference_cuda
);

#[test]
fn lora_bwd_matches_finite_differences() -> Result<()> {
    let ins = inputs(&[2, 3, 5], 4, 2, 40)?;
    check_finite_differences(&ins, 3, &lora_fused, "lora_linear")?;
    check_finite_differences(&ins[..3], 3, &delta_fused, "lora_delta")?;
    let frozen = [ins[0].clone(), ins[3].clone(), ins[4].clone()];
    check_finite_differences(&frozen, 1, &frozen_fused, "frozen_linear")
}

fn frozen_base_gets_no_grad_on(dev: &Device) -> Result<()> {
    let ins = inputs(&[3, 9], 6, 4, 50)?;
    let vars = ins
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(dev)?))
        .collect::<Result<Vec<_>>>()?;
    let [x, a, b, w, bias] = [0, 1, 2, 3, 4].map(|i| vars[i].as_tensor().clone());
    let y = lora_linear_fused(&x, &w, Some(&bias), &a, &b, SCALE)?;
    let y = (y + frozen_linear_fused(&x, &w, Some(&bias))?)?;
    let grads = y.sqr()?.sum_all()?.backward()?;
    assert!(grads.get(&w).is_none(), "the frozen weight got a gradient");
    assert!(grads.get(&bias).is_none(), "the frozen bias got a gradient");
    for (t, name) in [(&x, "x"), (&a, "A"), (&b, "B")] {
        let g = grads
            .get(t)
            .unwrap_or_else(|| panic!("{name} got no gradient"));
        assert!(
            g.abs()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
                > 0.0,
            "{name}'s gradient is zero"
        );
    }
    Ok(())
}
test_device!(
    frozen_base_gets_no_grad_on,
    frozen_base_gets_no_grad,
    frozen_base_gets_no_grad_cuda
);

fn lora_b_zero_gives_base_output_on(dev: &Device) -> Result<()> {
    for dtype in common::dtypes(dev) {
        let ins = inputs(&[4, 2, 12], 10, 8, 60)?;
        let t = |i: usize| ins[i].to_dtype(dtype)?.to_device(dev);
        let (x, a, w, bias) = (t(0)?, t(1)?, t(3)?, t(4)?);
        let b = Tensor::zeros((10, 8), dtype, dev)?;
        let y = lora_linear_fused(&x, &w, Some(&bias), &a, &b, SCALE)?;
        let base = frozen_linear_fused(&x, &w, Some(&bias))?;
        assert_eq!(y.dims(), &[4, 2, 10]);
        assert!(
            bitwise_equal(&y, &base)?,
            "{dtype:?}: B = 0 changed the base output"
        );
    }
    Ok(())
}
test_device!(
    lora_b_zero_gives_base_output_on,
    lora_b_zero_gives_base_output,
    lora_b_zero_gives_base_output_cuda
);

#[test]
fn lora_linear_rejects_mismatched_shapes() -> Result<()> {
    let dev = &Device::Cpu;
    let x = Tensor::zeros((2, 8), DType::F32, dev)?;
    let w = Tensor::zeros((4, 8), DType::F32, dev)?;
    let a = Tensor::zeros((2, 8), DType::F32, dev)?;
    let b = Tensor::zeros((4, 2), DType::F32, dev)?;
    let bad_a = Tensor::zeros((2, 7), DType::F32, dev)?;
    let bad_b = Tensor::zeros((5, 2), DType::F32, dev)?;
    let bad_bias = Tensor::zeros(3, DType::F32, dev)?;
    assert!(lora_linear_fused(&x, &w, None, &bad_a, &b, 1.0).is_err());
    assert!(lora_linear_fused(&x, &w, None, &a, &bad_b, 1.0).is_err());
    assert!(lora_linear_fused(&x, &w, Some(&bad_bias), &a, &b, 1.0).is_err());
    assert!(frozen_linear_fused(&x, &bad_a.t()?.contiguous()?, None).is_err());
    let err = lora_delta_fused(&x, &bad_a, &b, 1.0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lora_linear") && err.contains("[2, 7]"),
        "unhelpful error: {err}"
    );
    Ok(())
}

#[test]
fn lora_linear_public_fn_dispatches_to_fused_and_reference_alike() -> Result<()> {
    let _guard = common::mode_read();
    let ins = inputs(&[3, 11], 7, 4, 70)?;
    let want = lora_ref(&ins)?;
    let got = lorafuse_ops::lora_linear(&ins[0], &ins[3], Some(&ins[4]), &ins[1], &ins[2], SCALE)?;
    common::assert_close(&got, &want, 1e-12, "lora_linear (dispatching)")
}

/// f32 factors under a bf16/f16 input (f32 master weights of a half-precision model): the same
/// output and gradients as casting the factors first, with f32 gradients for the factors.
fn lora_linear_f32_factors_under_half_on(dev: &Device) -> Result<()> {
    for dtype in [DType::BF16, DType::F16] {
        let x = rand_tensor(&[3, 5, 64], 1.0, 21, dtype, dev)?;
        let w = rand_tensor(&[48, 64], 0.5, 22, dtype, dev)?;
        let bias = rand_tensor(&[48], 0.5, 23, dtype, dev)?;
        let a = rand_tensor(&[8, 64], 0.5, 24, DType::F32, dev)?;
        let b = rand_tensor(&[48, 8], 0.5, 25, DType::F32, dev)?;
        let mixed =
            |t: &[Tensor]| lorafuse_ops::lora_linear(&t[0], &w, Some(&bias), &t[1], &t[2], SCALE);
        let cast = |t: &[Tensor]| {
            let (a, b) = (t[1].to_dtype(dtype)?, t[2].to_dtype(dtype)?);
            lorafuse_ops::lora_linear(&t[0], &w, Some(&bias), &a, &b, SCALE)
        };
        let inputs = [x, a, b];
        let (y, g) = grads_of(&inputs, 3, 26, &mixed)?;
        let (want, want_g) = grads_of(&inputs, 3, 26, &cast)?;
        let what = format!("lora_linear f32 factors, {dtype:?} x");
        assert_eq!(y.dtype(), dtype, "{what}: output dtype");
        assert_eq!(g[1].dtype(), DType::F32, "{what}: dA dtype");
        assert_eq!(g[2].dtype(), DType::F32, "{what}: dB dtype");
        assert_close(&y, &want, common::tol(dtype), &what)?;
        for (i, name) in ["dx", "dA", "dB"].iter().enumerate() {
            assert_close(
                &g[i],
                &want_g[i],
                common::tol(dtype),
                &format!("{what} {name}"),
            )?;
        }
    }
    Ok(())
}
test_device!(
    lora_linear_f32_factors_under_half_on,
    lora_linear_f32_factors_under_half_cpu,
    lora_linear_f32_factors_under_half_cuda
);
