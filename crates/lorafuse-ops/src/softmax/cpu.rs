//! Softmax CPU kernels: rayon over rows. The forward computes f64 rows in f64 and every other
//! dtype in f32 with a vectorisable exp (as the f32 reference does); the backward in f64.

use candle_core::{Result, WithDType};
use rayon::prelude::*;

use crate::cpu_util::{zeros, Kernel1, Kernel2};
use crate::error::shape_err;

pub(super) struct Fwd {
    pub n: usize,
}

impl Kernel1 for Fwd {
    const OP: &'static str = "softmax";

    fn f<T: WithDType>(&self, x: &[T]) -> Result<Vec<T>> {
        let n = self.n;
        if n == 0 || !x.len().is_multiple_of(n) {
            return Err(shape_err(
                Self::OP,
                format!("{} elements do not split into rows of {n}", x.len()),
            ));
        }
        let mut y = zeros::<T>(x.len());
        if T::DTYPE != candle_core::DType::F64 {
            y.par_chunks_mut(n)
                .zip(x.par_chunks(n))
                .for_each_init(Vec::<f32>::new, |e, (y, x)| {
                    let max = x
                        .iter()
                        .map(|v| v.to_f64() as f32)
                        .fold(f32::NEG_INFINITY, f32::max);
                    // Exponentials in f32 scratch: half types would round them before the
                    // division.
                    e.clear();
                    e.extend(
                        x.iter()
                            .map(|v| crate::cpu_util::fast_exp(v.to_f64() as f32 - max)),
                    );
                    let inv = 1.0 / e.iter().sum::<f32>();
                    for (y, e) in y.iter_mut().zip(e.iter()) {
                        *y = T::from_f64((e * inv) as f64);
                    }
                });
            return Ok(y);
        }
        y.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each_init(Vec::<f64>::new, |e, (y, x)| {
                let max = x
                    .iter()
                    .map(|v| v.to_f64())
                    .fold(f64::NEG_INFINITY, f64::max);
                // Exponentials are kept in f64 scratch: half types would round them before the
                // division.
                e.clear();
                e.extend(x.iter().map(|v| (v.to_f64() - max).exp()));
                let inv = 1.0 / e.iter().sum::<f64>();
                for (y, e) in y.iter_mut().zip(e.iter()) {
                    *y = T::from_f64(e * inv);
                }
            });
        Ok(y)
    }
}

pub(super) struct Bwd {
    pub n: usize,
}

impl Kernel2 for Bwd {
    const OP: &'static str = "softmax_bwd";

    fn f<T: WithDType>(&self, y: &[T], dy: &[T]) -> Result<Vec<T>> {
        let n = self.n;
        if n == 0 || !y.len().is_multiple_of(n) || dy.len() != y.len() {
            return Err(shape_err(
                Self::OP,
                format!("y {} / dy {} elements, rows of {n}", y.len(), dy.len()),
            ));
        }
        let mut dx = zeros::<T>(y.len());
        dx.par_chunks_mut(n)
            .zip(y.par_chunks(n))
            .zip(dy.par_chunks(n))
            .for_each(|((dx, y), dy)| {
                let dot: f64 = y.iter().zip(dy).map(|(y, g)| y.to_f64() * g.to_f64()).sum();
                for ((dx, y), g) in dx.iter_mut().zip(y).zip(dy) {
                    *dx = T::from_f64(y.to_f64() * (g.to_f64() - dot));
                }
            });
        Ok(dx)
    }
}
