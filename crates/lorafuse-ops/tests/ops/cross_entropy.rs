//! Cross-entropy with `ignore_index`: the fused op against the stock-Candle reference (loss and
//! logits gradient, every reduction), against finite differences in f64, and the masking claims.

use crate::common;

use candle_core::{DType, Device, Result, Tensor};
use common::{assert_close, grads_of, max_abs_diff, rand_tensor};
use lorafuse_ops::cross_entropy::reference::cross_entropy_reference;
use lorafuse_ops::cross_entropy::{cross_entropy_fused, linear_cross_entropy_sum, Reduction};

const IGNORE: i64 = -100;
const REDUCTIONS: [Reduction; 3] = [Reduction::Mean, Reduction::Sum, Reduction::None];

/// Targets for `n` rows over `vocab`: every third row ignored, the rest spread over the vocabulary
/// (first and last index included).
fn targets(n: usize, vocab: usize, dev: &Device) -> Result<Tensor> {
    let t: Vec<i64> = (0..n)
        .map(|i| match i % 3 {
            2 => IGNORE,
            0 => ((i * 7919) % vocab) as i64,
            _ => (vocab - 1 - (i % vocab)) as i64,
        })
        .collect();
    Tensor::from_vec(t, n, dev)
}

fn fused(red: Reduction) -> impl Fn(&[Tensor]) -> Result<Tensor> {
    move |t: &[Tensor]| cross_entropy_fused(&t[0], &t[1], IGNORE, red)
}
fn reference(red: Reduction) -> impl Fn(&[Tensor]) -> Result<Tensor> {
    move |t: &[Tensor]| cross_entropy_reference(&t[0], &t[1], IGNORE, red)
}

/// Loss tolerance: the reference computes in f32 whatever the logits' dtype (f64 included), and
/// the oracle sees the same rounded half-precision logits, so 1e-5 holds for every dtype.
fn loss_tol(_dtype: DType) -> f64 {
    1e-5
}

/// Gradient tolerance: the fused gradient is rounded once to the logits' dtype.
fn grad_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 | DType::F32 => 1e-6,
        DType::BF16 => 1e-2,
        _ => 2e-3,
    }
}

fn cross_entropy_matches_reference_on(dev: &Device) -> Result<()> {
    for dtype in common::dtypes(dev) {
        for (n, vocab) in [(7usize, 1000usize), (5, 32003), (1, 1)] {
            let logits = rand_tensor(&[n, vocab], 6.0, vocab as u64, dtype, dev)?;
            let t = targets(n, vocab, dev)?;
            let oracle = common::oracle_dtype(dtype);
            for red in REDUCTIONS {
                let what = format!("cross_entropy {n}x{vocab} {dtype:?} {red:?}");
                let (loss, grads) = grads_of(&[logits.clone(), t.clone()], 1, 3, &fused(red))?;
                let ref_in = [logits.to_dtype(oracle)?, t.clone()];
                let (want, want_grads) = grads_of(&ref_in, 1, 3, &reference(red))?;
                assert_eq!(grads[0].dtype(), dtype, "{what}: gradient dtype");
                assert_close(&loss, &want.to_dtype(loss.dtype())?, loss_tol(dtype), &what)?;
                assert_close(
                    &grads[0],
                    &want_grads[0],
                    grad_tol(dtype),
                    &format!("{what} grad"),
                )?;
            }
        }
    }
    Ok(())
}
test_device!(
    cross_entropy_matches_reference_on,
    cross_entropy_fwd_and_grad_match_reference_cpu,
    cross_entropy_fwd_and_grad_match_reference_cuda
);

#[test]
fn cross_entropy_bwd_matches_finite_differences() -> Result<()> {
    let cpu = &Device::Cpu;
    let logits = rand_tensor(&[4, 7], 3.0, 1, DType::F64, cpu)?;
    let t = Tensor::new(&[3i64, IGNORE, 0, 6], cpu)?;
    for red in REDUCTIONS {
        let (_, grads) = grads_of(&[logits.clone(), t.clone()], 1, 11, &fused(red))?;
        let fd = common::finite_diff(&[logits.clone(), t.clone()], 0, 11, 1e-5, &fused(red))?;
        let d = max_abs_diff(&grads[0], &fd)?;
        assert!(
            d < 1e-8,
            "{red:?}: gradient differs from finite differences by {d:e}"
        );
    }
    Ok(())
}

fn cross_entropy_ignores_ignore_index_on(dev: &Device) -> Result<()> {
    let logits = rand_tensor(&[6, 50], 4.0, 5, DType::F32, dev)?;
    let t = Tensor::new(&[1i64, IGNORE, 49, IGNORE, 0, 7], dev)?;
    // rewriting the ignored rows' logits changes nothing
    let noise = rand_tensor(&[6, 50], 100.0, 6, DType::F32, dev)?;
    let mask = Tensor::new(&[0f32, 1., 0., 1., 0., 0.], dev)?.unsqueeze(1)?;
    let perturbed = (&logits + noise.broadcast_mul(&mask)?)?;
    for red in REDUCTIONS {
        let a = cross_entropy_fused(&logits, &t, IGNORE, red)?;
        let b = cross_entropy_fused(&perturbed, &t, IGNORE, red)?;
        assert!(
            common::bitwise_equal(&a, &b)?,
            "{red:?}: an ignored row changed the loss"
        );
    }
    let per_row = cross_entropy_fused(&logits, &t, IGNORE, Reduction::None)?.to_vec1::<f32>()?;
    assert_eq!(
        (per_row[1], per_row[3]),
        (0.0, 0.0),
        "ignored rows must have zero loss"
    );
    // the mean divides by the 4 counted rows, not 6
    let mean = cross_entropy_fused(&logits, &t, IGNORE, Reduction::Mean)?.to_scalar::<f32>()?;
    let sum: f32 = per_row.iter().sum();
    assert!(
        (mean - sum / 4.0).abs() < 1e-5,
        "mean {mean} vs sum/4 {}",
        sum / 4.0
    );
    // and the ignored rows get exactly zero gradient
    let (_, grads) = grads_of(&[logits, t], 1, 3, &fused(Reduction::Mean))?;
    let g = grads[0].to_vec2::<f32>()?;
    assert!(
        g[1].iter().chain(&g[3]).all(|&x| x == 0.0),
        "ignored rows got a gradient"
    );
    assert!(
        g[0].iter().any(|&x| x != 0.0),
        "a counted row got no gradient"
    );
    Ok(())
}
test_device!(
    cross_entropy_ignores_ignore_index_on,
    cross_entropy_ignores_ignore_index,
    cross_entropy_ignores_ignore_index_cuda
);

fn cross_entropy_all_ignored_rows_give_zero_on(dev: &Device) -> Result<()> {
    let logits = rand_tensor(&[3, 10], 2.0, 9, DType::F32, dev)?;
    let t = Tensor::new(&[IGNORE; 3], dev)?;
    for red in REDUCTIONS {
        let (loss, grads) = grads_of(&[logits.clone(), t.clone()], 1, 3, &fused(red))?;
        let want = cross_entropy_reference(&logits, &t, IGNORE, red)?;
        assert!(
            common::bitwise_equal(&loss, &want)?,
            "{red:?}: loss {loss} vs {want}"
        );
        let total = grads[0].abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(total, 0.0, "{red:?}: all-ignored rows got a gradient");
    }
    Ok(())
}
test_device!(
    cross_entropy_all_ignored_rows_give_zero_on,
    cross_entropy_all_ignored_rows_give_zero,
    cross_entropy_all_ignored_rows_give_zero_cuda
);

fn cross_entropy_takes_u32_targets_on(dev: &Device) -> Result<()> {
    let logits = rand_tensor(&[4, 300], 3.0, 12, DType::F32, dev)?;
    let t = Tensor::new(&[0u32, 299, 17, 150], dev)?;
    let t64 = t.to_dtype(DType::I64)?;
    for red in REDUCTIONS {
        let a = cross_entropy_fused(&logits, &t, IGNORE, red)?;
        let b = cross_entropy_fused(&logits, &t64, IGNORE, red)?;
        assert!(
            common::bitwise_equal(&a, &b)?,
            "{red:?}: u32 and i64 targets disagree"
        );
    }
    Ok(())
}
test_device!(
    cross_entropy_takes_u32_targets_on,
    cross_entropy_takes_u32_targets,
    cross_entropy_takes_u32_targets_cuda
);

#[test]
fn cross_entropy_rejects_bad_targets() -> Result<()> {
    let cpu = &Device::Cpu;
    let logits = Tensor::zeros((2, 5), DType::F32, cpu)?;
    let err = cross_entropy_fused(
        &logits,
        &Tensor::new(&[1i64, 5], cpu)?,
        IGNORE,
        Reduction::Mean,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("target 5 at row 1"), "unhelpful error: {err}");
    let short = Tensor::new(&[1i64], cpu)?;
    assert!(lorafuse_ops::cross_entropy(&logits, &short, IGNORE, Reduction::Sum).is_err());
    Ok(())
}

#[test]
fn cross_entropy_public_fn_matches_reference() -> Result<()> {
    let _guard = common::mode_read();
    let cpu = &Device::Cpu;
    let logits = rand_tensor(&[9, 77], 5.0, 13, DType::F32, cpu)?;
    let t = targets(9, 77, cpu)?;
    let got = lorafuse_ops::cross_entropy(&logits, &t, IGNORE, Reduction::Mean)?;
    let want = cross_entropy_reference(&logits, &t, IGNORE, Reduction::Mean)?;
    assert_close(&got, &want, 1e-6, "cross_entropy (dispatching)")
}

/// The fused LM head + summed loss against the two ops composed: loss and input gradient. The
/// chunk size splits the rows into chunks of 8 (the CUDA path; elsewhere the ops are composed).
fn linear_cross_entropy_matches_composed_on(dev: &Device) -> Result<()> {
    for dtype in common::dtypes(dev) {
        let (n, hidden, vocab) = (37usize, 64usize, 3001usize);
        let h = rand_tensor(&[n, hidden], 1.0, 11, dtype, dev)?;
        let w = rand_tensor(&[vocab, hidden], 0.5, 12, dtype, dev)?;
        let t = targets(n, vocab, dev)?;
        let chunk = 8 * vocab * dtype.size_in_bytes();
        let what = format!("linear_cross_entropy_sum {dtype:?}");
        let fused = |x: &[Tensor]| linear_cross_entropy_sum(&x[0], &w, &t, IGNORE, chunk);
        let composed = |x: &[Tensor]| {
            let logits = lorafuse_ops::frozen_linear(&x[0], &w, None)?;
            lorafuse_ops::cross_entropy(&logits, &t, IGNORE, Reduction::Sum)
        };
        let (loss, g) = grads_of(std::slice::from_ref(&h), 1, 5, &fused)?;
        let (want, want_g) = grads_of(std::slice::from_ref(&h), 1, 5, &composed)?;
        let loss_dtype = if dtype == DType::F64 {
            dtype
        } else {
            DType::F32
        };
        assert_eq!(loss.dtype(), loss_dtype, "{what}: loss dtype");
        assert_eq!(g[0].dtype(), dtype, "{what}: gradient dtype");
        let (loss_tol, g_tol) = match dtype {
            DType::F64 | DType::F32 => (1e-5, 1e-4),
            _ => (1e-2, 3e-2),
        };
        assert_close(&loss, &want, loss_tol, &what)?;
        assert_close(&g[0], &want_g[0], g_tol, &format!("{what} grad"))?;
        // no gradient wanted: the loss alone, the same value
        let plain = linear_cross_entropy_sum(&h, &w, &t, IGNORE, chunk)?;
        assert_close(&plain, &want, loss_tol, &format!("{what} (no grad)"))?;
    }
    Ok(())
}
test_device!(
    linear_cross_entropy_matches_composed_on,
    linear_cross_entropy_matches_composed_cpu,
    linear_cross_entropy_matches_composed_cuda
);
