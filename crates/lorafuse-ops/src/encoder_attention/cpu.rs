//! The CPU f32 encoder attention: one batch row per task (one head per task when there are too few
//! rows to keep every thread busy), heads one after another, each head's keys transposed (and
//! scaled) and values gathered once into scratch, then register tiles of scores, a softmax per
//! row, and register tiles of weighted values.

use super::OP;
use crate::cpu_util::{fast_exp, filled_vec};
use crate::error::shape_err;
use candle_core::{Result, Storage, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Per-task buffers, reused across heads and batch rows.
#[derive(Default)]
struct Scratch {
    /// Keys of one head, transposed and scaled: `[d][tp]` (AVX-512 path).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    kt: Vec<f32>,
    /// Values of one head: `[t][d]` (AVX-512 path).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    vh: Vec<f32>,
    /// What each key adds to its scores: the mask, and -inf past `t` (AVX-512 path, `[tp]`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    key_bias: Vec<f32>,
    /// Scores, then probabilities, of one head: `[t][tp]`.
    p: Vec<f32>,
    /// The inverse of each query row's probability sum: `[t]`.
    o: Vec<f32>,
}

/// Sizes of a call, and the heads one task computes.
#[derive(Clone, Copy)]
struct Dims {
    t: usize,
    /// Row stride of the inputs (all heads).
    h: usize,
    d: usize,
    /// The task computes heads `head0..head0 + heads`...
    head0: usize,
    heads: usize,
    /// ...into an output whose rows are `out_stride` apart, head `head0` at column 0.
    out_stride: usize,
    scale: f32,
}

pub(super) fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, h) = q.dims3()?;
    let d = h / heads;
    let dm = Dims {
        t,
        h,
        d,
        head0: 0,
        heads,
        out_stride: h,
        scale: scale as f32,
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let mask = mask.map(Tensor::contiguous).transpose()?;
    let threads = rayon::current_num_threads();
    let out = with_slice(&q, |qs| {
        with_slice(&k, |ks| {
            with_slice(&v, |vs| {
                let inputs = |bi: usize| {
                    let rows = bi * t * h..(bi + 1) * t * h;
                    (&qs[rows.clone()], &ks[rows.clone()], &vs[rows])
                };
                let run = |ms: Option<&[f32]>| {
                    let mask_row = |bi: usize| ms.map(|m| &m[bi * t..(bi + 1) * t]);
                    if b >= 2 * threads {
                        // SAFETY: the chunks partition the output and `batch_row` writes every
                        // element of its chunk.
                        return unsafe {
                            filled_vec(b * t * h, |dst| {
                                dst.par_chunks_mut(t * h)
                                    .enumerate()
                                    .for_each_init(Scratch::default, |s, (bi, dst)| {
                                        batch_row(inputs(bi), mask_row(bi), dm, s, dst)
                                    })
                            })
                        };
                    }
                    // Few batch rows (a single document): one task per head, each into its own
                    // `[t, d]` block, then merged.
                    let blocks: Vec<Vec<f32>> = (0..b * heads)
                        .into_par_iter()
                        .map_init(Scratch::default, |s, task| {
                            let (bi, head) = (task / heads, task % heads);
                            let one = Dims {
                                head0: head,
                                heads: 1,
                                out_stride: d,
                                ..dm
                            };
                            // SAFETY: `batch_row` writes all `t * d` elements of its block.
                            unsafe {
                                filled_vec(t * d, |dst| {
                                    batch_row(inputs(bi), mask_row(bi), one, s, dst)
                                })
                            }
                        })
                        .collect();
                    let mut out = Vec::with_capacity(b * t * h);
                    for bi in 0..b {
                        for i in 0..t {
                            for block in &blocks[bi * heads..(bi + 1) * heads] {
                                out.extend_from_slice(&block[i * d..(i + 1) * d]);
                            }
                        }
                    }
                    out
                };
                match &mask {
                    Some(m) => with_slice(m, |ms| Ok(run(Some(ms)))),
                    None => Ok(run(None)),
                }
            })
        })
    })?;
    Tensor::from_vec(out, (b, t, h), q.device())
}

/// The f32 slice of a contiguous CPU tensor, handed to `f`.
fn with_slice<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (s, l) = x.storage_and_layout();
    let Storage::Cpu(s) = &*s else {
        return Err(shape_err(OP, "input is not on the CPU"));
    };
    f(crate::cpu_util::contiguous(s.as_slice::<f32>()?, l, OP)?)
}

/// One batch row: `q`, `k`, `v` are `[t, h]`, `mask` `[t]`; writes all of `out` (`[t, h]`).
fn batch_row(
    qkv: (&[f32], &[f32], &[f32]),
    mask: Option<&[f32]>,
    dm: Dims,
    s: &mut Scratch,
    out: &mut [MaybeUninit<f32>],
) {
    #[cfg(target_arch = "x86_64")]
    if dm.d.is_multiple_of(avx512::LANES) && avx512::available() {
        // SAFETY: `available()` checked AVX-512F; the head width is a multiple of 16 lanes.
        unsafe { avx512::batch_row(qkv, mask, dm, s, out) };
        return;
    }
    let Dims {
        t,
        h,
        d,
        head0,
        heads,
        out_stride,
        scale,
    } = dm;
    let (q, k, v) = qkv;
    s.p.resize(t, 0.0);
    s.o.resize(d, 0.0);
    for head in head0..head0 + heads {
        let (c0, oc) = (head * d, (head - head0) * d);
        for i in 0..t {
            let qi = &q[i * h + c0..][..d];
            for (j, p) in s.p.iter_mut().enumerate() {
                let kj = &k[j * h + c0..][..d];
                let dot: f32 = qi.iter().zip(kj).map(|(a, b)| a * b).sum();
                *p = dot * scale + mask.map_or(0.0, |m| m[j]);
            }
            let max = s.p.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0.0;
            for p in s.p.iter_mut() {
                *p = fast_exp(*p - max);
                sum += *p;
            }
            s.o.fill(0.0);
            for (j, &p) in s.p.iter().enumerate() {
                for (o, &vv) in s.o.iter_mut().zip(&v[j * h + c0..][..d]) {
                    *o += p * vv;
                }
            }
            for (dst, &o) in out[i * out_stride + oc..][..d].iter_mut().zip(s.o.iter()) {
                dst.write(o / sum);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Dims, Scratch};
    use crate::cpu_util::fast_exp;
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// f32 lanes of a zmm.
    pub const LANES: usize = 16;
    /// Query rows per register tile (times two zmm of keys or value columns: 8 accumulators,
    /// enough independent FMA chains to fill both FMA ports).
    const ROWS: usize = 4;

    /// Whether the CPU has AVX-512F (detected once; the build targets baseline x86-64).
    pub fn available() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx512f"))
    }

    /// [`super::batch_row`] with AVX-512: per head, keys transposed and scaled into `kt`
    /// (`[d][tp]`, tp = t rounded up to 32), values gathered into `vh` (`[t][d]`); scores of 4
    /// query rows x 32 keys per register tile, softmax per row, then 4 rows x 32 value columns
    /// per tile.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `d` must be a multiple of 16, and the slices as
    /// [`super::batch_row`] documents.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn batch_row(
        (q, k, v): (&[f32], &[f32], &[f32]),
        mask: Option<&[f32]>,
        Dims {
            t,
            h,
            d,
            head0,
            heads,
            out_stride,
            scale,
        }: Dims,
        s: &mut Scratch,
        out: &mut [MaybeUninit<f32>],
    ) {
        let tp = t.next_multiple_of(2 * LANES);
        s.kt.resize(d * tp, 0.0);
        s.vh.resize(t * d + LANES, 0.0);
        s.p.resize(t * tp, 0.0);
        s.o.resize(t, 0.0);
        // The mask per key, then -inf for the keys padded past `t`, so that they get no weight.
        s.key_bias.clear();
        match mask {
            Some(m) => s.key_bias.extend_from_slice(&m[..t]),
            None => s.key_bias.resize(t, 0.0),
        }
        s.key_bias.resize(tp, f32::NEG_INFINITY);
        for head in head0..head0 + heads {
            let (c0, oc) = (head * d, (head - head0) * d);
            for (e, kt) in s.kt.chunks_exact_mut(tp).enumerate() {
                for (j, kt) in kt[..t].iter_mut().enumerate() {
                    *kt = k[j * h + c0 + e] * scale;
                }
                kt[t..].fill(0.0);
            }
            for (j, vh) in s.vh.chunks_exact_mut(d).take(t).enumerate() {
                vh.copy_from_slice(&v[j * h + c0..][..d]);
            }
            for i0 in (0..t).step_by(ROWS) {
                let rows = ROWS.min(t - i0);
                let qs = q[i0 * h + c0..].as_ptr();
                let p = s.p[i0 * tp..].as_mut_ptr();
                for j0 in (0..tp).step_by(2 * LANES) {
                    let kt = s.kt[j0..].as_ptr();
                    let bias = s.key_bias[j0..].as_ptr();
                    // SAFETY: rows `i0..i0 + rows` of `q` (stride h, d wide) and of `p` (stride
                    // tp), keys `j0..j0 + 32 <= tp` of every `kt` row and of `key_bias`.
                    match rows {
                        1 => scores::<1>(qs, h, kt, tp, d, bias, p.add(j0)),
                        2 => scores::<2>(qs, h, kt, tp, d, bias, p.add(j0)),
                        3 => scores::<3>(qs, h, kt, tp, d, bias, p.add(j0)),
                        _ => scores::<ROWS>(qs, h, kt, tp, d, bias, p.add(j0)),
                    }
                }
            }
            for (p, inv) in s.p.chunks_exact_mut(tp).zip(s.o.iter_mut()) {
                let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
                for c in p.chunks_exact(LANES) {
                    vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(c.as_ptr()));
                }
                let max = _mm512_reduce_max_ps(vmax);
                for p in p.iter_mut() {
                    *p = fast_exp(*p - max);
                }
                // Padded keys got e^-87, not 0: leave them out of the sum (the values never
                // read them).
                p[t..].fill(0.0);
                let mut vsum = _mm512_setzero_ps();
                for c in p.chunks_exact(LANES) {
                    vsum = _mm512_add_ps(vsum, _mm512_loadu_ps(c.as_ptr()));
                }
                *inv = 1.0 / _mm512_reduce_add_ps(vsum);
            }
            for i0 in (0..t).step_by(ROWS) {
                let rows = ROWS.min(t - i0);
                let p = s.p[i0 * tp..].as_ptr();
                let inv = &s.o[i0..i0 + rows];
                for e0 in (0..d).step_by(2 * LANES) {
                    let two = e0 + 2 * LANES <= d;
                    let vh = s.vh[e0..].as_ptr();
                    let dst = out[i0 * out_stride + oc + e0..].as_mut_ptr() as *mut f32;
                    // SAFETY: probabilities of rows `i0..i0 + rows` (keys `0..t`), value rows
                    // `0..t` at columns `e0..e0 + 16` or `+ 32` (the second only when `two`;
                    // `vh` has 16 spare values for the unused read), and the same columns of
                    // `out`'s rows.
                    match rows {
                        1 => values::<1>(p, tp, vh, d, t, inv, two, dst, out_stride),
                        2 => values::<2>(p, tp, vh, d, t, inv, two, dst, out_stride),
                        3 => values::<3>(p, tp, vh, d, t, inv, two, dst, out_stride),
                        _ => values::<ROWS>(p, tp, vh, d, t, inv, two, dst, out_stride),
                    }
                }
            }
        }
    }

    /// `p[r][0..32] = q[r] . kt[..][0..32] + bias[0..32]` for `R` rows.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn scores<const R: usize>(
        q: *const f32,
        h: usize,
        kt: *const f32,
        tp: usize,
        d: usize,
        bias: *const f32,
        p: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for e in 0..d {
            let k0 = _mm512_loadu_ps(kt.add(e * tp));
            let k1 = _mm512_loadu_ps(kt.add(e * tp + LANES));
            for (r, acc) in acc.iter_mut().enumerate() {
                let qe = _mm512_set1_ps(*q.add(r * h + e));
                acc[0] = _mm512_fmadd_ps(qe, k0, acc[0]);
                acc[1] = _mm512_fmadd_ps(qe, k1, acc[1]);
            }
        }
        let (b0, b1) = (_mm512_loadu_ps(bias), _mm512_loadu_ps(bias.add(LANES)));
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(p.add(r * tp), _mm512_add_ps(acc[0], b0));
            _mm512_storeu_ps(p.add(r * tp + LANES), _mm512_add_ps(acc[1], b1));
        }
    }

    /// `out[r][0..16 or 32] = inv[r] * sum_j p[r][j] vh[j][0..16 or 32]` for `R` rows (`out` rows
    /// `stride` apart).
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn values<const R: usize>(
        p: *const f32,
        tp: usize,
        vh: *const f32,
        d: usize,
        t: usize,
        inv: &[f32],
        two: bool,
        out: *mut f32,
        stride: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for j in 0..t {
            let v0 = _mm512_loadu_ps(vh.add(j * d));
            let v1 = _mm512_loadu_ps(vh.add(j * d + LANES));
            for (r, acc) in acc.iter_mut().enumerate() {
                let pj = _mm512_set1_ps(*p.add(r * tp + j));
                acc[0] = _mm512_fmadd_ps(pj, v0, acc[0]);
                acc[1] = _mm512_fmadd_ps(pj, v1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let s = _mm512_set1_ps(inv[r]);
            _mm512_storeu_ps(out.add(r * stride), _mm512_mul_ps(acc[0], s));
            if two {
                _mm512_storeu_ps(out.add(r * stride + LANES), _mm512_mul_ps(acc[1], s));
            }
        }
    }
}
