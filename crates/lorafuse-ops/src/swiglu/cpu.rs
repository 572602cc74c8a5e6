//! SwiGLU CPU kernels: rayon over fixed-size chunks. f64 tensors compute in f64 (the finite
//! difference tests); every other dtype in f32 with a vectorisable exp, as the f32 reference
//! composition does.

use candle_core::{DType, Result, WithDType};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use crate::cpu_util::{
    filled_vec, load_f32, load_f64, store_f32, store_f64, Acc, Kernel2, Kernel3,
};
use crate::error::shape_err;

/// Elements per rayon task: big enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 4096;

/// `1 / (1 + e^-x)` in the working precision.
#[inline(always)]
fn sigmoid<A: Acc>(x: A) -> A {
    let one = A::from_f64(1.0);
    one / (one + (A::from_f64(0.0) - x).exp())
}

/// `silu(g) * u` for one chunk, in f32 or f64 arithmetic.
#[inline(always)]
fn fwd_chunk<T: WithDType, A: Acc>(
    y: &mut [MaybeUninit<T>],
    g: &[T],
    u: &[T],
    to: impl Fn(T) -> A + Sync + Copy,
    from: impl Fn(A) -> T + Sync + Copy,
) {
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        let g = to(g);
        y.write(from(g * sigmoid(g) * to(u)));
    }
}

/// `(dgate, dup)` for one chunk.
#[inline(always)]
fn bwd_chunk<T: WithDType, A: Acc>(
    dg: &mut [MaybeUninit<T>],
    du: &mut [MaybeUninit<T>],
    (g, u, dy): (&[T], &[T], &[T]),
    to: impl Fn(T) -> A + Sync + Copy,
    from: impl Fn(A) -> T + Sync + Copy,
) {
    let one = A::from_f64(1.0);
    for ((((dg, du), &g), &u), &dy) in dg.iter_mut().zip(du).zip(g).zip(u).zip(dy) {
        let (g, u, dy) = (to(g), to(u), to(dy));
        let s = sigmoid(g);
        dg.write(from(dy * u * s * (one + g * (one - s))));
        du.write(from(dy * g * s));
    }
}

pub(super) struct Fwd;

impl Kernel2 for Fwd {
    const OP: &'static str = "swiglu";

    fn f<T: WithDType>(&self, gate: &[T], up: &[T]) -> Result<Vec<T>> {
        if gate.len() != up.len() {
            return Err(shape_err(
                Self::OP,
                format!("gate has {} elements, up {}", gate.len(), up.len()),
            ));
        }
        let wide = T::DTYPE == DType::F64;
        let fill = |y: &mut [MaybeUninit<T>]| {
            y.par_chunks_mut(CHUNK)
                .zip(gate.par_chunks(CHUNK))
                .zip(up.par_chunks(CHUNK))
                .for_each(|((y, g), u)| {
                    if wide {
                        fwd_chunk(y, g, u, load_f64::<T>, store_f64::<T>)
                    } else {
                        fwd_chunk(y, g, u, load_f32::<T>, store_f32::<T>)
                    }
                })
        };
        // SAFETY: the chunks of `y` pair one to one with those of gate and up (same length,
        // checked above), and each element of each chunk is written.
        Ok(unsafe { filled_vec(gate.len(), fill) })
    }
}

pub(super) struct Bwd;

impl Kernel3 for Bwd {
    const OP: &'static str = "swiglu_bwd";

    fn f<T: WithDType>(&self, gate: &[T], up: &[T], dy: &[T]) -> Result<Vec<T>> {
        let n = gate.len();
        if up.len() != n || dy.len() != n {
            return Err(shape_err(
                Self::OP,
                format!("gate {n}, up {}, dy {} elements", up.len(), dy.len()),
            ));
        }
        let wide = T::DTYPE == DType::F64;
        let fill = |out: &mut [MaybeUninit<T>]| {
            let (dgate, dup) = out.split_at_mut(n);
            dgate
                .par_chunks_mut(CHUNK)
                .zip(dup.par_chunks_mut(CHUNK))
                .zip(gate.par_chunks(CHUNK))
                .zip(up.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
                .for_each(|(((dg, du), g), (u, dy))| {
                    if wide {
                        bwd_chunk(dg, du, (g, u, dy), load_f64::<T>, store_f64::<T>)
                    } else {
                        bwd_chunk(dg, du, (g, u, dy), load_f32::<T>, store_f32::<T>)
                    }
                })
        };
        // SAFETY: dgate and dup are the two halves of the buffer, each chunked like gate, up
        // and dy (all n long, checked above); every element of every chunk is written.
        Ok(unsafe { filled_vec(2 * n, fill) })
    }
}
