//! RoPE CPU kernel: rayon over `[.., d]` rows, arithmetic in f64.

use candle_core::{Result, WithDType};
use rayon::prelude::*;

use crate::cpu_util::{zeros, Kernel3};
use crate::error::shape_err;

/// Rotates every pair of `x` (`[rows, d]`, row `r` at position `r % t`) by `cos`/`sin`
/// (`[t, d/2]`); `inverse` negates the angle (the backward).
pub(super) struct Rotate {
    pub t: usize,
    pub d: usize,
    pub interleaved: bool,
    pub inverse: bool,
}

impl Kernel3 for Rotate {
    const OP: &'static str = "rope";

    fn f<T: WithDType>(&self, x: &[T], cos: &[T], sin: &[T]) -> Result<Vec<T>> {
        let (t, d) = (self.t, self.d);
        let half = d / 2;
        if x.is_empty() {
            return Ok(Vec::new());
        }
        if t == 0
            || d == 0
            || d % 2 != 0
            || !x.len().is_multiple_of(t * d)
            || cos.len() != t * half
            || sin.len() != t * half
        {
            return Err(shape_err(
                Self::OP,
                format!(
                    "x {} elements, cos {} / sin {} for t = {t}, d = {d}",
                    x.len(),
                    cos.len(),
                    sin.len()
                ),
            ));
        }
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut y = zeros::<T>(x.len());
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .enumerate()
            .for_each(|(row, (y, x))| {
                let pos = row % t;
                let cos = &cos[pos * half..(pos + 1) * half];
                let sin = &sin[pos * half..(pos + 1) * half];
                for i in 0..half {
                    let (i1, i2) = if self.interleaved {
                        (2 * i, 2 * i + 1)
                    } else {
                        (i, i + half)
                    };
                    let (c, s) = (cos[i].to_f64(), sign * sin[i].to_f64());
                    let (x1, x2) = (x[i1].to_f64(), x[i2].to_f64());
                    y[i1] = T::from_f64(x1 * c - x2 * s);
                    y[i2] = T::from_f64(x2 * c + x1 * s);
                }
            });
        Ok(y)
    }
}
