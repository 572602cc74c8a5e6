//! SwiGLU CPU kernels: rayon over fixed-size chunks. f64 tensors compute in f64 (the finite
//! difference tests); every other dtype in f32 with a vectorisable exp, as the f32 reference
//! composition does.

use candle_core::{DType, Result, WithDType};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use crate::cpu_util::{fast_exp, filled_vec, Kernel2, Kernel3};
use crate::error::shape_err;

/// Elements per rayon task: big enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 4096;

/// `sigmoid(x)` in the element type's working precision.
trait Sigmoid: Copy {
    fn sigmoid(self) -> Self;
}

impl Sigmoid for f64 {
    #[inline(always)]
    fn sigmoid(self) -> f64 {
        1.0 / (1.0 + (-self).exp())
    }
}

impl Sigmoid for f32 {
    #[inline(always)]
    fn sigmoid(self) -> f32 {
        1.0 / (1.0 + fast_exp(-self))
    }
}

/// `silu(g) * u` for one chunk, in f32 or f64 arithmetic.
#[inline(always)]
fn fwd_chunk<T: WithDType, A>(
    y: &mut [MaybeUninit<T>],
    g: &[T],
    u: &[T],
    to: fn(T) -> A,
    from: fn(A) -> T,
) where
    A: Sigmoid + std::ops::Mul<Output = A>,
{
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        let g = to(g);
        y.write(from(g * g.sigmoid() * to(u)));
    }
}

/// `(dgate, dup)` for one chunk.
#[inline(always)]
fn bwd_chunk<T: WithDType, A>(
    dg: &mut [MaybeUninit<T>],
    du: &mut [MaybeUninit<T>],
    (g, u, dy): (&[T], &[T], &[T]),
    to: fn(T) -> A,
    from: fn(A) -> T,
    one: A,
) where
    A: Sigmoid + std::ops::Mul<Output = A> + std::ops::Add<Output = A> + std::ops::Sub<Output = A>,
{
    for ((((dg, du), &g), &u), &dy) in dg.iter_mut().zip(du).zip(g).zip(u).zip(dy) {
        let (g, u, dy) = (to(g), to(u), to(dy));
        let s = g.sigmoid();
        dg.write(from(dy * u * s * (one + g * (one - s))));
        du.write(from(dy * g * s));
    }
}

fn to32<T: WithDType>(x: T) -> f32 {
    x.to_f64() as f32
}
fn from32<T: WithDType>(x: f32) -> T {
    T::from_f64(x as f64)
}
fn to64<T: WithDType>(x: T) -> f64 {
    x.to_f64()
}
fn from64<T: WithDType>(x: f64) -> T {
    T::from_f64(x)
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
                        fwd_chunk(y, g, u, to64::<T>, from64::<T>)
                    } else {
                        fwd_chunk(y, g, u, to32::<T>, from32::<T>)
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
                        bwd_chunk(dg, du, (g, u, dy), to64::<T>, from64::<T>, 1.0)
                    } else {
                        bwd_chunk(dg, du, (g, u, dy), to32::<T>, from32::<T>, 1.0)
                    }
                })
        };
        // SAFETY: dgate and dup are the two halves of the buffer, each chunked like gate, up
        // and dy (all n long, checked above); every element of every chunk is written.
        Ok(unsafe { filled_vec(2 * n, fill) })
    }
}
