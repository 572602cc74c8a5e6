//! CPU kernels: one rayon task per row; the forward takes each row's logsumexp (its max, then
//! the sum of shifted exponentials, while the row is in cache) and the backward reads the row once
//! (softmax from the saved logsumexp, minus the one-hot, times the row's gradient coefficient).
//!
//! Accumulation is f32 for f32/bf16/f16 logits and f64 for f64 logits (so that finite-difference
//! tests in f64 see f64 precision).

use super::OP;
use crate::cpu_util::Acc;
use crate::error::shape_err;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

/// A logits element and its accumulator.
pub(super) trait Elem: WithDType {
    type A: Acc;
    fn load(self) -> Self::A;
    fn store(a: Self::A) -> Self;
}

macro_rules! elem {
    ($t:ty, $a:ty, $load:expr, $store:expr) => {
        impl Elem for $t {
            type A = $a;
            #[inline(always)]
            fn load(self) -> $a {
                $load(self)
            }
            #[inline(always)]
            fn store(a: $a) -> Self {
                $store(a)
            }
        }
    };
}
elem!(f32, f32, |x| x, |a| a);
elem!(f64, f64, |x| x, |a| a);
elem!(bf16, f32, bf16::to_f32, bf16::from_f32);
elem!(f16, f32, f16::to_f32, f16::from_f32);

/// The contiguous slice of `T` that `l` describes.
pub(super) fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| shape_err(OP, format!("operand {:?} must be contiguous", l.dims())))?;
    Ok(&s.as_slice::<T>()?[start..end])
}

/// Targets as i64, whatever integer dtype they came in.
pub(super) fn targets_i64(s: &CpuStorage, l: &Layout) -> Result<Vec<i64>> {
    Ok(match s {
        CpuStorage::I64(_) => contiguous::<i64>(s, l)?.to_vec(),
        CpuStorage::U32(_) => contiguous::<u32>(s, l)?.iter().map(|&t| t as i64).collect(),
        CpuStorage::I32(_) => contiguous::<i32>(s, l)?.iter().map(|&t| t as i64).collect(),
        CpuStorage::U8(_) => contiguous::<u8>(s, l)?.iter().map(|&t| t as i64).collect(),
        other => {
            return Err(crate::OpError::DType {
                op: OP,
                dtype: other.dtype(),
            }
            .into())
        }
    })
}

/// Checks every target is `ignore` or a vocabulary index; returns the number of counted rows.
pub(super) fn check_targets(targets: &[i64], vocab: usize, ignore: i64) -> Result<usize> {
    let mut count = 0;
    for (i, &t) in targets.iter().enumerate() {
        if t == ignore {
            continue;
        }
        if t < 0 || t as usize >= vocab {
            return Err(shape_err(
                OP,
                format!("target {t} at row {i} is outside the vocabulary of {vocab}"),
            ));
        }
        count += 1;
    }
    Ok(count)
}

/// Lanes of the partial max and sum in [`row_lse`]: independent accumulators are what lets the
/// compiler vectorise a float reduction (it may not reorder one accumulator's additions).
const LANES: usize = 16;

/// `logsumexp` of a row: the max, then the sum of shifted exponentials, each in `LANES` partial
/// accumulators (two branch-free passes over a row that stays in cache).
#[inline]
fn row_lse<T: Elem>(row: &[T]) -> T::A {
    let neg_inf = T::A::NEG_INF;
    let mut mx = [neg_inf; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in mx.iter_mut().zip(c) {
            let x = x.load();
            *m = if x > *m { x } else { *m };
        }
    }
    let mut m = mx.iter().fold(neg_inf, |m, &x| if x > m { x } else { m });
    for &x in tail {
        let x = x.load();
        if x > m {
            m = x;
        }
    }
    if m == neg_inf {
        return m;
    }
    let zero = T::A::from_f64(0.0);
    let mut acc = [zero; LANES];
    let chunks = row.chunks_exact(LANES);
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += (x.load() - m).exp();
        }
    }
    let mut s = tail.iter().fold(zero, |s, &x| s + (x.load() - m).exp());
    for a in acc {
        s += a;
    }
    m + s.ln()
}

/// Per-row `(loss, lse)`; ignored rows get loss 0 (their lse is still computed: cheap, and keeps
/// the backward's indexing uniform).
pub(super) fn fwd_rows<T: Elem>(
    logits: &[T],
    vocab: usize,
    targets: &[i64],
    ignore: i64,
) -> (Vec<T::A>, Vec<T::A>) {
    let zero = T::A::from_f64(0.0);
    logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            if t == ignore {
                return (zero, zero);
            }
            let lse = row_lse(row);
            (lse - row[t as usize].load(), lse)
        })
        .unzip()
}

/// `dlogits = (softmax - onehot) * coef[row]`, zero for ignored rows.
pub(super) fn bwd_rows<T: Elem>(
    logits: &[T],
    vocab: usize,
    targets: &[i64],
    ignore: i64,
    lse: &[T::A],
    coef: &(dyn Fn(usize) -> T::A + Sync),
) -> Vec<T> {
    let zero = T::store(T::A::from_f64(0.0));
    let fill = |out: &mut [std::mem::MaybeUninit<T>]| {
        out.par_chunks_mut(vocab)
            .zip(logits.par_chunks(vocab))
            .enumerate()
            .for_each(|(i, (d, row))| {
                let t = targets[i];
                if t == ignore {
                    d.iter_mut().for_each(|dj| {
                        dj.write(zero);
                    });
                    return;
                }
                let (l, c) = (lse[i], coef(i));
                for (dj, &x) in d.iter_mut().zip(row) {
                    dj.write(T::store((x.load() - l).exp() * c));
                }
                let t = t as usize;
                d[t].write(T::store((row[t].load() - l).exp() * c - c));
            })
    };
    // SAFETY: the rows tile the buffer (`logits.len()` is rows * vocab) and every row writes each
    // of its elements, ignored rows included.
    unsafe { crate::cpu_util::filled_vec(logits.len(), fill) }
}
