//! LayerNorm CPU kernels: rayon over rows, two-pass statistics. The forward works in [`Acc`]
//! precision (f32 for f32 and half types, vectorised; f64 for f64): it runs on every BERT layer
//! of an embedding pass, where a scalar f64 loop was 15% of the time. The backward keeps f64.

use candle_core::{Result, WithDType};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use crate::cpu_util::{
    filled_vec, load_f32, load_f64, row_sum, store_f32, store_f64, zeros, Acc, Kernel2, Kernel3,
};
use crate::error::shape_err;

/// Rows per task of the parameter-gradient reductions: fixed, so the summation order (and the
/// result) does not depend on the thread count.
const ROWS_PER_TASK: usize = 64;

/// `(mean, rstd)` of a row, variance biased (divided by n) as in BERT and torch.
fn stats<T: WithDType>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|v| v.to_f64()).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|v| {
            let c = v.to_f64() - mean;
            c * c
        })
        .sum::<f64>()
        / n;
    (mean, 1.0 / (var + eps).sqrt())
}

fn check(x_len: usize, n: usize, op: &'static str) -> Result<()> {
    if n == 0 || !x_len.is_multiple_of(n) {
        return Err(shape_err(
            op,
            format!("{x_len} elements do not split into rows of {n}"),
        ));
    }
    Ok(())
}

fn forward<T: WithDType>(x: &[T], w: &[T], b: Option<&[T]>, eps: f64) -> Result<Vec<T>> {
    let n = w.len();
    check(x.len(), n, "layer_norm")?;
    if b.is_some_and(|b| b.len() != n) {
        return Err(shape_err("layer_norm", "bias and weight lengths differ"));
    }
    let fill = |y: &mut [MaybeUninit<T>]| {
        if T::DTYPE == candle_core::DType::F64 {
            fwd_rows(y, x, (w, b), eps, load_f64::<T>, store_f64::<T>);
        } else {
            fwd_rows(y, x, (w, b), eps, load_f32::<T>, store_f32::<T>);
        }
    };
    // SAFETY: `check` made `x.len()` a multiple of `n`, and `fwd_rows` writes every element of
    // every row.
    Ok(unsafe { filled_vec(x.len(), fill) })
}

/// `y = (x - mean) * rstd * w + b` row by row, statistics in the working precision `A`.
fn fwd_rows<T: WithDType, A: Acc>(
    y: &mut [MaybeUninit<T>],
    x: &[T],
    (w, b): (&[T], Option<&[T]>),
    eps: f64,
    load: impl Fn(T) -> A + Sync + Copy,
    store: impl Fn(A) -> T + Sync + Copy,
) {
    let n = w.len();
    let nf = A::from_f64(n as f64);
    let eps = A::from_f64(eps);
    let one = A::from_f64(1.0);
    let row = |(y, x): (&mut [MaybeUninit<T>], &[T])| {
        let mean = row_sum(x, load, |v| v) / nf;
        let var = row_sum(x, load, |v| (v - mean) * (v - mean)) / nf;
        let rstd = one / (var + eps).sqrt();
        match b {
            Some(b) => {
                for ((y, &x), (&w, &b)) in y.iter_mut().zip(x).zip(w.iter().zip(b)) {
                    y.write(store((load(x) - mean) * rstd * load(w) + load(b)));
                }
            }
            None => {
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    y.write(store((load(x) - mean) * rstd * load(w)));
                }
            }
        }
    };
    // A single document's rows (55 x 384) take microseconds: waking a thread would cost more.
    if x.len() < PAR_MIN_ELEMS {
        y.chunks_mut(n).zip(x.chunks(n)).for_each(row);
    } else {
        y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(row);
    }
}

/// Below this many elements the forward runs on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 15;

pub(super) struct Fwd {
    pub eps: f64,
}

impl Kernel3 for Fwd {
    const OP: &'static str = "layer_norm";

    fn f<T: WithDType>(&self, x: &[T], w: &[T], b: &[T]) -> Result<Vec<T>> {
        forward(x, w, Some(b), self.eps)
    }
}

pub(super) struct FwdNoBias {
    pub eps: f64,
}

impl Kernel2 for FwdNoBias {
    const OP: &'static str = "layer_norm";

    fn f<T: WithDType>(&self, x: &[T], w: &[T]) -> Result<Vec<T>> {
        forward(x, w, None, self.eps)
    }
}

pub(super) struct Bwd {
    pub eps: f64,
    pub want_dw: bool,
    pub want_db: bool,
}

impl Kernel3 for Bwd {
    const OP: &'static str = "layer_norm_bwd";

    fn f<T: WithDType>(&self, x: &[T], w: &[T], dy: &[T]) -> Result<Vec<T>> {
        let n = w.len();
        check(x.len(), n, Self::OP)?;
        if dy.len() != x.len() {
            return Err(shape_err(
                Self::OP,
                format!("dy has {} elements, x {}", dy.len(), x.len()),
            ));
        }
        let rows = x.len() / n;
        let nf = n as f64;
        let st: Vec<(f64, f64)> = x.par_chunks(n).map(|x| stats(x, self.eps)).collect();
        let extra = usize::from(self.want_dw) + usize::from(self.want_db);
        let mut out = zeros::<T>((rows + extra) * n);
        let (dx, params) = out.split_at_mut(rows * n);
        dx.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .zip(dy.par_chunks(n))
            .zip(st.par_iter())
            .for_each(|(((dx, x), dy), &(mean, rstd))| {
                let (mut sg, mut sgx) = (0f64, 0f64);
                for ((x, g), w) in x.iter().zip(dy).zip(w) {
                    let g = g.to_f64() * w.to_f64();
                    sg += g;
                    sgx += g * (x.to_f64() - mean) * rstd;
                }
                let (mg, mgx) = (sg / nf, sgx / nf);
                for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                    let g = g.to_f64() * w.to_f64();
                    let xhat = (x.to_f64() - mean) * rstd;
                    *dx = T::from_f64(rstd * (g - mg - xhat * mgx));
                }
            });
        if extra > 0 {
            // Per task: [dw partial; db partial] over a fixed block of rows, then summed in order.
            let partials: Vec<(Vec<f64>, Vec<f64>)> = x
                .par_chunks(n * ROWS_PER_TASK)
                .zip(dy.par_chunks(n * ROWS_PER_TASK))
                .zip(st.par_chunks(ROWS_PER_TASK))
                .map(|((x, dy), st)| {
                    let mut dw = vec![0f64; if self.want_dw { n } else { 0 }];
                    let mut db = vec![0f64; if self.want_db { n } else { 0 }];
                    for ((x, dy), &(mean, rstd)) in x.chunks(n).zip(dy.chunks(n)).zip(st) {
                        for (a, (x, g)) in dw.iter_mut().zip(x.iter().zip(dy)) {
                            *a += g.to_f64() * (x.to_f64() - mean) * rstd;
                        }
                        for (a, g) in db.iter_mut().zip(dy) {
                            *a += g.to_f64();
                        }
                    }
                    (dw, db)
                })
                .collect();
            let mut rows_out = params.chunks_mut(n);
            if self.want_dw {
                if let Some(dst) = rows_out.next() {
                    for (j, d) in dst.iter_mut().enumerate() {
                        *d = T::from_f64(partials.iter().map(|p| p.0[j]).sum());
                    }
                }
            }
            if self.want_db {
                if let Some(dst) = rows_out.next() {
                    for (j, d) in dst.iter_mut().enumerate() {
                        *d = T::from_f64(partials.iter().map(|p| p.1[j]).sum());
                    }
                }
            }
        }
        Ok(out)
    }
}
