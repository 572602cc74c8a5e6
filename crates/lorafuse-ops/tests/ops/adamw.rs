//! AdamW: the fused step against the stock-Candle reference over several steps and tensors of odd
//! shapes, for f32, f64 and half-precision parameters (moments always f32).

use crate::common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{max_abs_diff, rand_tensor};
use lorafuse_ops::adamw::reference::adamw_step_reference;
use lorafuse_ops::adamw::{adamw_step_fused, AdamWParams};

const SHAPES: &[&[usize]] = &[&[1], &[7, 3], &[8, 65], &[2, 3, 129], &[4099]];

/// Fresh parameters `[p, m, v]` per shape: params random, moments zero.
fn state(dtype: DType, dev: &Device, seed: u64) -> Result<Vec<[Var; 3]>> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p = rand_tensor(s, 1.0, seed + i as u64, dtype, dev)?;
            let z = Tensor::zeros(*s, DType::F32, dev)?;
            Ok([
                Var::from_tensor(&p)?,
                Var::from_tensor(&z)?,
                Var::from_tensor(&z)?,
            ])
        })
        .collect()
}

fn split(st: &[[Var; 3]]) -> [Vec<Var>; 3] {
    [0, 1, 2].map(|k| st.iter().map(|t| t[k].clone()).collect())
}

fn adamw_matches_reference_on(dev: &Device) -> Result<()> {
    let hp = AdamWParams {
        lr: 3e-3,
        weight_decay: 0.1,
        ..AdamWParams::default()
    };
    for dtype in common::dtypes(dev) {
        let fused_state = state(dtype, dev, 1)?;
        let ref_state = state(dtype, dev, 1)?;
        let [fp, fm, fv] = split(&fused_state);
        let [rp, rm, rv] = split(&ref_state);
        for step in 1..=4 {
            // gradients in the params' dtype, different each step, some of them large
            let grads = SHAPES
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    rand_tensor(
                        s,
                        10f64.powi(i as i32 - 2),
                        100 * step + i as u64,
                        dtype,
                        dev,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            adamw_step_fused(&fp, &grads, &fm, &fv, step as usize, &hp)?;
            adamw_step_reference(&rp, &grads, &rm, &rv, step as usize, &hp)?;
        }
        for (i, (f, r)) in fused_state.iter().zip(&ref_state).enumerate() {
            for (k, name) in ["param", "m", "v"].iter().enumerate() {
                let d = max_abs_diff(f[k].as_tensor(), r[k].as_tensor())?;
                // one f32 rounding apart at most; half params round to the same value
                assert!(
                    d <= 1e-6,
                    "{dtype:?} tensor {i} {name}: fused and reference differ by {d:e}"
                );
            }
            assert_eq!(f[0].dtype(), dtype, "the param's dtype changed");
        }
    }
    Ok(())
}
test_device!(
    adamw_matches_reference_on,
    adamw_matches_reference,
    adamw_matches_reference_cuda
);

#[test]
fn adamw_first_step_moves_each_param_by_lr() -> Result<()> {
    // at step 1, m_hat = g and v_hat = g^2, so the update is lr * sign(g) (eps aside)
    let dev = &Device::Cpu;
    let hp = AdamWParams {
        lr: 0.01,
        weight_decay: 0.0,
        ..AdamWParams::default()
    };
    let p = Var::from_tensor(&Tensor::new(&[1f32, -2., 3.], dev)?)?;
    let m = Var::zeros(3, DType::F32, dev)?;
    let v = Var::zeros(3, DType::F32, dev)?;
    let g = Tensor::new(&[0.5f32, -4., 1e-3], dev)?;
    adamw_step_fused(std::slice::from_ref(&p), &[g], &[m], &[v], 1, &hp)?;
    let got = p.as_tensor().to_vec1::<f32>()?;
    for (x, want) in got.iter().zip([0.99f32, -1.99, 2.99]) {
        assert!((x - want).abs() < 1e-5, "{got:?}");
    }
    Ok(())
}

#[test]
fn adamw_rejects_mismatched_lists() -> Result<()> {
    let dev = &Device::Cpu;
    let p = Var::zeros((2, 3), DType::F32, dev)?;
    let m = Var::zeros((2, 3), DType::F32, dev)?;
    let v = Var::zeros((2, 3), DType::F32, dev)?;
    let g = Tensor::zeros((3, 2), DType::F32, dev)?;
    let hp = AdamWParams::default();
    let err = adamw_step_fused(
        std::slice::from_ref(&p),
        &[g],
        std::slice::from_ref(&m),
        std::slice::from_ref(&v),
        1,
        &hp,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("adamw") && err.contains("[3, 2]"),
        "unhelpful error: {err}"
    );
    assert!(adamw_step_fused(
        std::slice::from_ref(&p),
        &[],
        std::slice::from_ref(&m),
        std::slice::from_ref(&v),
        1,
        &hp
    )
    .is_err());
    let bf16_m = Var::zeros((2, 3), DType::BF16, dev)?;
    let g = Tensor::zeros((2, 3), DType::F32, dev)?;
    assert!(lorafuse_ops::adamw_step(&[p], &[g], &[bf16_m], &[v], 1, &hp).is_err());
    Ok(())
}
