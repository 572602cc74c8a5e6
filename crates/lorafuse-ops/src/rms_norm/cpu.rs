//! RMSNorm CPU kernels: rayon over rows, statistics and arithmetic in f64.

use candle_core::{Result, WithDType};
use rayon::prelude::*;

use crate::cpu_util::{zeros, Kernel2, Kernel3};
use crate::error::shape_err;

/// Rows per task of the weight-gradient reduction: fixed, so the summation order (and the
/// result) does not depend on the thread count.
const DW_ROWS_PER_TASK: usize = 64;

pub(super) struct Fwd {
    pub eps: f64,
}

fn rstd<T: WithDType>(x: &[T], eps: f64) -> f64 {
    let ss: f64 = x
        .iter()
        .map(|v| {
            let v = v.to_f64();
            v * v
        })
        .sum();
    1.0 / (ss / x.len() as f64 + eps).sqrt()
}

fn check(x_len: usize, n: usize) -> Result<()> {
    if n == 0 || !x_len.is_multiple_of(n) {
        return Err(shape_err(
            "rms_norm",
            format!("{x_len} elements do not split into rows of {n}"),
        ));
    }
    Ok(())
}

impl Kernel2 for Fwd {
    const OP: &'static str = "rms_norm";

    fn f<T: WithDType>(&self, x: &[T], w: &[T]) -> Result<Vec<T>> {
        let n = w.len();
        check(x.len(), n)?;
        let mut y = zeros::<T>(x.len());
        y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
            let r = rstd(x, self.eps);
            for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                *y = T::from_f64(x.to_f64() * r * w.to_f64());
            }
        });
        Ok(y)
    }
}

pub(super) struct Bwd {
    pub eps: f64,
    pub want_dw: bool,
}

impl Kernel3 for Bwd {
    const OP: &'static str = "rms_norm_bwd";

    fn f<T: WithDType>(&self, x: &[T], w: &[T], dy: &[T]) -> Result<Vec<T>> {
        let n = w.len();
        check(x.len(), n)?;
        if dy.len() != x.len() {
            return Err(shape_err(
                Self::OP,
                format!("dy has {} elements, x {}", dy.len(), x.len()),
            ));
        }
        let rows = x.len() / n;
        let rstds: Vec<f64> = x.par_chunks(n).map(|x| rstd(x, self.eps)).collect();
        let mut out = zeros::<T>((rows + usize::from(self.want_dw)) * n);
        let (dx, dw) = out.split_at_mut(rows * n);
        dx.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .zip(dy.par_chunks(n))
            .zip(rstds.par_iter())
            .for_each(|(((dx, x), dy), &r)| {
                let dot: f64 = x
                    .iter()
                    .zip(dy)
                    .zip(w)
                    .map(|((x, g), w)| x.to_f64() * g.to_f64() * w.to_f64())
                    .sum();
                let c = r * r * dot / n as f64;
                for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                    *dx = T::from_f64(r * (g.to_f64() * w.to_f64() - x.to_f64() * c));
                }
            });
        if self.want_dw {
            let partials: Vec<Vec<f64>> = x
                .par_chunks(n * DW_ROWS_PER_TASK)
                .zip(dy.par_chunks(n * DW_ROWS_PER_TASK))
                .zip(rstds.par_chunks(DW_ROWS_PER_TASK))
                .map(|((x, dy), rs)| {
                    let mut acc = vec![0f64; n];
                    for ((x, dy), &r) in x.chunks(n).zip(dy.chunks(n)).zip(rs) {
                        for ((a, x), g) in acc.iter_mut().zip(x).zip(dy) {
                            *a += g.to_f64() * x.to_f64() * r;
                        }
                    }
                    acc
                })
                .collect();
            for (j, dw) in dw.iter_mut().enumerate() {
                *dw = T::from_f64(partials.iter().map(|p| p[j]).sum());
            }
        }
        Ok(out)
    }
}
