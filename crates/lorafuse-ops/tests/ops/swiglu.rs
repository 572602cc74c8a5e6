//! SwiGLU: the fused kernel against the stock-Candle reference (forward and autograd of both
//! inputs) and against finite differences, on every device.

use crate::common;

use candle_core::{DType, Device, Result, Tensor};
use common::{check_finite_differences, check_fused_vs_reference, grad_tol, rand_tensor};
use lorafuse_ops::swiglu::{reference::swiglu_reference, swiglu_fused};
use lorafuse_ops::{set_kernel_mode, swiglu, KernelMode};

const FWD_SHAPES: &[&[usize]] = &[&[1, 1], &[5, 123, 123], &[3, 7, 1000], &[2, 4, 37, 64]];
const BWD_SHAPES: &[&[usize]] = &[&[1, 1], &[4, 7, 33], &[3, 2, 1000], &[2, 17, 64]];

fn fused(t: &[Tensor]) -> Result<Tensor> {
    swiglu_fused(&t[0], &t[1])
}
fn reference(t: &[Tensor]) -> Result<Tensor> {
    swiglu_reference(&t[0], &t[1])
}

fn inputs(shape: &[usize], seed: u64, dtype: DType, dev: &Device) -> Result<Vec<Tensor>> {
    Ok(vec![
        rand_tensor(shape, 6.0, seed, dtype, dev)?,
        rand_tensor(shape, 2.0, seed + 1, dtype, dev)?,
    ])
}

fn swiglu_matches_reference(dev: &Device) -> Result<()> {
    for dtype in common::dtypes(dev) {
        for (i, shape) in FWD_SHAPES.iter().enumerate() {
            let t = inputs(shape, 2 * i as u64, dtype, dev)?;
            common::check_forward(&t, &fused, &reference, &format!("swiglu {shape:?}"))?;
        }
        for (i, shape) in BWD_SHAPES.iter().enumerate() {
            let t = inputs(shape, 20 + 2 * i as u64, DType::F64, &Device::Cpu)?;
            let what = format!("swiglu {shape:?}");
            check_fused_vs_reference(
                dev,
                dtype,
                &t,
                2,
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
    swiglu_matches_reference,
    swiglu_fwd_and_grads_match_reference_cpu,
    swiglu_fwd_and_grads_match_reference_cuda
);

#[test]
fn swiglu_bwd_matches_finite_differences() -> Result<()> {
    for (i, shape) in [&[3usize, 5][..], &[2, 3, 8]].iter().enumerate() {
        let t = inputs(shape, 40 + 2 * i as u64, DType::F64, &Device::Cpu)?;
        check_finite_differences(&t, 2, &fused, &format!("swiglu {shape:?}"))?;
    }
    Ok(())
}

fn strided_inputs(dev: &Device) -> Result<()> {
    let _mode = common::mode_read();
    let gbase = rand_tensor(&[64, 9], 4.0, 50, DType::F32, dev)?;
    let ubase = rand_tensor(&[9, 70], 2.0, 51, DType::F32, dev)?;
    let run = |f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| -> Result<Vec<Tensor>> {
        let (gv, uv) = (
            candle_core::Var::from_tensor(&gbase)?,
            candle_core::Var::from_tensor(&ubase)?,
        );
        let g = gv.as_tensor().t()?;
        let u = uv.as_tensor().narrow(1, 3, 64)?;
        let y = f(&g, &u)?;
        let r = rand_tensor(y.dims(), 1.0, 52, DType::F32, dev)?;
        let grads = (&y * r)?.sum_all()?.backward()?;
        let gg = grads
            .get(gv.as_tensor())
            .cloned()
            .expect("gate base gets a gradient");
        let gu = grads
            .get(uv.as_tensor())
            .cloned()
            .expect("up base gets a gradient");
        Ok(vec![y, gg, gu])
    };
    let got = run(&swiglu)?;
    let want = run(&swiglu_reference)?;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        common::assert_close(g, w, 1e-5, &format!("swiglu strided, output {i}"))?;
    }
    Ok(())
}
test_device!(
    strided_inputs,
    swiglu_accepts_strided_inputs_cpu,
    swiglu_accepts_strided_inputs_cuda
);

#[test]
fn kernel_mode_reference_runs_the_reference_path() -> Result<()> {
    let _mode = common::mode_write();
    let before = lorafuse_ops::kernel_mode();
    let t = inputs(&[16, 300], 60, DType::BF16, &Device::Cpu)?;
    let (f, r) = (fused(&t)?, reference(&t)?);
    assert!(
        !common::bitwise_equal(&f, &r)?,
        "inputs must tell the paths apart"
    );
    set_kernel_mode(KernelMode::Reference);
    let in_ref = swiglu(&t[0], &t[1])?;
    set_kernel_mode(KernelMode::Fused);
    let in_fused = swiglu(&t[0], &t[1])?;
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
fn empty_inputs_pass_through() -> Result<()> {
    let x = Tensor::zeros((0, 5), DType::F32, &Device::Cpu)?;
    assert_eq!(swiglu_fused(&x, &x)?.dims(), &[0, 5]);
    Ok(())
}
