//! Softmax over the last dimension: the fused kernel against the stock-Candle reference (forward
//! and autograd) and against finite differences, on every device.

use crate::common;

use candle_core::{DType, Device, Result, Tensor};
use common::{check_finite_differences, check_fused_vs_reference, grad_tol, rand_tensor};
use lorafuse_ops::softmax::{reference::softmax_reference, softmax_fused};
use lorafuse_ops::{set_kernel_mode, softmax_last_dim, KernelMode};

// [2, 20000]: on CUDA, the 8-pack register kernel for f32 and a 1024-thread persistent block
// for half types.
const FWD_SHAPES: &[&[usize]] = &[
    &[1, 1],
    &[5, 123, 123],
    &[3, 7, 1000],
    &[2, 4, 37, 64],
    &[2, 20000],
];
const BWD_SHAPES: &[&[usize]] = &[&[1, 1], &[4, 7, 33], &[3, 2, 1000], &[2, 17, 64]];

fn fused(t: &[Tensor]) -> Result<Tensor> {
    softmax_fused(&t[0])
}
fn reference(t: &[Tensor]) -> Result<Tensor> {
    softmax_reference(&t[0])
}

fn softmax_matches_reference(dev: &Device) -> Result<()> {
    for dtype in common::dtypes(dev) {
        for (i, shape) in FWD_SHAPES.iter().enumerate() {
            // Scale 8: logits spread enough that the max subtraction matters.
            let x = rand_tensor(shape, 8.0, i as u64, dtype, dev)?;
            common::check_forward(&[x], &fused, &reference, &format!("softmax {shape:?}"))?;
        }
        for (i, shape) in BWD_SHAPES.iter().enumerate() {
            let x = rand_tensor(shape, 4.0, 10 + i as u64, DType::F64, &Device::Cpu)?;
            let what = format!("softmax {shape:?}");
            check_fused_vs_reference(
                dev,
                dtype,
                &[x],
                1,
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
    softmax_matches_reference,
    softmax_fwd_and_grad_match_reference_cpu,
    softmax_fwd_and_grad_match_reference_cuda
);

#[test]
fn softmax_bwd_matches_finite_differences() -> Result<()> {
    for (i, shape) in [&[3usize, 5][..], &[2, 3, 8]].iter().enumerate() {
        let x = rand_tensor(shape, 3.0, 20 + i as u64, DType::F64, &Device::Cpu)?;
        check_finite_differences(&[x], 1, &fused, &format!("softmax {shape:?}"))?;
    }
    Ok(())
}

fn softmax_handles_extremes(dev: &Device) -> Result<()> {
    // Huge logits overflow exp without the max subtraction; -inf entries (masked positions)
    // must come out as exact zeros.
    let x = Tensor::new(&[[1000f32, 999., 0., f32::NEG_INFINITY]], dev)?;
    let y = softmax_fused(&x)?.to_vec2::<f32>()?;
    let e = (-1f32).exp();
    let want = [1. / (1. + e), e / (1. + e), 0., 0.];
    for (g, w) in y[0].iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "softmax extremes: got {:?}", y[0]);
    }
    Ok(())
}
test_device!(
    softmax_handles_extremes,
    softmax_is_stable_for_huge_and_masked_logits_cpu,
    softmax_is_stable_for_huge_and_masked_logits_cuda
);

fn strided_input(dev: &Device) -> Result<()> {
    let _mode = common::mode_read();
    let base = rand_tensor(&[40, 3, 7], 3.0, 30, DType::F32, dev)?;
    let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<(Tensor, Tensor)> {
        let v = candle_core::Var::from_tensor(&base)?;
        // [7, 3, 40] with the softmax axis strided, then a narrow of the middle axis.
        let x = v.as_tensor().transpose(0, 2)?.narrow(1, 1, 2)?;
        let y = f(&x)?;
        let r = rand_tensor(y.dims(), 1.0, 31, DType::F32, dev)?;
        let grads = (&y * r)?.sum_all()?.backward()?;
        let gx = grads
            .get(v.as_tensor())
            .cloned()
            .expect("base gets a gradient");
        Ok((y, gx))
    };
    let (y, gx) = run(&softmax_last_dim)?;
    let (y_ref, gx_ref) = run(&softmax_reference)?;
    common::assert_close(&y, &y_ref, 1e-5, "softmax strided forward")?;
    common::assert_close(&gx, &gx_ref, 1e-5, "softmax strided grad")
}
test_device!(
    strided_input,
    softmax_accepts_strided_input_cpu,
    softmax_accepts_strided_input_cuda
);

#[test]
fn kernel_mode_reference_runs_the_reference_path() -> Result<()> {
    let _mode = common::mode_write();
    let before = lorafuse_ops::kernel_mode();
    let x = rand_tensor(&[16, 300], 6.0, 40, DType::BF16, &Device::Cpu)?;
    let (f, r) = (softmax_fused(&x)?, softmax_reference(&x)?);
    assert!(
        !common::bitwise_equal(&f, &r)?,
        "inputs must tell the paths apart"
    );
    set_kernel_mode(KernelMode::Reference);
    let in_ref = softmax_last_dim(&x)?;
    set_kernel_mode(KernelMode::Fused);
    let in_fused = softmax_last_dim(&x)?;
    set_kernel_mode(before);
    assert!(
        common::bitwise_equal(&in_ref, &r)?,
        "Reference mode ran the fused kernel"
    );
    assert!(
        common::bitwise_equal(&in_fused, &f)?,
        "Fused mode ran the reference"
    );
    Ok(())
}

#[test]
fn empty_input_passes_through() -> Result<()> {
    let x = Tensor::zeros((3, 0, 5), DType::F32, &Device::Cpu)?;
    assert_eq!(softmax_fused(&x)?.dims(), &[3, 0, 5]);
    Ok(())
}
