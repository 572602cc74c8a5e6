//! RoPE in both layouts: the fused kernel against the stock-Candle reference (forward and
//! autograd) and against finite differences, on every device.

use crate::common;

use candle_core::{DType, Device, Result, Tensor};
use common::{check_finite_differences, check_fused_vs_reference, grad_tol, rand_tensor};
use lorafuse_ops::rope::{reference::rope_reference, rope_fused};
use lorafuse_ops::{rope, set_kernel_mode, KernelMode, RopeLayout};

const LAYOUTS: [RopeLayout; 2] = [RopeLayout::HalfRotation, RopeLayout::Interleaved];
const FWD_SHAPES: &[[usize; 4]] = &[[1, 1, 1, 2], [2, 4, 37, 64], [1, 3, 123, 128], [3, 2, 5, 6]];
const BWD_SHAPES: &[[usize; 4]] = &[[1, 1, 1, 2], [2, 4, 37, 64], [1, 2, 9, 10]];

/// `[x, cos, sin]` with real angles `pos * theta^(-2i/d)`, all f64 on the CPU.
fn inputs(shape: [usize; 4], seed: u64) -> Result<Vec<Tensor>> {
    let [_, _, t, d] = shape;
    let x = rand_tensor(&shape, 2.0, seed, DType::F64, &Device::Cpu)?;
    let angles: Vec<f64> = (0..t)
        .flat_map(|p| {
            (0..d / 2).map(move |i| p as f64 * 10_000f64.powf(-2.0 * i as f64 / d as f64))
        })
        .collect();
    let a = Tensor::from_vec(angles, (t, d / 2), &Device::Cpu)?;
    Ok(vec![x, a.cos()?, a.sin()?])
}

fn rope_matches_reference(dev: &Device) -> Result<()> {
    for layout in LAYOUTS {
        let fused = move |t: &[Tensor]| rope_fused(&t[0], &t[1], &t[2], layout);
        let reference = move |t: &[Tensor]| rope_reference(&t[0], &t[1], &t[2], layout);
        for dtype in common::dtypes(dev) {
            for (i, &shape) in FWD_SHAPES.iter().enumerate() {
                let t: Vec<Tensor> = inputs(shape, i as u64)?
                    .iter()
                    .map(|t| t.to_dtype(dtype)?.to_device(dev))
                    .collect::<Result<_>>()?;
                let what = format!("rope {layout:?} {shape:?}");
                common::check_forward(&t, &fused, &reference, &what)?;
            }
            for (i, &shape) in BWD_SHAPES.iter().enumerate() {
                let t = inputs(shape, 10 + i as u64)?;
                let what = format!("rope {layout:?} {shape:?}");
                // Only x is a variable: cos and sin are tables.
                check_fused_vs_reference(
                    dev,
                    dtype,
                    &t,
                    1,
                    &fused,
                    &reference,
                    grad_tol(dtype),
                    &what,
                )?;
            }
        }
    }
    Ok(())
}
test_device!(
    rope_matches_reference,
    rope_fwd_and_grad_match_reference_in_both_layouts_cpu,
    rope_fwd_and_grad_match_reference_in_both_layouts_cuda
);

#[test]
fn rope_bwd_matches_finite_differences() -> Result<()> {
    for layout in LAYOUTS {
        let fused = move |t: &[Tensor]| rope_fused(&t[0], &t[1], &t[2], layout);
        let t = inputs([2, 1, 3, 6], 20)?;
        check_finite_differences(&t, 1, &fused, &format!("rope {layout:?}"))?;
    }
    Ok(())
}

#[test]
fn rope_rejects_mismatched_tables() -> Result<()> {
    let t = inputs([1, 2, 5, 8], 30)?;
    let short = t[1].narrow(0, 0, 4)?;
    let err = rope_fused(&t[0], &short, &t[2], RopeLayout::HalfRotation);
    let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("cos/sin [5, 4]"), "unexpected error: {msg:?}");
    Ok(())
}

fn strided_input(dev: &Device) -> Result<()> {
    let _mode = common::mode_read();
    // q as it leaves the projection: [b, t, h, d] transposed to [b, h, t, d].
    let t = inputs([2, 3, 11, 16], 40)?;
    let base = rand_tensor(&[2, 11, 3, 16], 2.0, 41, DType::F32, dev)?;
    let (cos, sin) = (
        t[1].to_dtype(DType::F32)?.to_device(dev)?,
        t[2].to_dtype(DType::F32)?.to_device(dev)?,
    );
    for layout in LAYOUTS {
        let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<(Tensor, Tensor)> {
            let v = candle_core::Var::from_tensor(&base)?;
            let y = f(&v.as_tensor().transpose(1, 2)?)?;
            let r = rand_tensor(y.dims(), 1.0, 42, DType::F32, dev)?;
            let grads = (&y * r)?.sum_all()?.backward()?;
            Ok((
                y,
                grads
                    .get(v.as_tensor())
                    .cloned()
                    .expect("base gets a gradient"),
            ))
        };
        let (y, g) = run(&|x| rope(x, &cos, &sin, layout))?;
        let (y_ref, g_ref) = run(&|x| rope_reference(x, &cos, &sin, layout))?;
        common::assert_close(
            &y,
            &y_ref,
            1e-5,
            &format!("rope {layout:?} strided forward"),
        )?;
        common::assert_close(&g, &g_ref, 1e-5, &format!("rope {layout:?} strided grad"))?;
    }
    Ok(())
}
test_device!(
    strided_input,
    rope_accepts_transposed_q_cpu,
    rope_accepts_transposed_q_cuda
);

#[test]
fn kernel_mode_reference_runs_the_reference_path() -> Result<()> {
    let _mode = common::mode_write();
    let before = lorafuse_ops::kernel_mode();
    let t: Vec<Tensor> = inputs([2, 4, 37, 64], 50)?
        .iter()
        .map(|t| t.to_dtype(DType::BF16))
        .collect::<Result<_>>()?;
    let l = RopeLayout::HalfRotation;
    let (f, r) = (
        rope_fused(&t[0], &t[1], &t[2], l)?,
        rope_reference(&t[0], &t[1], &t[2], l)?,
    );
    assert!(
        !common::bitwise_equal(&f, &r)?,
        "inputs must tell the paths apart"
    );
    set_kernel_mode(KernelMode::Reference);
    let in_ref = rope(&t[0], &t[1], &t[2], l)?;
    set_kernel_mode(KernelMode::Fused);
    let in_fused = rope(&t[0], &t[1], &t[2], l)?;
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
