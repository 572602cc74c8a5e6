//! CPU AdamW: one rayon pass per tensor computing the new parameter and both moments, then one
//! copy of each into the `Var` (Candle offers no safe mutable view of a tensor's storage).

use super::{Coeffs, OP};
use crate::error::shape_err;
use candle_core::{CpuStorage, Device, Layout, Result, Storage, Tensor, Var, WithDType};
use rayon::prelude::*;

/// The contiguous slice of `T` behind a tensor's CPU storage.
fn slice<'a, T: WithDType>(s: &'a Storage, l: &Layout) -> Result<&'a [T]> {
    match s {
        Storage::Cpu(s) => crate::cpu_util::contiguous(s.as_slice::<T>()?, l, OP),
        _ => Err(shape_err(OP, "tensor is not on the CPU")),
    }
}

/// A parameter or gradient element, converted through f32 the way `Tensor::to_dtype` does
/// (half's `from_f64` rounds bf16 differently from its `from_f32`, which Candle uses).
trait F32Conv: WithDType {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl F32Conv for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl F32Conv for f64 {
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f32(x: f32) -> Self {
        x as f64
    }
}

impl F32Conv for half::bf16 {
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}

impl F32Conv for half::f16 {
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}

/// New `(p, m, v)` for one tensor; `T` the parameter dtype, `G` the gradient dtype.
fn update<T: F32Conv, G: F32Conv>(
    c: &Coeffs,
    p: &[T],
    g: &[G],
    m: &[f32],
    v: &[f32],
) -> (Vec<T>, Vec<f32>, Vec<f32>) {
    let n = p.len();
    let mut np = vec![T::zero(); n];
    let mut nm = vec![0f32; n];
    let mut nv = vec![0f32; n];
    const CHUNK: usize = 4096;
    np.par_chunks_mut(CHUNK)
        .zip(nm.par_chunks_mut(CHUNK))
        .zip(nv.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(ci, ((np, nm), nv))| {
            let o = ci * CHUNK;
            for k in 0..np.len() {
                let i = o + k;
                let (pn, mn, vn) = c.apply(p[i].to_f32(), g[i].to_f32(), m[i], v[i]);
                np[k] = T::from_f32(pn);
                nm[k] = mn;
                nv[k] = vn;
            }
        });
    (np, nm, nv)
}

/// Reads one tensor's operands and computes its update; `None` for a dtype pair this kernel does
/// not cover (the caller sends that tensor to the reference).
fn step_one(
    c: &Coeffs,
    p: &Var,
    g: &Tensor,
    m: &Var,
    v: &Var,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let shape = p.shape().clone();
    let (ps, pl) = p.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (ms, ml) = m.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (m, v) = (slice::<f32>(&ms, ml)?, slice::<f32>(&vs, vl)?);
    macro_rules! go {
        ($t:ty, $g:ty) => {{
            let (np, nm, nv) = update::<$t, $g>(c, slice(&ps, pl)?, slice(&gs, gl)?, m, v);
            Some((Tensor::from_vec(np, &shape, &Device::Cpu)?, nm, nv))
        }};
    }
    use CpuStorage as C;
    let (Storage::Cpu(pc), Storage::Cpu(gc)) = (&*ps, &*gs) else {
        return Err(shape_err(OP, "tensor is not on the CPU"));
    };
    let out = match (pc, gc) {
        (C::F32(_), C::F32(_)) => go!(f32, f32),
        (C::F64(_), C::F64(_)) => go!(f64, f64),
        (C::BF16(_), C::BF16(_)) => go!(half::bf16, half::bf16),
        (C::F16(_), C::F16(_)) => go!(half::f16, half::f16),
        (C::F64(_), C::F32(_)) => go!(f64, f32),
        (C::BF16(_), C::F32(_)) => go!(half::bf16, f32),
        (C::F16(_), C::F32(_)) => go!(half::f16, f32),
        _ => None,
    };
    match out {
        Some((np, nm, nv)) => {
            let nm = Tensor::from_vec(nm, &shape, &Device::Cpu)?;
            let nv = Tensor::from_vec(nv, &shape, &Device::Cpu)?;
            Ok(Some((np, nm, nv)))
        }
        None => Ok(None),
    }
}

/// Steps every listed tensor; returns the indices it could not handle.
pub(super) fn step(
    c: &Coeffs,
    idx: &[usize],
    params: &[Var],
    grads: &[Tensor],
    m: &[Var],
    v: &[Var],
) -> Result<Vec<usize>> {
    let mut rest = Vec::new();
    for &i in idx {
        // the read guards taken in step_one are dropped before the writes below
        match step_one(c, &params[i], &grads[i], &m[i], &v[i])? {
            Some((np, nm, nv)) => {
                params[i].set(&np)?;
                m[i].set(&nm)?;
                v[i].set(&nv)?;
            }
            None => rest.push(i),
        }
    }
    Ok(rest)
}
