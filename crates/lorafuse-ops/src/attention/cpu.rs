//! CPU flash attention: no `tq x tk` matrix, ever.
//!
//! Forward: one rayon task per query row (over `b * hq * tq` rows); the row streams over its
//! visible keys with an online softmax (running max `m`, running sum `l`, rescaled accumulator),
//! and leaves its logsumexp `m + ln l` for the backward.
//!
//! Backward recomputes each probability from that logsumexp, `p_ij = exp(s_ij - lse_i)`, in two
//! race-free passes: `dq` parallel over query rows, `dk`/`dv` parallel over `(b, kv head, key)`
//! (each key gathers over every query head of its group and every row that sees it, so GQA needs
//! no reduction buffer). `D_i = do_i . o_i` is computed once per row first.
//!
//! This scalar kernel (f64 arithmetic) serves f64 storage, where the tests take finite
//! differences; f32, bf16 and f16 go to the block-GEMM kernel in `cpu_blocked.rs`, many times
//! faster.

use candle_core::{DType, WithDType};
use rayon::prelude::*;

/// Sizes of one call: `q` `[b, hq, tq, d]`, `k`/`v` `[b, hkv, tk, d]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub tq: usize,
    pub tk: usize,
    pub d: usize,
    pub scale: f64,
}

impl Dims {
    /// The kv head a query head reads.
    pub(super) fn kv_head(&self, h: usize) -> usize {
        h / (self.hq / self.hkv)
    }
    /// The last key query row `i` sees.
    pub(super) fn last_key(&self, i: usize) -> usize {
        i + self.tk - self.tq
    }
    /// Start of query row `(b, h, i)` in `q`/`o`.
    pub(super) fn q_row(&self, b: usize, h: usize, i: usize) -> usize {
        ((b * self.hq + h) * self.tq + i) * self.d
    }
    /// Start of key row `(b, g, j)` in `k`/`v`.
    pub(super) fn k_row(&self, b: usize, g: usize, j: usize) -> usize {
        ((b * self.hkv + g) * self.tk + j) * self.d
    }
}

#[inline]
fn dot<T: WithDType>(a: &[T], b: &[T]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x.to_f64() * y.to_f64()).sum()
}

/// `(o, lse)`: the attention output in `T` and the per-row logsumexp in f64.
pub(crate) fn fwd<T: WithDType>(q: &[T], k: &[T], v: &[T], dm: Dims) -> (Vec<T>, Vec<f64>) {
    if T::DTYPE != DType::F64 {
        return super::cpu_blocked::fwd(q, k, v, dm);
    }
    let d = dm.d;
    let rows = dm.b * dm.hq * dm.tq;
    let mut o = vec![T::zero(); rows * d];
    let mut lse = vec![0f64; rows];
    o.par_chunks_mut(d.max(1))
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each_init(
            || vec![0f64; d],
            |acc, (row, (o_row, lse_row))| {
                let (bh, i) = (row / dm.tq, row % dm.tq);
                let (b, h) = (bh / dm.hq, bh % dm.hq);
                let g = dm.kv_head(h);
                let qi = &q[dm.q_row(b, h, i)..][..d];
                acc.iter_mut().for_each(|a| *a = 0.0);
                let (mut m, mut l) = (f64::NEG_INFINITY, 0f64);
                for j in 0..=dm.last_key(i) {
                    let kj = &k[dm.k_row(b, g, j)..][..d];
                    let vj = &v[dm.k_row(b, g, j)..][..d];
                    let s = dm.scale * dot(qi, kj);
                    let (alpha, p) = if s > m {
                        let alpha = (m - s).exp();
                        m = s;
                        (alpha, 1.0)
                    } else {
                        (1.0, (s - m).exp())
                    };
                    l = l * alpha + p;
                    for (a, x) in acc.iter_mut().zip(vj) {
                        *a = *a * alpha + p * x.to_f64();
                    }
                }
                for (o, a) in o_row.iter_mut().zip(acc.iter()) {
                    *o = T::from_f64(a / l);
                }
                *lse_row = m + l.ln();
            },
        );
    (o, lse)
}

/// Packed gradients `[dq | dk | dv]` in `T` (the op has one output; the caller splits it).
pub(crate) fn bwd<T: WithDType>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    g: &[T],
    lse: &[f64],
    dm: Dims,
) -> Vec<T> {
    if T::DTYPE != DType::F64 {
        return super::cpu_blocked::bwd(q, k, v, o, g, lse, dm);
    }
    let d = dm.d;
    let rows = dm.b * dm.hq * dm.tq;
    let delta: Vec<f64> = (0..rows)
        .into_par_iter()
        .map(|r| dot(&o[r * d..][..d], &g[r * d..][..d]))
        .collect();
    let n_q = rows * d;
    let n_k = dm.b * dm.hkv * dm.tk * d;
    let mut out = vec![T::zero(); n_q + 2 * n_k];
    let (dq, dkv) = out.split_at_mut(n_q);
    let (dk, dv) = dkv.split_at_mut(n_k);

    // dq_i = scale * sum_j p_ij (do_i . v_j - D_i) k_j
    dq.par_chunks_mut(d.max(1)).enumerate().for_each_init(
        || vec![0f64; d],
        |acc, (row, dq_row)| {
            let (bh, i) = (row / dm.tq, row % dm.tq);
            let (b, h) = (bh / dm.hq, bh % dm.hq);
            let gh = dm.kv_head(h);
            let qi = &q[row * d..][..d];
            let gi = &g[row * d..][..d];
            acc.iter_mut().for_each(|a| *a = 0.0);
            for j in 0..=dm.last_key(i) {
                let kj = &k[dm.k_row(b, gh, j)..][..d];
                let vj = &v[dm.k_row(b, gh, j)..][..d];
                let p = (dm.scale * dot(qi, kj) - lse[row]).exp();
                let ds = p * (dot(gi, vj) - delta[row]);
                for (a, x) in acc.iter_mut().zip(kj) {
                    *a += ds * x.to_f64();
                }
            }
            for (o, a) in dq_row.iter_mut().zip(acc.iter()) {
                *o = T::from_f64(dm.scale * a);
            }
        },
    );

    // dk_j = scale * sum_{h in group, i sees j} ds_ij q_i;  dv_j = sum p_ij do_i
    let rep = dm.hq / dm.hkv;
    dk.par_chunks_mut(d.max(1))
        .zip(dv.par_chunks_mut(d.max(1)))
        .enumerate()
        .for_each_init(
            || (vec![0f64; d], vec![0f64; d]),
            |(ak, av), (krow, (dk_row, dv_row))| {
                let (bg, j) = (krow / dm.tk, krow % dm.tk);
                let (b, gh) = (bg / dm.hkv, bg % dm.hkv);
                let kj = &k[krow * d..][..d];
                let vj = &v[krow * d..][..d];
                ak.iter_mut().for_each(|a| *a = 0.0);
                av.iter_mut().for_each(|a| *a = 0.0);
                // query i sees key j when j <= i + tk - tq
                let first = (j + dm.tq).saturating_sub(dm.tk);
                for h in gh * rep..(gh + 1) * rep {
                    for i in first..dm.tq {
                        let row = dm.q_row(b, h, i);
                        let r = row / d;
                        let qi = &q[row..][..d];
                        let gi = &g[row..][..d];
                        let p = (dm.scale * dot(qi, kj) - lse[r]).exp();
                        let ds = p * (dot(gi, vj) - delta[r]);
                        for ((a_k, a_v), (x, y)) in
                            ak.iter_mut().zip(av.iter_mut()).zip(qi.iter().zip(gi))
                        {
                            *a_k += ds * x.to_f64();
                            *a_v += p * y.to_f64();
                        }
                    }
                }
                for (o, a) in dk_row.iter_mut().zip(ak.iter()) {
                    *o = T::from_f64(dm.scale * a);
                }
                for (o, a) in dv_row.iter_mut().zip(av.iter()) {
                    *o = T::from_f64(*a);
                }
            },
        );
    out
}
