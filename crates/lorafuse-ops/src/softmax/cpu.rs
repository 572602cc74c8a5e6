//! Softmax CPU kernels: rayon over rows. The forward works in [`Acc`] precision (f64 for f64
//! rows, f32 with a vectorisable exp otherwise, as the f32 reference does); the backward in f64.

use candle_core::{Result, WithDType};
use rayon::prelude::*;

use crate::cpu_util::{load_f32, load_f64, store_f32, store_f64, zeros, Acc, Kernel1, Kernel2};
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
        if T::DTYPE == candle_core::DType::F64 {
            fwd_rows(&mut y, x, n, load_f64::<T>, store_f64::<T>);
        } else {
            fwd_rows(&mut y, x, n, load_f32::<T>, store_f32::<T>);
        }
        Ok(y)
    }
}

/// Softmax of each row of `x` into `y` in the working precision `A`. The exponentials are kept in
/// `A` scratch: half types would round them before the division.
fn fwd_rows<T: WithDType, A: Acc>(
    y: &mut [T],
    x: &[T],
    n: usize,
    load: impl Fn(T) -> A + Sync + Copy,
    store: impl Fn(A) -> T + Sync + Copy,
) {
    y.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .for_each_init(Vec::<A>::new, |e, (y, x)| {
            let max = x.iter().fold(A::NEG_INF, |m, &v| {
                let v = load(v);
                if v > m {
                    v
                } else {
                    m
                }
            });
            e.clear();
            e.extend(x.iter().map(|&v| (load(v) - max).exp()));
            let mut sum = A::from_f64(0.0);
            for &v in e.iter() {
                sum += v;
            }
            let inv = A::from_f64(1.0) / sum;
            for (y, &e) in y.iter_mut().zip(e.iter()) {
                *y = store(e * inv);
            }
        });
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
