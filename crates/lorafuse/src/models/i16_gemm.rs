//! int16 copies of frozen weights, multiplied with int16 activations by AVX512-VNNI `vpdpwssd`
//! into exact int32 sums.
//!
//! Why: an encoder pass (sentence embeddings) is bound by multiply-adds, and on the Xeons this
//! project runs on `vpdpwssd` does 32 multiply-adds a zmm at the f32 FMA's issue rate: twice the
//! f32 throughput (measured: 188 GMAC/s a core), where `vdpbf16ps` runs at half of it
//! ([`super::bf16_gemm`]). int8 (`vpdpbusd`, 4x) would be faster still but costs too much
//! accuracy: q8_0's per-block activations leave embeddings at cosine 0.998 to the f32 ones.
//!
//! The numerics: each weight row (output) gets its own scale, `W ~ sw[o] * Wq` with `|Wq| <=
//! wmax`; each activation row its own, `x ~ sx[r] * xq`, chosen when the product runs. The
//! integer dot products are exact, so the only errors are the two roundings to integers, and
//! every kernel (SIMD or scalar) gives the same bits.
//!
//! Why the sums cannot overflow: `vpdpwssd` wraps. For every row, `sx` is chosen so that
//! `sum_c |xq[c]| * cmax[c] < 2^31`, where `cmax[c]` is the largest `|Wq[o][c]|` over the outputs;
//! that bounds every partial sum of every output lane. It also sets the balance of the two
//! roundings: a larger `wmax` gives finer weights but forces coarser activations. `wmax ~
//! sqrt(2^33 / k)` (4730 for k = 384, 2365 for k = 1536) puts both relative errors near 2e-4 for
//! Gaussian-like rows, about five times below bf16 rounding.

use super::simd;
use super::tiled_gemm::{for_each_tile, PackedWeight, LANES, TILE_COLS, TILE_PANELS};
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::OnceLock;

/// Activation rows per register tile: 12 x 2 zmm accumulators, two weight vectors and a broadcast.
const TILE_ROWS: usize = 12;
/// The bound every int32 partial sum stays under (below 2^31 - 1, leaving room for the f64
/// arithmetic that chooses the scales).
const ACC_LIMIT: f64 = 2_147_483_647.0 * 0.999;
/// The largest activation magnitude after quantization.
const ACT_MAX: f64 = 32767.0;

/// The weight magnitude bound for `k` inputs (see the module docs).
fn weight_max(k: usize) -> f32 {
    ((8_589_934_592.0 / k.max(1) as f64).sqrt())
        .clamp(127.0, 32767.0)
        .floor() as f32
}

/// A `[n, k]` weight in int16 with one f32 scale per output, packed for the tile kernel as the
/// bf16 one is: panels of 16 outputs, each `[k2][16][2]` (k2 = ceil(k / 2)), so that one 512-bit
/// load gives 16 outputs a pair of inputs. Odd `k` and `n` short of a whole tile are zero-padded.
#[derive(Debug)]
pub(crate) struct I16Matrix {
    w: Vec<i16>,
    /// `sw[o]`, zero for padded outputs.
    scale: Vec<f32>,
    /// `cmax[c]`: the largest `|Wq[o][c]|` over the outputs (`2 * k2` entries; exact in f32).
    col_max: Vec<f32>,
    /// Their sum.
    col_max_sum: f64,
    n: usize,
    k: usize,
    k2: usize,
}

impl I16Matrix {
    /// Quantizes and packs `w` (`[n, k]`, row-major). A row holding an infinity quantizes to
    /// zeros with an infinite scale, so its outputs come out NaN, as the dense product's would.
    pub fn new(w: &[f32], n: usize, k: usize) -> Self {
        let k2 = k.div_ceil(2);
        let wmax = weight_max(k);
        let panels = n.div_ceil(TILE_COLS) * TILE_PANELS;
        let mut packed = vec![0i16; panels * k2 * LANES * 2];
        let mut scale = vec![0f32; panels * LANES];
        let mut col_max = vec![0f32; 2 * k2];
        for (o, row) in w.chunks_exact(k.max(1)).take(n).enumerate() {
            let m = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            scale[o] = if row.iter().any(|v| v.is_nan()) {
                f32::NAN
            } else {
                m / wmax
            };
            let inv = if m > 0.0 && m.is_finite() {
                wmax / m
            } else {
                0.0
            };
            let (p, lane) = (o / LANES, o % LANES);
            let panel = &mut packed[p * k2 * LANES * 2..][..k2 * LANES * 2];
            for (c, &v) in row.iter().enumerate() {
                // `as` saturates (and maps NaN to 0); the clamp only guards the rounding.
                let q = (v * inv).round().clamp(-wmax, wmax) as i16;
                panel[(c / 2 * LANES + lane) * 2 + c % 2] = q;
                col_max[c] = col_max[c].max(f32::from(q.unsigned_abs()));
            }
        }
        let col_max_sum = col_max.iter().map(|&c| f64::from(c)).sum();
        Self {
            w: packed,
            scale,
            col_max,
            col_max_sum,
            n,
            k,
            k2,
        }
    }

    /// Bytes of the packed weight and its scales.
    pub fn size_in_bytes(&self) -> usize {
        2 * self.w.len() + 4 * self.scale.len()
    }

    /// Quantized weight `[o][c]`.
    fn q(&self, o: usize, c: usize) -> i16 {
        let (p, lane) = (o / LANES, o % LANES);
        self.w[((p * self.k2 + c / 2) * LANES + lane) * 2 + c % 2]
    }

    /// The represented weight, `[n, k]` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.n * self.k)
            .map(|i| {
                let (o, c) = (i / self.k, i % self.k);
                f32::from(self.q(o, c)) * self.scale[o]
            })
            .collect()
    }

    /// Quantizes activation rows `x` (`[rows, k]`) for products with this weight.
    pub fn quantize_acts(&self, x: &[f32]) -> I16Acts {
        let k = self.k.max(1);
        let rows = x.len() / k;
        let width = 2 * self.k2;
        let mut values = vec![0i16; rows * width];
        let mut scale = vec![0f32; rows];
        // Room left for the rounding of each |xq| (up to half a step per input).
        let room = (ACC_LIMIT - 0.5 * self.col_max_sum) as f32;
        // The f32 sum of the bound is within k * 2^-24 of the exact one (relative): cover it.
        let slack = 1.0 + k as f32 * f32::EPSILON;
        for ((xr, qr), s) in x
            .chunks_exact(k)
            .zip(values.chunks_exact_mut(width.max(1)))
            .zip(scale.iter_mut())
        {
            *s = quantize_row(xr, &self.col_max, room, slack, qr);
        }
        I16Acts {
            values,
            scale,
            rows,
            k2: self.k2,
        }
    }
}

simd::wide_fn!(
    /// The epilogue of one tile: `d[r][dc + i] = tile[r][tc + i] * sx[r] * sw[i] + bias[i]` for
    /// `i < n` (`d` rows are `width` apart).
    #[allow(clippy::too_many_arguments)]
    fn scale_tile(
        tile: &[[i32; TILE_COLS]],
        sx: &[f32],
        sw: &[f32],
        bias: Option<&[f32]>,
        width: usize,
        cols: (usize, usize, usize),
        d: &mut [MaybeUninit<f32>],
    ) => scale_tile_body
);

#[inline(always)]
fn scale_tile_body(
    tile: &[[i32; TILE_COLS]],
    sx: &[f32],
    sw: &[f32],
    bias: Option<&[f32]>,
    width: usize,
    (dc, tc, n): (usize, usize, usize),
    d: &mut [MaybeUninit<f32>],
) {
    for ((tr, &sx), d) in tile.iter().zip(sx).zip(d.chunks_mut(width)) {
        let d = &mut d[dc..dc + n];
        let acc = &tr[tc..tc + n];
        match bias {
            Some(b) => {
                for (((d, &a), &sw), &b) in d.iter_mut().zip(acc).zip(sw).zip(b) {
                    d.write(a as f32 * (sx * sw) + b);
                }
            }
            None => {
                for ((d, &a), &sw) in d.iter_mut().zip(acc).zip(sw) {
                    d.write(a as f32 * (sx * sw));
                }
            }
        }
    }
}

impl PackedWeight for I16Matrix {
    type Acts = I16Acts;
    const TILE_ROWS: usize = TILE_ROWS;
    const TILE_COLS: usize = TILE_COLS;
    const LABEL: &'static str = "int16 linear";

    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn prepare(&self, x: &[f32]) -> I16Acts {
        self.quantize_acts(x)
    }

    /// Exact integer tiles, scaled (and biased) into `dst`.
    fn gemm_rows(
        &self,
        x: &I16Acts,
        rows: Range<usize>,
        outs: Range<usize>,
        bias: Option<&[f32]>,
        dst: &mut [MaybeUninit<f32>],
    ) {
        let width = outs.len();
        assert!(x.k2 == self.k2 && rows.end <= x.rows && outs.end <= self.n);
        assert!(dst.len() >= rows.len() * width);
        let panel = self.k2 * LANES * 2;
        let mut tile = [[0i32; TILE_COLS]; TILE_ROWS];
        for_each_tile::<Self>(rows.clone(), outs.clone(), |r0, rr, t, cols| {
            let xs = &x.values[r0 * 2 * self.k2..(r0 + rr) * 2 * self.k2];
            let w = &self.w[t * TILE_PANELS * panel..(t + 1) * TILE_PANELS * panel];
            int_tile(w, xs, rr, self.k2, &mut tile);
            let rows_out = (r0 - rows.start) * width..(r0 - rows.start + rr) * width;
            let place = (
                cols.start - outs.start,
                cols.start - t * TILE_COLS,
                cols.len(),
            );
            let (sx, sw) = (&x.scale[r0..r0 + rr], &self.scale[cols.clone()]);
            let bias = bias.map(|b| &b[cols]);
            scale_tile(&tile[..rr], sx, sw, bias, width, place, &mut dst[rows_out]);
        });
    }
}

/// `[rows, k]` activations quantized for one product: `[rows][2 * k2]` values (zero-padded), read
/// by the kernel as pairs, and a scale per row.
#[derive(Debug)]
pub(crate) struct I16Acts {
    values: Vec<i16>,
    scale: Vec<f32>,
    rows: usize,
    k2: usize,
}

/// Quantizes one activation row into `q` (`2 * k2` values, zero-filled) and returns its scale:
/// the smallest that keeps `|xq| <= ACT_MAX` and `sum_c |xq[c]| * cmax[c] <= ACC_LIMIT` (module
/// docs). `room` is the bound less the rounding's worst case, `slack` covers the f32 sum. NaN or
/// infinite inputs give a NaN scale (and zeros), so the outputs are NaN as the dense product's.
fn quantize_row(x: &[f32], cmax: &[f32], room: f32, slack: f32, q: &mut [i16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: `simd()` checked AVX-512F/BW/VL; the kernel reads `x.len()` values of `x` and
        // `cmax` (which holds `2 * k2 >= x.len()`) and writes `x.len() <= q.len()` of `q`.
        return unsafe { avx512::quantize_row(x, cmax, room, slack, q) };
    }
    let (mut m, mut bound) = (0f32, 0f32);
    for (&v, &c) in x.iter().zip(cmax) {
        m = m.max(v.abs());
        bound += v.abs() * c;
    }
    let Some(inv) = row_inverse_scale(m, bound, room, slack) else {
        return if bound.is_finite() { 0.0 } else { f32::NAN };
    };
    for (d, &v) in q.iter_mut().zip(x) {
        *d = (v * inv).round_ties_even() as i16;
    }
    1.0 / inv
}

/// `1 / sx` for a row with largest magnitude `m` and bound sum `bound`, or `None` for a row of
/// zeros or with a non-finite value.
fn row_inverse_scale(m: f32, bound: f32, room: f32, slack: f32) -> Option<f32> {
    if !bound.is_finite() || !m.is_finite() {
        return None;
    }
    let sx = (m / ACT_MAX as f32).max(bound * slack / room);
    // The scale as stored is `1 / inv`; both roundings of the reciprocal stay inside the
    // 0.1% margin of ACC_LIMIT.
    (sx > 0.0).then(|| 1.0 / sx)
}

/// Whether this CPU runs the AVX-512 kernels (VNNI products, BW/VL quantization; detected once,
/// since the build targets baseline x86-64). `LORAFUSE_I16_KERNEL=scalar` forces the portable
/// loops, for A/B timing.
fn simd() -> bool {
    static SIMD: OnceLock<bool> = OnceLock::new();
    *SIMD.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::env::var("LORAFUSE_I16_KERNEL").map_or(true, |v| v.trim() != "scalar")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Rows `0..rr` of `x` (`[rr][2 * k2]`) times the two panels `w`, into `tile`.
fn int_tile(w: &[i16], x: &[i16], rr: usize, k2: usize, tile: &mut [[i32; TILE_COLS]; TILE_ROWS]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: `simd()` checked AVX-512F and AVX512-VNNI (among others); `w` holds two panels of `k2` pairs
        // and `x` `rr <= TILE_ROWS` rows of `2 * k2` values (sliced so by the caller), which is all
        // the kernel reads.
        unsafe { avx512::tile(w, x, rr, k2, tile) };
        return;
    }
    scalar_tile(w, x, rr, k2, tile);
}

/// The portable kernel (and the tests' oracle): exact sums in i64, which the bound on the scales
/// keeps inside i32.
fn scalar_tile(
    w: &[i16],
    x: &[i16],
    rr: usize,
    k2: usize,
    tile: &mut [[i32; TILE_COLS]; TILE_ROWS],
) {
    let panel = k2 * LANES * 2;
    for (r, tr) in tile.iter_mut().enumerate().take(rr) {
        for (c, out) in tr.iter_mut().enumerate() {
            let wp = &w[(c / LANES) * panel + (c % LANES) * 2..];
            let mut acc = 0i64;
            for j in 0..k2 {
                let (x0, x1) = (
                    i64::from(x[2 * (r * k2 + j)]),
                    i64::from(x[2 * (r * k2 + j) + 1]),
                );
                acc += i64::from(wp[j * LANES * 2]) * x0 + i64::from(wp[j * LANES * 2 + 1]) * x1;
            }
            *out = acc as i32;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::tiled_gemm::by_rows;
    use super::{row_inverse_scale, LANES, TILE_COLS, TILE_PANELS, TILE_ROWS};
    use std::arch::x86_64::*;

    /// [`super::quantize_row`] with AVX-512.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, BW and VL; `cmax` and `q` must hold at least `x.len()` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn quantize_row(
        x: &[f32],
        cmax: &[f32],
        room: f32,
        slack: f32,
        q: &mut [i16],
    ) -> f32 {
        debug_assert!(cmax.len() >= x.len() && q.len() >= x.len());
        let n = x.len();
        let mask = |i: usize| -> __mmask16 {
            let left = n - i;
            if left >= 16 {
                0xffff
            } else {
                (1u16 << left) - 1
            }
        };
        let (mut vmax, mut vsum) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for i in (0..n).step_by(16) {
            let mk = mask(i);
            // SAFETY: masked loads read only lanes `i..n`, inside `x` and `cmax`.
            let v = _mm512_abs_ps(_mm512_maskz_loadu_ps(mk, x.as_ptr().add(i)));
            let c = _mm512_maskz_loadu_ps(mk, cmax.as_ptr().add(i));
            vmax = _mm512_max_ps(vmax, v);
            vsum = _mm512_fmadd_ps(v, c, vsum);
        }
        let bound = _mm512_reduce_add_ps(vsum);
        let Some(inv) = row_inverse_scale(_mm512_reduce_max_ps(vmax), bound, room, slack) else {
            return if bound.is_finite() { 0.0 } else { f32::NAN };
        };
        let vinv = _mm512_set1_ps(inv);
        for i in (0..n).step_by(16) {
            let mk = mask(i);
            // SAFETY: as above; the store writes lanes `i..n` of `q`.
            let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x.as_ptr().add(i)), vinv);
            // Rounds to nearest even (the default MXCSR mode), then narrows with saturation.
            let h = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(v));
            _mm256_mask_storeu_epi16(q.as_mut_ptr().add(i), mk, h);
        }
        1.0 / inv
    }

    /// `rr` rows of `x` times two packed panels `w`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX512-VNNI; `w` must hold two panels of `k2` pairs and
    /// `x` `rr` rows (1..=12) of `2 * k2` values.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn tile(
        w: &[i16],
        x: &[i16],
        rr: usize,
        k2: usize,
        tile: &mut [[i32; TILE_COLS]; TILE_ROWS],
    ) {
        debug_assert!(w.len() >= TILE_PANELS * k2 * LANES * 2 && x.len() >= rr * 2 * k2);
        // Pairs of values are read as one 32-bit lane (input `2j` in the low half).
        let (w, x) = (w.as_ptr(), x.as_ptr() as *const i32);
        by_rows!(
            rows,
            rr,
            (w, x, k2, tile),
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
            12
        )
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn rows<const R: usize>(
        w: *const i16,
        x: *const i32,
        k2: usize,
        tile: &mut [[i32; TILE_COLS]; TILE_ROWS],
    ) {
        let panel = k2 * LANES * 2;
        let mut acc = [[_mm512_setzero_si512(); TILE_PANELS]; R];
        for j in 0..k2 {
            // SAFETY: pair `j < k2` of panels 0 and 1: inside the two panels the caller passes.
            let w0 = _mm512_loadu_si512(w.add(j * LANES * 2) as *const _);
            let w1 = _mm512_loadu_si512(w.add(panel + j * LANES * 2) as *const _);
            for (r, acc_r) in acc.iter_mut().enumerate() {
                // SAFETY: row `r < R <= rr`, pair `j < k2`: inside `x`.
                let xb = _mm512_set1_epi32(x.add(r * k2 + j).read_unaligned());
                acc_r[0] = _mm512_dpwssd_epi32(acc_r[0], xb, w0);
                acc_r[1] = _mm512_dpwssd_epi32(acc_r[1], xb, w1);
            }
        }
        for (acc_r, tr) in acc.iter().zip(tile.iter_mut()) {
            for (p, a) in acc_r.iter().enumerate() {
                // SAFETY: 16 int32 at column `16p` of a 32-lane row.
                _mm512_storeu_si512(tr.as_mut_ptr().add(p * LANES) as *mut _, *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tiled_gemm::test_support::{check_driver, data};
    use super::*;

    /// `gemm_rows` for all `rows` and outputs `outs`, no bias.
    fn run(m: &I16Matrix, acts: &I16Acts, rows: usize, outs: Range<usize>) -> Vec<f32> {
        let mut got = vec![MaybeUninit::new(f32::NAN); rows * outs.len()];
        m.gemm_rows(acts, 0..rows, outs, None, &mut got);
        // SAFETY: every slot was initialised (to NaN) before the kernel overwrote it.
        got.into_iter()
            .map(|v| unsafe { v.assume_init() })
            .collect()
    }

    /// The exact product of the quantized operands, scaled, in f64.
    fn oracle(m: &I16Matrix, x: &I16Acts, r: usize, o: usize) -> f64 {
        let mut acc = 0i64;
        for c in 0..m.k {
            acc += i64::from(m.q(o, c)) * i64::from(x.values[r * 2 * m.k2 + c]);
        }
        acc as f64 * f64::from(x.scale[r]) * f64::from(m.scale[o])
    }

    /// The kernel this CPU runs (VNNI where it has it) against the exact integer product, on
    /// shapes with row, column and input tails and on output ranges inside a tile; and the
    /// result against the f32 product of the unquantized operands.
    #[test]
    fn kernel_is_exact_and_close_to_the_f32_product() {
        let n = 70;
        for (rows, k) in [(1, 384), (13, 97), (37, 1536), (300, 384), (5, 1536)] {
            let w = data(n * k, rows as u64);
            // Activations with an outlier column, as BERT's hidden states have.
            let mut x = data(rows * k, 1000 + k as u64);
            for r in 0..rows {
                x[r * k + 3] *= 40.0;
            }
            let m = I16Matrix::new(&w, n, k);
            let acts = m.quantize_acts(&x);
            for outs in [0..n, 5..37, 64..70] {
                let width = outs.len();
                let got = run(&m, &acts, rows, outs.clone());
                for r in 0..rows {
                    for (i, o) in outs.clone().enumerate() {
                        let g = f64::from(got[r * width + i]);
                        let e = oracle(&m, &acts, r, o);
                        // Only the int32 -> f32 conversion and two f32 products differ.
                        assert!(
                            (g - e).abs() <= 4e-7 * e.abs() + 1e-30,
                            "rows {rows} k {k} out {o} row {r}: {g} vs {e}"
                        );
                        let dense: f64 = (0..k)
                            .map(|c| f64::from(w[o * k + c]) * f64::from(x[r * k + c]))
                            .sum();
                        let norm = |v: &[f32]| v.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>();
                        let scale =
                            (norm(&w[o * k..(o + 1) * k]) * norm(&x[r * k..(r + 1) * k])).sqrt();
                        // Both roundings are ~2e-4 of their rows (module docs): allow 2e-3 of
                        // the Cauchy-Schwarz bound.
                        assert!(
                            (g - dense).abs() <= 2e-3 * scale,
                            "rows {rows} k {k} out {o} row {r}: {g} vs dense {dense}"
                        );
                    }
                }
            }
        }
    }

    /// The scales keep every sum inside int32 even when every input sits at its bound and every
    /// weight column has a maximal entry of the same sign: the worst case for the bound.
    #[test]
    fn worst_case_sums_do_not_overflow() {
        for k in [64, 384, 1536, 4095] {
            let n = 32;
            let w = vec![1.0f32; n * k];
            let x = vec![-3.0f32; 2 * k];
            let m = I16Matrix::new(&w, n, k);
            let acts = m.quantize_acts(&x);
            let got = run(&m, &acts, 2, 0..n);
            let want = -3.0 * k as f32;
            for g in got {
                // A wrapped sum would be off by 2^32 steps; rounding costs at most half a step.
                assert!(
                    (g - want).abs() <= 5e-3 * want.abs(),
                    "k {k}: {g} vs {want}"
                );
            }
        }
    }

    #[test]
    fn non_finite_inputs_give_nan_and_zero_rows_give_zero() {
        let (n, k) = (20, 33);
        let w = data(n * k, 5);
        let m = I16Matrix::new(&w, n, k);
        let mut x = vec![0f32; 3 * k];
        x[k + 4] = f32::NAN;
        x[2 * k + 7] = f32::INFINITY;
        let acts = m.quantize_acts(&x);
        let got = run(&m, &acts, 3, 0..n);
        assert!(got[..n].iter().all(|&v| v == 0.0));
        assert!(got[n..].iter().all(|v| v.is_nan()));
    }

    /// The threaded driver with this kernel (see `tiled_gemm::test_support`).
    #[test]
    fn matmul_adds_the_bias_and_rows_do_not_interact() {
        let (n, k) = (200, 97);
        check_driver(I16Matrix::new(&data(n * k, 21), n, k), |m, x| {
            let acts = m.quantize_acts(x);
            (0..acts.rows * n)
                .map(|i| oracle(m, &acts, i / n, i % n))
                .collect()
        });
    }

    #[test]
    fn dequantize_is_within_half_a_step() {
        let (n, k) = (37, 97);
        let w = data(n * k, 3);
        let m = I16Matrix::new(&w, n, k);
        for (i, (a, b)) in w.iter().zip(m.dequantize()).enumerate() {
            let step = m.scale[i / k];
            // Half a step, plus the f32 roundings of the scale and its inverse.
            let tol = 0.5 * step + 4.0 * f32::EPSILON * a.abs();
            assert!((a - b).abs() <= tol, "[{i}] {a} vs {b}");
        }
    }
}
