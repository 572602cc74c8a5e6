//! Block-quantized weights and their products with block-quantized activations, on the CPU.
//!
//! A `[n, k]` weight is stored row after row in blocks of 32 columns, each block with an f32
//! scale: llama.cpp's q8_0 (`w = d * q`), q4_0 (`w = d * (c - 8)`) and q4_1 (`w = d * c + m`,
//! with a per-block minimum `m`) schemes, with f32 instead of f16 scales (no conversion in the
//! inner loop, for 6-20% more bytes). Activations are quantized per block to i8
//! (`d = max|x| / 127`) once per product, so the inner loop is an exact integer dot product per
//! block, scaled by `d_w * d_x`.
//!
//! Weights are stored unsigned so that `maddubs` (u8 x i8 pairs) takes them as they are: q4 codes
//! `c` are in [0, 15]; q4_0's offset comes back exactly as `-8 * sum(x_q)` per block and q4_1's
//! minimums as `sum(m * d_x * sum(x_q))` per row, the sums precomputed with the activations. Two q4 blocks share
//! 32 bytes (block `2j` in the low nibbles, `2j + 1` in the high ones), so unpacking a pair is one
//! shift and two masks; `k` must therefore be a multiple of 64. q8 codes are `q + 128` and are
//! flipped back to signed with one xor.
//!
//! Kernels: AVX-512 VNNI or AVX2 on x86-64 (detected at run time; the build targets baseline
//! x86-64), else a scalar loop with the same integer arithmetic, which is also the tests' oracle.

use std::ops::Range;

/// Columns per block.
pub(crate) const BLOCK: usize = 32;

/// `k` must be a multiple of this (a q4 pair of blocks).
pub(crate) const K_MULTIPLE: usize = 2 * BLOCK;

/// Quantized `[rows, k]` activations.
pub(crate) struct QActs {
    /// i8 codes in [-127, 127], row-major.
    pub q: Vec<i8>,
    /// One scale per block.
    pub d: Vec<f32>,
    /// `sum(q)` per block: what the q4_0 offsets multiply.
    pub sum: Vec<i32>,
    /// `d * sum(q)` per block: what the q4_1 minimums multiply.
    pub dsum: Vec<f32>,
    pub k: usize,
}

impl QActs {
    /// Quantizes `x` (`[rows, k]`, row-major, `k` a multiple of 32) per block:
    /// `d = max|x| / 127`, `q = round(x / d)`.
    pub fn new(x: &[f32], k: usize) -> Self {
        let blocks = x.len() / BLOCK;
        let mut q = vec![0i8; x.len()];
        let mut d = vec![0f32; blocks];
        let mut sum = vec![0i32; blocks];
        for (b, (xb, qb)) in x
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            d[b] = amax / 127.0;
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            for (qv, xv) in qb.iter_mut().zip(xb) {
                // Half away from zero, as `round` (a libm call on baseline x86-64), by a
                // truncating cast: |v| <= 127.
                let v = xv * id;
                *qv = (v + 0.5f32.copysign(v)) as i8;
                sum[b] += *qv as i32;
            }
        }
        let dsum = d.iter().zip(&sum).map(|(&d, &s)| d * s as f32).collect();
        Self { q, d, sum, dsum, k }
    }

    pub fn rows(&self) -> usize {
        self.q.len() / self.k.max(1)
    }
}

/// The storage of a quantized `[n, k]` weight.
#[derive(Debug)]
pub(crate) enum QMatrix {
    /// `q + 128` for `q` in [-127, 127], `k` bytes per row.
    Q8 { q: Vec<u8>, d: Vec<f32> },
    /// Codes `c` in [0, 15], pairs of blocks in 32 bytes (see the module docs): `w = d * (c - 8)`
    /// without minimums (q4_0), `w = d * c + m` with them (q4_1).
    Q4 {
        q: Vec<u8>,
        d: Vec<f32>,
        m: Option<Vec<f32>>,
    },
}

/// Packs 4-bit codes in block pairs; `codes_of(b, block, codes)` fills block `b`'s codes.
fn pack_q4(w: &[f32], mut codes_of: impl FnMut(usize, &[f32], &mut [u8; BLOCK])) -> Vec<u8> {
    let mut q = vec![0u8; w.len() / 2];
    let mut codes = [0u8; BLOCK];
    for (b, wb) in w.chunks_exact(BLOCK).enumerate() {
        codes_of(b, wb, &mut codes);
        let (pair, shift) = (b / 2, 4 * (b % 2));
        for (byte, c) in q[pair * BLOCK..(pair + 1) * BLOCK].iter_mut().zip(codes) {
            *byte |= c << shift;
        }
    }
    q
}

impl QMatrix {
    /// q8_0: `d = max|w| / 127`, `q = round(w / d)`.
    pub fn q8(w: &[f32]) -> Self {
        let a = QActs::new(w, BLOCK);
        let q = a.q.iter().map(|&v| (v as i16 + 128) as u8).collect();
        QMatrix::Q8 { q, d: a.d }
    }

    /// q4_0 as llama.cpp quantizes it: `d = v / -8` for the value `v` of largest magnitude (so
    /// that `v` is exact, code 0), code `min(15, trunc(w / d + 8.5))`.
    pub fn q4_0(w: &[f32]) -> Self {
        let mut d = vec![0f32; w.len() / BLOCK];
        let q = pack_q4(w, |b, wb, codes| {
            let v = wb
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            d[b] = v / -8.0;
            let id = if d[b] != 0.0 { 1.0 / d[b] } else { 0.0 };
            for (c, &v) in codes.iter_mut().zip(wb) {
                *c = ((v * id + 8.5) as u8).min(15);
            }
        });
        QMatrix::Q4 { q, d, m: None }
    }

    /// q4_1 as llama.cpp quantizes it: `m = min(w)`, `d = (max(w) - m) / 15`, code
    /// `min(15, trunc((w - m) / d + 0.5))`. Weights already on such a grid (a q4_1 GGUF, once
    /// dequantized) come back exactly.
    pub fn q4_1(w: &[f32]) -> Self {
        let mut d = vec![0f32; w.len() / BLOCK];
        let mut m = vec![0f32; w.len() / BLOCK];
        let q = pack_q4(w, |b, wb, codes| {
            let lo = wb.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = wb.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            (d[b], m[b]) = ((hi - lo) / 15.0, lo);
            let id = if d[b] != 0.0 { 1.0 / d[b] } else { 0.0 };
            for (c, &v) in codes.iter_mut().zip(wb) {
                *c = (((v - lo) * id + 0.5) as u8).min(15);
            }
        });
        QMatrix::Q4 { q, d, m: Some(m) }
    }

    /// Bytes read per product.
    pub fn size_in_bytes(&self) -> usize {
        let m = self.minimums().map_or(0, |m| 4 * m.len());
        match self {
            QMatrix::Q8 { q, d } | QMatrix::Q4 { q, d, .. } => q.len() + 4 * d.len() + m,
        }
    }

    /// Code `j` of block `b`, as the integer the scale multiplies.
    fn code(&self, b: usize, j: usize) -> i32 {
        match self {
            QMatrix::Q8 { q, .. } => q[b * BLOCK + j] as i32 - 128,
            QMatrix::Q4 { q, m, .. } => {
                let c = (q[(b / 2) * BLOCK + j] >> (4 * (b % 2)) & 15) as i32;
                if m.is_some() {
                    c
                } else {
                    c - 8
                }
            }
        }
    }

    fn scales(&self) -> &[f32] {
        match self {
            QMatrix::Q8 { d, .. } | QMatrix::Q4 { d, .. } => d,
        }
    }

    fn minimums(&self) -> Option<&[f32]> {
        match self {
            QMatrix::Q4 { m: Some(m), .. } => Some(m),
            _ => None,
        }
    }

    /// The represented weight, flattened `[n, k]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let (d, m) = (self.scales(), self.minimums());
        (0..d.len() * BLOCK)
            .map(|i| {
                let b = i / BLOCK;
                self.code(b, i % BLOCK) as f32 * d[b] + m.map_or(0.0, |m| m[b])
            })
            .collect()
    }

    /// `dst[r * outs.len() + i] = dot(W[outs.start + i], x[r])` for every activation row `r`.
    /// `simd: false` forces the scalar loop (tests).
    pub fn gemv(&self, x: &QActs, outs: Range<usize>, dst: &mut [f32], simd: bool) {
        let level = if simd { Simd::best() } else { Simd::Scalar };
        self.gemv_with(x, outs, dst, level);
    }

    /// [`QMatrix::gemv`] with the given instruction set (one the CPU has: see [`Simd::best`]).
    fn gemv_with(&self, x: &QActs, outs: Range<usize>, dst: &mut [f32], level: Simd) {
        let (k, rows, n) = (x.k, x.rows(), outs.len());
        assert!(k % K_MULTIPLE == 0 && dst.len() >= rows * n);
        assert!(outs.end * k / BLOCK <= self.scales().len());
        #[cfg(target_arch = "x86_64")]
        if level != Simd::Scalar {
            // SAFETY: `level` is at most what `Simd::best` detected at run time (AVX2 + FMA, and
            // AVX-512 VNNI + VL for `Vnni`); the asserts above bound every access.
            unsafe { avx2::gemv(self, x, outs, dst, level == Simd::Vnni) };
            return;
        }
        let kb = k / BLOCK;
        let (d, m) = (self.scales(), self.minimums());
        for (i, o) in outs.enumerate() {
            for r in 0..rows {
                let mut acc = 0f32;
                for b in 0..kb {
                    let (wb, xb) = (o * kb + b, r * kb + b);
                    let xq = &x.q[xb * BLOCK..][..BLOCK];
                    let s: i32 = (0..BLOCK).map(|j| self.code(wb, j) * xq[j] as i32).sum();
                    acc += s as f32 * (d[wb] * x.d[xb]);
                    if let Some(m) = m {
                        acc += m[wb] * x.dsum[xb];
                    }
                }
                dst[r * n + i] = acc;
            }
        }
    }
}

/// The instruction sets the products can use, slowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Simd {
    Scalar,
    /// AVX2 + FMA: `maddubs` + `madd` per 32 code bytes.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    /// AVX-512 VNNI on 256-bit vectors: one `vpdpbusd` does what `maddubs` + `madd` did.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Vnni,
}

impl Simd {
    /// The best set this CPU has (detected at run time: the build targets baseline x86-64).
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if avx2::vnni_available() {
                return Simd::Vnni;
            }
            if avx2::available() {
                return Simd::Avx2;
            }
        }
        Simd::Scalar
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{QActs, QMatrix, BLOCK};
    use std::arch::x86_64::*;
    use std::ops::Range;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    pub fn vnni_available() -> bool {
        available()
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// `acc + s * float(lanes)`, `lanes` being a block's 8 partial integer sums.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scaled(acc: __m256, lanes: __m256i, s: f32) -> __m256 {
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_set1_ps(s), acc)
    }

    /// Unsigned codes (< 128 after the caller's fix-up) times i8 activations, as 8 i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot_u8_i8(w: __m256i, x: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
    }

    /// One q8 row against one activation row: `w`, `x` hold `kb` blocks, `wd`, `xd` `kb` scales.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row_q8(w: *const u8, wd: *const f32, x: *const i8, xd: *const f32, kb: usize) -> f32 {
        let flip = _mm256_set1_epi8(-128);
        let mut acc = [_mm256_setzero_ps(); 2];
        for b in 0..kb {
            // SAFETY (all loads): the caller passes pointers to `kb` whole blocks and scales.
            let wv = _mm256_xor_si256(_mm256_loadu_si256(w.add(b * BLOCK) as *const __m256i), flip);
            let xv = _mm256_loadu_si256(x.add(b * BLOCK) as *const __m256i);
            // maddubs wants an unsigned operand: |w| and x * sign(w); |w|, |x| <= 127 keeps the
            // pair sums within i16.
            let lanes = dot_u8_i8(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
            acc[b & 1] = scaled(acc[b & 1], lanes, *wd.add(b) * *xd.add(b));
        }
        hsum(_mm256_add_ps(acc[0], acc[1]))
    }

    /// [`row_q8`] with `vpdpbusd`: the stored codes `q + 128` are already unsigned, and the
    /// `128 * sum(x)` they add per block comes off in lane 0.
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    unsafe fn row_q8_vnni(
        w: *const u8,
        wd: *const f32,
        x: *const i8,
        (xd, sum): (*const f32, *const i32),
        kb: usize,
    ) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 2];
        for b in 0..kb {
            // SAFETY (all loads): the caller passes pointers to `kb` whole blocks, scales, sums.
            let wv = _mm256_loadu_si256(w.add(b * BLOCK) as *const __m256i);
            let xv = _mm256_loadu_si256(x.add(b * BLOCK) as *const __m256i);
            let fix = _mm256_setr_epi32(-128 * *sum.add(b), 0, 0, 0, 0, 0, 0, 0);
            let lanes = _mm256_dpbusd_epi32(fix, wv, xv);
            acc[b & 1] = scaled(acc[b & 1], lanes, *wd.add(b) * *xd.add(b));
        }
        hsum(_mm256_add_ps(acc[0], acc[1]))
    }

    /// Defines a q4 row kernel: one q4 row against one activation row (`kb` even). `$lanes`
    /// turns a block's seed (the q4_0 offset `off * sum[b]` in lane 0, or zeros), codes and
    /// activations into 8 i32 lanes; the two instruction sets differ only there.
    macro_rules! row_q4_kernel {
        ($name:ident, $features:literal, |$seed:ident, $w:ident, $x:ident| $lanes:expr) => {
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn $name(
                w: *const u8,
                wd: *const f32,
                x: *const i8,
                xd: *const f32,
                (sum, off): (*const i32, i32),
                kb: usize,
            ) -> f32 {
                let low = _mm256_set1_epi8(15);
                let mut acc = [_mm256_setzero_ps(); 2];
                for p in 0..kb / 2 {
                    let b = 2 * p;
                    // SAFETY (all loads): the caller passes pointers to `kb` whole blocks and
                    // scales.
                    let packed = _mm256_loadu_si256(w.add(p * BLOCK) as *const __m256i);
                    let w0 = _mm256_and_si256(packed, low);
                    let w1 = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                    let x0 = _mm256_loadu_si256(x.add(b * BLOCK) as *const __m256i);
                    let x1 = _mm256_loadu_si256(x.add((b + 1) * BLOCK) as *const __m256i);
                    // codes <= 15 times |x| <= 127: pair sums far inside i16.
                    let (s0, s1) = if off == 0 {
                        (_mm256_setzero_si256(), _mm256_setzero_si256())
                    } else {
                        (
                            _mm256_setr_epi32(off * *sum.add(b), 0, 0, 0, 0, 0, 0, 0),
                            _mm256_setr_epi32(off * *sum.add(b + 1), 0, 0, 0, 0, 0, 0, 0),
                        )
                    };
                    let l0 = {
                        let ($seed, $w, $x) = (s0, w0, x0);
                        $lanes
                    };
                    let l1 = {
                        let ($seed, $w, $x) = (s1, w1, x1);
                        $lanes
                    };
                    acc[0] = scaled(acc[0], l0, *wd.add(b) * *xd.add(b));
                    acc[1] = scaled(acc[1], l1, *wd.add(b + 1) * *xd.add(b + 1));
                }
                hsum(_mm256_add_ps(acc[0], acc[1]))
            }
        };
    }

    row_q4_kernel!(row_q4, "avx2,fma", |seed, w, x| _mm256_add_epi32(
        dot_u8_i8(w, x),
        seed
    ));
    // `vpdpbusd` does `maddubs` + `madd` + the seed add in one instruction.
    row_q4_kernel!(row_q4_vnni, "avx2,fma,avx512vnni,avx512vl", |seed, w, x| {
        _mm256_dpbusd_epi32(seed, w, x)
    });

    /// `sum(a * b)`, 8 lanes at a time: q4_1's minimums against `d_x * sum(x_q)`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: `i + 8 <= n` keeps both 8-float loads inside the slices.
            let (va, vb) = (
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
            );
            acc = _mm256_fmadd_ps(va, vb, acc);
            i += 8;
        }
        let mut y = hsum(acc);
        for j in i..n {
            y += a[j] * b[j];
        }
        y
    }

    /// How many weight rows ahead to prefetch: a decode step streams every weight once, and the
    /// loads stalled on memory more than the arithmetic did.
    const PREFETCH_ROWS: usize = 6;

    /// Asks for row `o`'s codes and scales to be brought into cache.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn prefetch_row(m: &QMatrix, o: usize, k: usize) {
        let kb = k / BLOCK;
        let (q, d, mins) = match m {
            QMatrix::Q8 { q, d } => (&q[o * k..(o + 1) * k], d, None),
            QMatrix::Q4 { q, d, m } => (&q[o * k / 2..(o + 1) * k / 2], d, m.as_ref()),
        };
        for line in q.chunks(64) {
            // SAFETY: a prefetch is only a hint and reads nothing; the pointer is in bounds.
            _mm_prefetch::<_MM_HINT_T0>(line.as_ptr() as *const i8);
        }
        for s in std::iter::once(d).chain(mins) {
            for line in s[o * kb..(o + 1) * kb].chunks(16) {
                _mm_prefetch::<_MM_HINT_T0>(line.as_ptr() as *const i8);
            }
        }
    }

    /// See [`QMatrix::gemv`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA (and AVX-512 VNNI + VL when `vnni`); `k` must be a
    /// multiple of 64, `dst` hold `rows * outs.len()` values and the matrix at least `outs.end`
    /// rows (asserted by the caller).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemv(m: &QMatrix, x: &QActs, outs: Range<usize>, dst: &mut [f32], vnni: bool) {
        let (k, rows, n) = (x.k, x.rows(), outs.len());
        let kb = k / BLOCK;
        let end = outs.end;
        for (i, o) in outs.enumerate() {
            prefetch_row(m, (o + PREFETCH_ROWS).min(end - 1), k);
            for r in 0..rows {
                let (xq, xd) = (x.q.as_ptr().add(r * k), x.d.as_ptr().add(r * kb));
                dst[r * n + i] = match m {
                    QMatrix::Q8 { q, d } => {
                        let (wq, wd) = (q.as_ptr().add(o * k), d.as_ptr().add(o * kb));
                        if vnni {
                            let sum = x.sum.as_ptr().add(r * kb);
                            row_q8_vnni(wq, wd, xq, (xd, sum), kb)
                        } else {
                            row_q8(wq, wd, xq, xd, kb)
                        }
                    }
                    QMatrix::Q4 { q, d, m } => {
                        let sum = x.sum.as_ptr().add(r * kb);
                        let off = if m.is_some() { 0 } else { -8 };
                        let (wq, wd) = (q.as_ptr().add(o * k / 2), d.as_ptr().add(o * kb));
                        let mut y = if vnni {
                            row_q4_vnni(wq, wd, xq, xd, (sum, off), kb)
                        } else {
                            row_q4(wq, wd, xq, xd, (sum, off), kb)
                        };
                        if let Some(m) = m {
                            y += dot_f32(&m[o * kb..(o + 1) * kb], &x.dsum[r * kb..][..kb]);
                        }
                        y
                    }
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn simd_gemv_matches_scalar_gemv() {
        let (n, k, rows) = (37, 192, 3);
        let w = data(n * k, 1);
        let x = QActs::new(&data(rows * k, 2), k);
        for m in [QMatrix::q8(&w), QMatrix::q4_0(&w), QMatrix::q4_1(&w)] {
            let mut a = vec![0f32; rows * 30];
            m.gemv(&x, 5..35, &mut a, false);
            // Every instruction set this CPU has, not only the best one.
            for level in [Simd::Avx2, Simd::Vnni] {
                if level > Simd::best() {
                    continue;
                }
                let mut b = vec![0f32; rows * 30];
                m.gemv_with(&x, 5..35, &mut b, level);
                for (u, v) in a.iter().zip(&b) {
                    assert!(
                        (u - v).abs() <= 1e-5 * (1.0 + u.abs()),
                        "{level:?}: {u} vs {v}"
                    );
                }
            }
        }
    }

    #[test]
    fn scalar_gemv_equals_dequantized_product() {
        let (n, k) = (5, 128);
        let w = data(n * k, 4);
        let xs = data(k, 5);
        let x = QActs::new(&xs, k);
        let xd = QMatrix::q8(&xs).dequantize();
        for m in [QMatrix::q8(&w), QMatrix::q4_0(&w), QMatrix::q4_1(&w)] {
            let wd = m.dequantize();
            let mut y = vec![0f32; n];
            m.gemv(&x, 0..n, &mut y, false);
            for (o, yo) in y.iter().enumerate() {
                let r: f32 = (0..k).map(|j| wd[o * k + j] * xd[j]).sum();
                assert!((r - yo).abs() <= 1e-4 * (1.0 + r.abs()), "{r} vs {yo}");
            }
        }
    }

    #[test]
    fn q4_round_trips_are_exact_on_their_own_grids() {
        let w = data(4 * BLOCK, 3);
        type Quantizer = fn(&[f32]) -> QMatrix;
        let formats: [(Quantizer, f32); 2] =
            [(QMatrix::q4_0, 1.0 / 8.0), (QMatrix::q4_1, 1.0 / 15.0)];
        for (quantize, bound) in formats {
            let once = quantize(&w).dequantize();
            let twice = quantize(&once).dequantize();
            let drift = once
                .iter()
                .zip(&twice)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(drift <= 1e-6, "requantizing moved a value by {drift}");
            let err = w
                .iter()
                .zip(&once)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err <= bound + 1e-6, "max error {err}");
        }
    }
}
