//! CPU attention for f32, bf16 and f16 storage on matrix products: per block of `QB` query rows
//! the scores `S = Q Kᵀ` (only the keys the block can see), the masked row softmax and `O = P V`
//! run as small GEMMs, so the score matrix exists one block at a time (`QB x tk`, never
//! `tq x tk`). Arithmetic is f32 with f32 accumulation.
//!
//! The backward runs one task per `(batch, kv head)`: it owns `dk`/`dv` of that kv head and `dq`
//! of every query head in its group, so nothing is shared between tasks. Per query block it
//! recomputes `P = exp(scale S - lse)`, then `dV += Pᵀ dO`, `dP = dO Vᵀ`,
//! `dS = P ∘ (dP - D)` with `D_i = dO_i · O_i`, `dQ = scale dS K` and `dK += scale dSᵀ Q`.
//!
//! The scalar kernel in `cpu.rs` (f64 everywhere) stays for f64, where the tests take finite
//! differences.

use super::cpu::Dims;
use candle_core::WithDType;
use rayon::prelude::*;

/// Query rows per block: the score block is `QB x tk` f32 (512 KiB at tk = 2048).
const QB: usize = 64;

/// A row-major matrix view: `rows x cols` with row stride `rs` (column stride 1), or, when
/// `transposed`, the transpose of such a view (so `rows`/`cols` are of the transposed matrix).
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    transposed: bool,
}

impl<'a> Mat<'a> {
    fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs,
            transposed: false,
        }
    }

    fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            transposed: !self.transposed,
            ..self
        }
    }

    /// (row stride, column stride) of the logical matrix.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (1, self.rs as isize)
        } else {
            (self.rs as isize, 1)
        }
    }

    /// Elements the view reaches, for the bounds check.
    fn extent(&self) -> usize {
        let (r, c) = if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        };
        if r == 0 || c == 0 {
            0
        } else {
            (r - 1) * self.rs + c
        }
    }
}

/// `dst[m x n] (row stride n) = alpha * dst + beta * a b` (`alpha` 0: overwrite).
fn gemm(dst: &mut [f32], a: Mat, b: Mat, alpha: f32, beta: f32) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k
            && dst.len() >= m * n
            && a.data.len() >= a.extent()
            && b.data.len() >= b.extent(),
        "attention gemm: {m}x{k} by {}x{n} into {}",
        b.rows,
        dst.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst[..m * n].iter_mut().for_each(|x| *x *= alpha);
        return;
    }
    let (a_rs, a_cs) = a.strides();
    let (b_rs, b_cs) = b.strides();
    // SAFETY: the assert above proves every index the product touches is inside its slice: `dst`
    // holds m*n (row stride n, column stride 1), `a` and `b` reach at most `extent()` elements;
    // `dst` is a unique borrow, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            alpha != 0.0,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            alpha,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The storage converted to f32 (a copy also for f32: the kernels want one element type).
fn to_f32<T: WithDType>(x: &[T]) -> Vec<f32> {
    x.par_iter().map(|v| v.to_f64() as f32).collect()
}

/// `exp(s * scale - lse)` over the visible keys of each row of a score block, zero past them.
/// `last(r)` is the last key row `r` of the block sees.
fn probabilities(s: &mut [f32], nk: usize, scale: f32, lse: &[f64], last: impl Fn(usize) -> usize) {
    for (r, row) in s.chunks_mut(nk).enumerate() {
        let (vis, hidden) = row.split_at_mut((last(r) + 1).min(nk));
        let l = lse[r] as f32;
        vis.iter_mut()
            .for_each(|x| *x = crate::cpu_util::fast_exp(*x * scale - l));
        hidden.iter_mut().for_each(|x| *x = 0.0);
    }
}

/// `(o, lse)` as `cpu::fwd`.
pub(crate) fn fwd<T: WithDType>(q: &[T], k: &[T], v: &[T], dm: Dims) -> (Vec<T>, Vec<f64>) {
    let (q, k, v) = (to_f32(q), to_f32(k), to_f32(v));
    let d = dm.d;
    let rows = dm.b * dm.hq * dm.tq;
    let mut o = vec![T::zero(); rows * d];
    let mut lse = vec![0f64; rows];
    let blocks = dm.tq.div_ceil(QB).max(1);
    let scale = dm.scale as f32;
    // One task per (batch, head, query block): rows of o and lse are the block's own.
    let mut tasks: Vec<(usize, &mut [T], &mut [f64])> = Vec::with_capacity(dm.b * dm.hq * blocks);
    for (bh, (o_bh, l_bh)) in o
        .chunks_mut((dm.tq * d).max(1))
        .zip(lse.chunks_mut(dm.tq.max(1)))
        .enumerate()
    {
        for (blk, (ob, lb)) in o_bh
            .chunks_mut(QB * d.max(1))
            .zip(l_bh.chunks_mut(QB))
            .enumerate()
        {
            tasks.push((bh * blocks + blk, ob, lb));
        }
    }
    tasks.into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(s, acc), (task, o_blk, lse_blk)| {
            let (bh, blk) = (task / blocks, task % blocks);
            let (b, h) = (bh / dm.hq, bh % dm.hq);
            let g = dm.kv_head(h);
            let i0 = blk * QB;
            let n = lse_blk.len();
            let nk = dm.last_key(i0 + n - 1) + 1;
            let qb = Mat::new(&q[dm.q_row(b, h, i0)..], n, d, d);
            let kb = Mat::new(&k[dm.k_row(b, g, 0)..], nk, d, d);
            let vb = Mat::new(&v[dm.k_row(b, g, 0)..], nk, d, d);
            s.resize(n * nk, 0.0);
            gemm(s, qb, kb.t(), 0.0, 1.0);
            for (r, (row, lse_r)) in s.chunks_mut(nk).zip(lse_blk.iter_mut()).enumerate() {
                let vis = (dm.last_key(i0 + r) + 1).min(nk);
                let (seen, hidden) = row.split_at_mut(vis);
                let m = seen
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
                let mut l = 0f32;
                for x in seen.iter_mut() {
                    *x = crate::cpu_util::fast_exp(*x * scale - m);
                    l += *x;
                }
                let inv = 1.0 / l;
                seen.iter_mut().for_each(|x| *x *= inv);
                hidden.iter_mut().for_each(|x| *x = 0.0);
                *lse_r = m as f64 + (l as f64).ln();
            }
            acc.resize(n * d, 0.0);
            gemm(acc, Mat::new(s, n, nk, nk), vb, 0.0, 1.0);
            for (o, a) in o_blk.iter_mut().zip(acc.iter()) {
                *o = T::from_f64(*a as f64);
            }
        },
    );
    (o, lse)
}

/// Packed `[dq | dk | dv]` as `cpu::bwd`.
pub(crate) fn bwd<T: WithDType>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    g: &[T],
    lse: &[f64],
    dm: Dims,
) -> Vec<T> {
    let d = dm.d;
    let rows = dm.b * dm.hq * dm.tq;
    let (q, k, v, go) = (to_f32(q), to_f32(k), to_f32(v), to_f32(g));
    let o = to_f32(o);
    let delta: Vec<f32> = (0..rows)
        .into_par_iter()
        .map(|r| {
            o[r * d..][..d]
                .iter()
                .zip(&go[r * d..][..d])
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect();
    let rep = dm.hq / dm.hkv;
    let scale = dm.scale as f32;
    let n_q = rows * d;
    let n_k = dm.b * dm.hkv * dm.tk * d;
    let mut dq = vec![0f32; n_q];
    let mut dk = vec![0f32; n_k];
    let mut dv = vec![0f32; n_k];
    let group_q = (rep * dm.tq * d).max(1);
    let group_k = (dm.tk * d).max(1);
    dq.par_chunks_mut(group_q)
        .zip(dk.par_chunks_mut(group_k))
        .zip(dv.par_chunks_mut(group_k))
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(p, dp), (bg, ((dq_g, dk_g), dv_g))| {
                let (b, gh) = (bg / dm.hkv, bg % dm.hkv);
                let kg = &k[dm.k_row(b, gh, 0)..][..dm.tk * d];
                let vg = &v[dm.k_row(b, gh, 0)..][..dm.tk * d];
                for (hh, dq_h) in dq_g.chunks_mut((dm.tq * d).max(1)).enumerate() {
                    let h = gh * rep + hh;
                    for (blk, dq_blk) in dq_h.chunks_mut(QB * d.max(1)).enumerate() {
                        let i0 = blk * QB;
                        let n = dq_blk.len() / d.max(1);
                        let nk = dm.last_key(i0 + n - 1) + 1;
                        let r0 = (b * dm.hq + h) * dm.tq + i0;
                        let qb = Mat::new(&q[r0 * d..], n, d, d);
                        let gb = Mat::new(&go[r0 * d..], n, d, d);
                        let kb = Mat::new(kg, nk, d, d);
                        let vb = Mat::new(vg, nk, d, d);
                        p.resize(n * nk, 0.0);
                        gemm(p, qb, kb.t(), 0.0, 1.0);
                        probabilities(p, nk, scale, &lse[r0..r0 + n], |r| dm.last_key(i0 + r));
                        let pm = Mat::new(p, n, nk, nk);
                        // dV[0..nk] += Pᵀ dO
                        gemm(&mut dv_g[..nk * d], pm.t(), gb, 1.0, 1.0);
                        // dS = P ∘ (dO Vᵀ - D), in place of dP
                        dp.resize(n * nk, 0.0);
                        gemm(dp, gb, vb.t(), 0.0, 1.0);
                        for (r, (dp_row, p_row)) in dp.chunks_mut(nk).zip(p.chunks(nk)).enumerate()
                        {
                            let dr = delta[r0 + r];
                            for (x, &pv) in dp_row.iter_mut().zip(p_row) {
                                *x = pv * (*x - dr);
                            }
                        }
                        let ds = Mat::new(dp, n, nk, nk);
                        gemm(dq_blk, ds, kb, 0.0, scale);
                        // dK[0..nk] += scale dSᵀ Q
                        gemm(&mut dk_g[..nk * d], ds.t(), qb, 1.0, scale);
                    }
                }
            },
        );
    let mut out = Vec::with_capacity(n_q + 2 * n_k);
    for part in [&dq, &dk, &dv] {
        out.extend(part.iter().map(|&x| T::from_f64(x as f64)));
    }
    out
}
