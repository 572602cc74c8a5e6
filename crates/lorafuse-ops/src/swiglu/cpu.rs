//! SwiGLU CPU kernels: rayon over fixed-size chunks, arithmetic in f64.

use candle_core::{Result, WithDType};
use rayon::prelude::*;

use crate::cpu_util::{zeros, Kernel2, Kernel3};
use crate::error::shape_err;

/// Elements per rayon task: big enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 4096;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
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
        let mut y = zeros::<T>(gate.len());
        y.par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK))
            .zip(up.par_chunks(CHUNK))
            .for_each(|((y, g), u)| {
                for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
                    let g = g.to_f64();
                    *y = T::from_f64(g * sigmoid(g) * u.to_f64());
                }
            });
        Ok(y)
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
        let mut out = zeros::<T>(2 * n);
        let (dgate, dup) = out.split_at_mut(n);
        dgate
            .par_chunks_mut(CHUNK)
            .zip(dup.par_chunks_mut(CHUNK))
            .zip(gate.par_chunks(CHUNK))
            .zip(up.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
            .for_each(|(((dg, du), g), (u, dy))| {
                for ((((dg, du), g), u), dy) in dg.iter_mut().zip(du).zip(g).zip(u).zip(dy) {
                    let (g, u, dy) = (g.to_f64(), u.to_f64(), dy.to_f64());
                    let s = sigmoid(g);
                    *dg = T::from_f64(dy * u * s * (1.0 + g * (1.0 - s)));
                    *du = T::from_f64(dy * g * s);
                }
            });
        Ok(out)
    }
}
