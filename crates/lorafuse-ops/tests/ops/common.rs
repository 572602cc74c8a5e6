//! Helpers shared by the ops' integration tests: seeded random tensors, diffs, f64 finite
//! differences, and `test_device!`, which runs one test body on every available device.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Serialises tests that flip the process-global kernel mode against tests that call the
/// dispatching public functions (the explicit `*_fused` / `*_reference` calls need no lock).
static MODE_LOCK: RwLock<()> = RwLock::new(());

/// Held while a test calls a dispatching public function.
pub fn mode_read() -> RwLockReadGuard<'static, ()> {
    MODE_LOCK.read().unwrap_or_else(|e| e.into_inner())
}

/// Held while a test changes the kernel mode.
pub fn mode_write() -> RwLockWriteGuard<'static, ()> {
    MODE_LOCK.write().unwrap_or_else(|e| e.into_inner())
}

/// The devices a test body runs on: the CPU always, CUDA device 0 when built with `cuda` and a
/// GPU is present.
pub fn devices() -> Vec<Device> {
    #[allow(unused_mut)]
    let mut v = vec![Device::Cpu];
    #[cfg(feature = "cuda")]
    if candle_core::utils::cuda_is_available() {
        match Device::new_cuda(0) {
            Ok(d) => v.push(d),
            Err(e) => eprintln!("cuda present but unusable, testing cpu only: {e}"),
        }
    }
    v
}

/// `test_device!(body_fn, cpu_name, cuda_name)`: one `#[test]` per device for a body
/// `fn(&Device) -> candle_core::Result<()>`; the cuda test skips (with a message) without a GPU.
#[macro_export]
macro_rules! test_device {
    ($body:ident, $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() -> candle_core::Result<()> {
            $body(&candle_core::Device::Cpu)
        }

        #[cfg(feature = "cuda")]
        #[test]
        fn $cuda() -> candle_core::Result<()> {
            match common::devices().into_iter().find(|d| d.is_cuda()) {
                Some(dev) => $body(&dev),
                None => {
                    eprintln!("no CUDA device: skipping {}", stringify!($cuda));
                    Ok(())
                }
            }
        }
    };
}

/// A seeded tensor of values uniform in `[-scale, scale)`.
pub fn rand_tensor(
    shape: &[usize],
    scale: f64,
    seed: u64,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)
}

/// The largest `|a - b|`.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    (a - b)?.abs()?.max(0)?.to_scalar::<f64>()
}

/// The largest `|a - b| / (|b| + 1)`: relative for big values, absolute near zero.
pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    let den = (b.abs()? + 1.0)?;
    ((a - b)?.abs()? / den)?.max(0)?.to_scalar::<f64>()
}

/// Asserts `max_rel_diff(got, want) <= tol`, naming what was compared.
pub fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) -> Result<()> {
    let d = max_rel_diff(got, want)?;
    assert!(d <= tol, "{what}: max rel diff {d:e} > {tol:e}");
    Ok(())
}

/// True when the two tensors are bitwise equal (same dtype and values).
pub fn bitwise_equal(a: &Tensor, b: &Tensor) -> Result<bool> {
    Ok(a.dims() == b.dims()
        && a.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?
            == b.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// The tolerance a dtype earns against a reference run in that same dtype.
pub fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-10,
        DType::F32 => 1e-5,
        DType::BF16 => 1e-2,
        _ => 2e-3,
    }
}

/// The dtypes a device's fused kernels cover (f64 only on the CPU).
pub fn dtypes(dev: &Device) -> Vec<DType> {
    if dev.is_cpu() {
        vec![DType::F32, DType::F64, DType::BF16, DType::F16]
    } else {
        vec![DType::F32, DType::BF16, DType::F16]
    }
}

/// Output and gradients of `sum(f(inputs) * r)` for a fixed random `r` (the vector-Jacobian
/// product with `r`, so every output element counts with its own weight). The first `n_vars`
/// inputs are variables; the rest are constants (tables, frozen weights).
pub fn grads_of(
    inputs: &[Tensor],
    n_vars: usize,
    r_seed: u64,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    grads_with(
        inputs,
        n_vars,
        &|out| rand_tensor(out.dims(), 1.0, r_seed, out.dtype(), out.device()),
        f,
    )
}

/// [`grads_of`] with `r` made from the output by `make_r`.
fn grads_with(
    inputs: &[Tensor],
    n_vars: usize,
    make_r: &dyn Fn(&Tensor) -> Result<Tensor>,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut ts = Vec::with_capacity(inputs.len());
    for (i, t) in inputs.iter().enumerate() {
        ts.push(if i < n_vars {
            Var::from_tensor(t)?.as_tensor().clone()
        } else {
            t.clone()
        });
    }
    let out = f(&ts)?;
    let r = make_r(&out)?;
    let loss = (out.clone() * r)?.sum_all()?;
    let g = loss.backward()?;
    let grads = ts[..n_vars]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            g.get(t)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg(format!("input {i} got no gradient")))
        })
        .collect::<Result<_>>()?;
    Ok((out, grads))
}

/// An op under test: the fused path and its reference, over the same input list.
pub type OpFn<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

/// Checks the fused op against the reference on `dev` in `dtype`: the forward in the same dtype
/// (tolerance `tol(dtype)`), and the gradients of the first `n_vars` inputs against the
/// reference's autograd; for half types the reference gradients are taken in f32 from the same
/// rounded inputs (a bf16 autograd chain rounds at every step and is no oracle), within `grad_tol`.
#[allow(clippy::too_many_arguments)]
pub fn check_fused_vs_reference(
    dev: &Device,
    dtype: DType,
    inputs: &[Tensor],
    n_vars: usize,
    fused: OpFn,
    reference: OpFn,
    grad_tol: f64,
    what: &str,
) -> Result<()> {
    let ins: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(dtype)?.to_device(dev))
        .collect::<Result<_>>()?;
    let (out, grads) = grads_of(&ins, n_vars, 7, fused)?;
    assert_eq!(out.dtype(), dtype, "{what}: output dtype");
    let want = reference(&ins)?;
    assert_close(
        &out,
        &want,
        tol(dtype),
        &format!("{what} {dtype:?} forward"),
    )?;
    let ref_dtype = match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    };
    let ref_ins: Vec<Tensor> = ins
        .iter()
        .map(|t| t.to_dtype(ref_dtype))
        .collect::<Result<_>>()?;
    // The reference weights its outputs with the very `r` the fused run used (rounded to
    // `dtype`): over thousands of rows, f16 rounding of `r` alone moves a parameter gradient
    // that nearly cancels by more than the tolerance.
    let r = rand_tensor(out.dims(), 1.0, 7, dtype, out.device())?;
    let (_, want_grads) = grads_with(&ref_ins, n_vars, &|o| r.to_dtype(o.dtype()), reference)?;
    for (i, (g, w)) in grads.iter().zip(&want_grads).enumerate() {
        assert_eq!(g.dtype(), dtype, "{what}: grad {i} dtype");
        assert_close(
            g,
            w,
            grad_tol,
            &format!("{what} {dtype:?} grad of input {i}"),
        )?;
    }
    Ok(())
}

/// The dtype the reference runs in to judge a fused result of `dtype`: f32 for half types (a
/// reference chain in bf16 rounds at every step, so it is a worse oracle than the kernel under
/// test), the same dtype otherwise.
pub fn oracle_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

/// Checks the fused forward on `ins` against the reference on the same values in
/// [`oracle_dtype`], within `tol` of the inputs' dtype.
pub fn check_forward(ins: &[Tensor], fused: OpFn, reference: OpFn, what: &str) -> Result<()> {
    let dtype = ins[0].dtype();
    let got = fused(ins)?;
    assert_eq!(got.dtype(), dtype, "{what}: output dtype");
    let ref_ins: Vec<Tensor> = ins
        .iter()
        .map(|t| t.to_dtype(oracle_dtype(dtype)))
        .collect::<Result<_>>()?;
    let want = reference(&ref_ins)?;
    assert_close(
        &got,
        &want,
        tol(dtype),
        &format!("{what} {dtype:?} forward"),
    )
}

/// The gradient tolerance of [`check_fused_vs_reference`] for a dtype.
pub fn grad_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-9,
        DType::F32 => 1e-4,
        DType::BF16 => 3e-2,
        _ => 5e-3,
    }
}

/// Checks the fused op's gradients against central finite differences of the same fused op, in
/// f64 on the CPU (step 1e-5, tolerance 1e-6): an oracle independent of the reference.
pub fn check_finite_differences(
    inputs: &[Tensor],
    n_vars: usize,
    fused: OpFn,
    what: &str,
) -> Result<()> {
    let ins: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(DType::F64)?.to_device(&Device::Cpu))
        .collect::<Result<_>>()?;
    let (_, grads) = grads_of(&ins, n_vars, 11, fused)?;
    for (i, g) in grads.iter().enumerate() {
        let fd = finite_diff(&ins, i, 11, 1e-5, fused)?;
        let d = max_abs_diff(g, &fd)?;
        assert!(
            d < 1e-6,
            "{what}: grad of input {i} differs from finite differences by {d:e}"
        );
    }
    Ok(())
}

/// Central finite differences (step `h`) of `sum(f(inputs) * r)` with respect to input `which`,
/// in f64 on the CPU: the independent oracle for a backward pass.
pub fn finite_diff(
    inputs: &[Tensor],
    which: usize,
    r_seed: u64,
    h: f64,
    f: OpFn,
) -> Result<Tensor> {
    let out = f(inputs)?;
    let r = rand_tensor(out.dims(), 1.0, r_seed, DType::F64, &Device::Cpu)?;
    let loss = |ins: &[Tensor]| -> Result<f64> { (f(ins)? * &r)?.sum_all()?.to_scalar::<f64>() };
    let x = &inputs[which];
    let base = x.flatten_all()?.to_vec1::<f64>()?;
    let mut grad = Vec::with_capacity(base.len());
    for i in 0..base.len() {
        let at = |delta: f64| -> Result<f64> {
            let mut v = base.clone();
            v[i] += delta;
            let mut ins = inputs.to_vec();
            ins[which] = Tensor::from_vec(v, x.dims(), &Device::Cpu)?;
            loss(&ins)
        };
        grad.push((at(h)? - at(-h)?) / (2.0 * h));
    }
    Tensor::from_vec(grad, x.dims(), &Device::Cpu)
}
