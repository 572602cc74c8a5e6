//! RMSNorm (+ residual add) and LayerNorm: the fused kernels against the stock-Candle reference
//! (forward and autograd) and against finite differences, on every device.

use crate::common;

use candle_core::{DType, Device, Result, Tensor};
use common::{check_finite_differences, check_fused_vs_reference, grad_tol, rand_tensor};
use lorafuse_ops::layer_norm::{layer_norm_fused, reference::layer_norm_reference};
use lorafuse_ops::rms_norm::{reference::rms_norm_reference, rms_norm_fused};
use lorafuse_ops::{add_rms_norm, layer_norm, rms_norm, set_kernel_mode, KernelMode};

const EPS: f64 = 1e-5;
const FWD_SHAPES: &[&[usize]] = &[&[1, 1], &[5, 123, 123], &[3, 7, 1000], &[2, 4, 37, 64]];
// [3, 2000, 64]: on CUDA, more rows than resident blocks, so each block of the register-row
// backward sums several rows' weight gradients; [2, 20000]: past 2 packs x 1024 threads in
// half precision (the 4-pack kernel), past 4 in f32 (the two-pass kernels).
const BWD_SHAPES: &[&[usize]] = &[
    &[1, 1],
    &[4, 7, 33],
    &[3, 2, 1000],
    &[2, 17, 64],
    &[3, 2000, 64],
    &[2, 20000],
];

fn rms_fused(t: &[Tensor]) -> Result<Tensor> {
    rms_norm_fused(&t[0], &t[1], EPS)
}
fn rms_ref(t: &[Tensor]) -> Result<Tensor> {
    rms_norm_reference(&t[0], &t[1], EPS)
}
fn ln_fused(t: &[Tensor]) -> Result<Tensor> {
    layer_norm_fused(&t[0], &t[1], t.get(2), EPS)
}
fn ln_ref(t: &[Tensor]) -> Result<Tensor> {
    layer_norm_reference(&t[0], &t[1], t.get(2), EPS)
}

/// `x` of `shape` plus a `[hidden]` weight around 1 and a bias, all f64 on the CPU.
fn norm_inputs(shape: &[usize], seed: u64) -> Result<Vec<Tensor>> {
    let hidden = shape[shape.len() - 1];
    let x = (rand_tensor(shape, 2.0, seed, DType::F64, &Device::Cpu)? + 0.5)?;
    let w = (rand_tensor(&[hidden], 0.5, seed + 1, DType::F64, &Device::Cpu)? + 1.0)?;
    let b = rand_tensor(&[hidden], 0.5, seed + 2, DType::F64, &Device::Cpu)?;
    Ok(vec![x, w, b])
}

fn on(ts: &[Tensor], dtype: DType, dev: &Device) -> Result<Vec<Tensor>> {
    ts.iter()
        .map(|t| t.to_dtype(dtype)?.to_device(dev))
        .collect()
}

fn rms_norm_matches_reference(dev: &Device) -> Result<()> {
    for dtype in common::dtypes(dev) {
        for (i, shape) in FWD_SHAPES.iter().enumerate() {
            let ins = on(&norm_inputs(shape, i as u64)?[..2], dtype, dev)?;
            common::check_forward(&ins, &rms_fused, &rms_ref, &format!("rms_norm {shape:?}"))?;
        }
        for (i, shape) in BWD_SHAPES.iter().enumerate() {
            let ins = norm_inputs(shape, 10 + i as u64)?;
            let what = format!("rms_norm {shape:?}");
            let g = grad_tol(dtype);
            check_fused_vs_reference(dev, dtype, &ins[..2], 2, &rms_fused, &rms_ref, g, &what)?;
        }
    }
    Ok(())
}
test_device!(
    rms_norm_matches_reference,
    rms_norm_fwd_and_grads_match_reference_cpu,
    rms_norm_fwd_and_grads_match_reference_cuda
);

fn layer_norm_matches_reference(dev: &Device) -> Result<()> {
    for dtype in common::dtypes(dev) {
        for (i, shape) in FWD_SHAPES.iter().enumerate() {
            let ins = on(&norm_inputs(shape, 20 + i as u64)?, dtype, dev)?;
            for n_in in [3, 2] {
                let what = format!("layer_norm {shape:?} bias {}", n_in == 3);
                common::check_forward(&ins[..n_in], &ln_fused, &ln_ref, &what)?;
            }
        }
        for (i, shape) in BWD_SHAPES.iter().enumerate() {
            let ins = norm_inputs(shape, 30 + i as u64)?;
            let g = grad_tol(dtype);
            let what = format!("layer_norm {shape:?}");
            check_fused_vs_reference(dev, dtype, &ins, 3, &ln_fused, &ln_ref, g, &what)?;
            let what = format!("layer_norm without bias {shape:?}");
            check_fused_vs_reference(dev, dtype, &ins[..2], 2, &ln_fused, &ln_ref, g, &what)?;
        }
    }
    Ok(())
}
test_device!(
    layer_norm_matches_reference,
    layer_norm_fwd_and_grads_match_reference_cpu,
    layer_norm_fwd_and_grads_match_reference_cuda
);

#[test]
fn rms_norm_bwd_matches_finite_differences() -> Result<()> {
    for (i, shape) in [&[3usize, 5][..], &[2, 3, 8]].iter().enumerate() {
        let ins = norm_inputs(shape, 40 + i as u64)?;
        check_finite_differences(&ins[..2], 2, &rms_fused, &format!("rms_norm {shape:?}"))?;
    }
    Ok(())
}

#[test]
fn layer_norm_bwd_matches_finite_differences() -> Result<()> {
    for (i, shape) in [&[3usize, 5][..], &[2, 3, 8]].iter().enumerate() {
        let ins = norm_inputs(shape, 50 + i as u64)?;
        check_finite_differences(&ins, 3, &ln_fused, &format!("layer_norm {shape:?}"))?;
        check_finite_differences(&ins[..2], 2, &ln_fused, &format!("layer_norm nb {shape:?}"))?;
    }
    Ok(())
}

fn frozen_weights(dev: &Device) -> Result<()> {
    // Weight and bias as plain tensors (frozen, as in LoRA training): only x is a variable, and
    // its gradient must not depend on whether the parameter gradients were skipped.
    let ins = norm_inputs(&[6, 40], 60)?;
    let ins: Vec<Tensor> = ins
        .iter()
        .map(|t| t.to_dtype(DType::F32)?.to_device(dev))
        .collect::<Result<_>>()?;
    let g = grad_tol(DType::F32);
    check_fused_vs_reference(
        dev,
        DType::F32,
        &ins[..2],
        1,
        &rms_fused,
        &rms_ref,
        g,
        "rms frozen",
    )?;
    check_fused_vs_reference(dev, DType::F32, &ins, 1, &ln_fused, &ln_ref, g, "ln frozen")
}
test_device!(
    frozen_weights,
    frozen_norm_weights_get_no_grad_and_dx_still_matches_cpu,
    frozen_norm_weights_get_no_grad_and_dx_still_matches_cuda
);

fn strided_inputs(dev: &Device) -> Result<()> {
    let _mode = common::mode_read();
    // A transposed x and a narrowed weight: the public fns must make them contiguous (or fall
    // back) and still match the reference, with gradients reaching the un-strided base.
    let base = rand_tensor(&[48, 6], 2.0, 70, DType::F32, dev)?;
    let wbase = rand_tensor(&[60], 1.0, 71, DType::F32, dev)?;
    let bias = rand_tensor(&[48], 1.0, 72, DType::F32, dev)?;
    let run = |f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| -> Result<(Tensor, Tensor)> {
        let v = candle_core::Var::from_tensor(&base)?;
        let x = v.as_tensor().t()?;
        let w = wbase.narrow(0, 5, 48)?;
        let y = f(&x, &w)?;
        let grads = y.sqr()?.sum_all()?.backward()?;
        let gx = grads
            .get(v.as_tensor())
            .cloned()
            .expect("base gets a gradient");
        Ok((y, gx))
    };
    type NormFn<'a> = dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + 'a;
    let cases: [(&str, &NormFn, &NormFn); 2] = [
        ("rms_norm", &|x, w| rms_norm(x, w, EPS), &|x, w| {
            rms_norm_reference(x, w, EPS)
        }),
        (
            "layer_norm",
            &|x, w| layer_norm(x, w, Some(&bias), EPS),
            &|x, w| layer_norm_reference(x, w, Some(&bias), EPS),
        ),
    ];
    for (name, fused, reference) in cases {
        let (y, gx) = run(fused)?;
        let (y_ref, gx_ref) = run(reference)?;
        common::assert_close(&y, &y_ref, 1e-5, &format!("{name} strided forward"))?;
        common::assert_close(&gx, &gx_ref, 1e-4, &format!("{name} strided grad"))?;
    }
    Ok(())
}
test_device!(
    strided_inputs,
    norms_accept_strided_inputs_cpu,
    norms_accept_strided_inputs_cuda
);

#[test]
fn add_rms_norm_returns_sum_and_its_norm() -> Result<()> {
    let _mode = common::mode_read();
    let x = rand_tensor(&[3, 5, 64], 1.0, 80, DType::F32, &Device::Cpu)?;
    let r = rand_tensor(&[3, 5, 64], 1.0, 81, DType::F32, &Device::Cpu)?;
    let w = rand_tensor(&[64], 1.0, 82, DType::F32, &Device::Cpu)?;
    let (sum, normed) = add_rms_norm(&x, &r, &w, EPS)?;
    let want_sum = (&x + &r)?;
    assert!(common::bitwise_equal(&sum, &want_sum)?);
    common::assert_close(
        &normed,
        &rms_norm_reference(&want_sum, &w, EPS)?,
        1e-5,
        "add_rms_norm",
    )
}

#[test]
fn kernel_mode_reference_runs_the_reference_path() -> Result<()> {
    let _mode = common::mode_write();
    let before = lorafuse_ops::kernel_mode();
    // bf16 rounds differently on the two paths (once fused, twice in the reference), so the
    // outputs tell the paths apart bit for bit.
    let ins = norm_inputs(&[8, 256], 90)?;
    let t: Vec<Tensor> = ins
        .iter()
        .map(|t| t.to_dtype(DType::BF16))
        .collect::<Result<_>>()?;
    let fused_rms = rms_norm_fused(&t[0], &t[1], EPS)?;
    let ref_rms = rms_norm_reference(&t[0], &t[1], EPS)?;
    let fused_ln = layer_norm_fused(&t[0], &t[1], Some(&t[2]), EPS)?;
    let ref_ln = layer_norm_reference(&t[0], &t[1], Some(&t[2]), EPS)?;
    assert!(
        !common::bitwise_equal(&fused_rms, &ref_rms)?,
        "inputs must tell the paths apart"
    );
    assert!(
        !common::bitwise_equal(&fused_ln, &ref_ln)?,
        "inputs must tell the paths apart"
    );

    set_kernel_mode(KernelMode::Reference);
    let rms_r = rms_norm(&t[0], &t[1], EPS)?;
    let ln_r = layer_norm(&t[0], &t[1], Some(&t[2]), EPS)?;
    set_kernel_mode(KernelMode::Fused);
    let rms_f = rms_norm(&t[0], &t[1], EPS)?;
    let ln_f = layer_norm(&t[0], &t[1], Some(&t[2]), EPS)?;
    set_kernel_mode(before);

    assert!(
        common::bitwise_equal(&rms_r, &ref_rms)?,
        "Reference mode ran rms_norm fused"
    );
    assert!(
        common::bitwise_equal(&ln_r, &ref_ln)?,
        "Reference mode ran layer_norm fused"
    );
    assert!(
        common::bitwise_equal(&rms_f, &fused_rms)?,
        "Fused mode ran rms_norm reference"
    );
    assert!(
        common::bitwise_equal(&ln_f, &fused_ln)?,
        "Fused mode ran layer_norm reference"
    );
    Ok(())
}

#[test]
fn empty_inputs_pass_through() -> Result<()> {
    let x = Tensor::zeros((0, 8), DType::F32, &Device::Cpu)?;
    let w = Tensor::ones(8, DType::F32, &Device::Cpu)?;
    assert_eq!(rms_norm_fused(&x, &w, EPS)?.dims(), &[0, 8]);
    assert_eq!(layer_norm_fused(&x, &w, Some(&w), EPS)?.dims(), &[0, 8]);
    Ok(())
}
