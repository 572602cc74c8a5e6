//! bf16 copies of frozen weights, multiplied with f32 accumulation by a register-tiled GEMM.
//!
//! Why this exists beside the block formats of [`super::qgemv`]: those are built for batch-1
//! decoding, where bytes of weight per token are the cost, and their per-row dot products reuse
//! nothing across activation rows. An encoder pass (sentence embeddings) multiplies thousands of
//! rows by the same weights, so it is bound by multiply-add throughput instead; what pays there is
//! a GEMM that keeps an 8 x 32 output tile in registers and streams a pre-packed weight panel, and
//! a format whose rounding stays far below what the embeddings can show (bf16, unlike int8
//! activations, keeps cosine to f32 within 1e-4).
//!
//! Why the activations are rounded to bf16 too: then every product is exact in f32 (8-bit times
//! 8-bit significands), and all three kernels here perform the very same f32 roundings in the
//! same order (per pair of inputs, the odd one first, as `vdpbf16ps` does). So the kernel can be
//! picked for speed alone, and the scalar loop is an exact oracle for the SIMD ones up to
//! denormals (which `vdpbf16ps` flushes).
//!
//! Why two SIMD kernels: `vdpbf16ps` is not fast everywhere. On Sapphire/Emerald Rapids it issues
//! at half a zmm per cycle, a quarter of the FMA rate (measured on this project's Xeon: 43 vs 86
//! GMAC/s per core), so there the bf16 weights are widened to f32 in registers (one shift or mask
//! per 16 weights) and fed to ordinary FMAs, which also serves AVX-512 CPUs without BF16. On a CPU
//! where `vdpbf16ps` issues as fast as an FMA it does twice the work and wins. Which one runs is
//! timed once, at first use (`LORAFUSE_BF16_KERNEL=dpbf16|fma|scalar` overrides, for A/B timing).
//! With the FMA kernel, big batches cost the same multiply-adds as f32, so the gain there is only
//! the tiling; few rows (a single document) gain most, from the tiles and the halved weight bytes.

use super::tiled_gemm::{bias_tile, for_each_tile, PackedWeight, LANES, TILE_COLS, TILE_PANELS};
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::OnceLock;

/// Activation rows per register tile: 8 x 2 zmm accumulators, plus the widened weights.
const TILE_ROWS: usize = 8;

/// `v` rounded to the nearest bf16 (ties to even), as its 16 bits; NaN stays a (quiet) NaN.
#[inline]
pub(crate) fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let nan = ((b >> 16) | 0x40) as u16;
    // Wraps only for NaN patterns, which take `nan`; no branch, so that loops vectorise.
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if b & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }
}

/// The f32 a bf16 pattern stands for (exact).
#[inline]
pub(crate) fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `v` rounded to bf16, as an f32.
#[inline]
pub(crate) fn round_bf16(v: f32) -> f32 {
    bf16_to_f32(bf16_bits(v))
}

/// A `[n, k]` weight in bf16, packed for the tile kernels: panels of 16 output columns, each
/// `[k2][16][2]` (k2 = ceil(k / 2) input pairs; lane `l` of pair `j` holds `W[16p + l][2j]` then
/// `W[16p + l][2j + 1]`), so one 512-bit load gives 16 columns a pair of inputs. Odd `k`, and `n`
/// short of a whole tile, are zero-padded.
#[derive(Debug)]
pub(crate) struct Bf16Matrix {
    w: Vec<u16>,
    n: usize,
    k: usize,
    k2: usize,
}

impl Bf16Matrix {
    /// Rounds and packs `w` (`[n, k]`, row-major).
    pub fn new(w: &[f32], n: usize, k: usize) -> Self {
        let k2 = k.div_ceil(2);
        let panels = n.div_ceil(TILE_COLS) * TILE_PANELS;
        let mut packed = vec![0u16; panels * k2 * LANES * 2];
        for (o, row) in w.chunks_exact(k.max(1)).take(n).enumerate() {
            let (p, lane) = (o / LANES, o % LANES);
            let panel = &mut packed[p * k2 * LANES * 2..][..k2 * LANES * 2];
            for (c, &v) in row.iter().enumerate() {
                panel[(c / 2 * LANES + lane) * 2 + c % 2] = bf16_bits(v);
            }
        }
        Self {
            w: packed,
            n,
            k,
            k2,
        }
    }

    /// Bytes of the packed weight (padding included).
    pub fn size_in_bytes(&self) -> usize {
        2 * self.w.len()
    }

    /// Weight `[o][c]` as stored.
    fn get(&self, o: usize, c: usize) -> f32 {
        let (p, lane) = (o / LANES, o % LANES);
        bf16_to_f32(self.w[((p * self.k2 + c / 2) * LANES + lane) * 2 + c % 2])
    }

    /// The represented weight, `[n, k]` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.n * self.k)
            .map(|i| self.get(i / self.k, i % self.k))
            .collect()
    }

    /// `dst[r * outs.len() + i] = sum_c W[outs.start + i][c] * bf16(x[r][c])` for every
    /// activation row `r`, accumulated in f32 pair by pair (see the module docs). Panics if
    /// `outs` exceeds the weight or `dst` is short.
    pub fn gemm(&self, x: &Bf16Acts, outs: Range<usize>, dst: &mut [f32]) {
        let len = x.rows * outs.len();
        let mut tmp = vec![MaybeUninit::new(0f32); len];
        PackedWeight::gemm_rows(self, x, 0..x.rows, outs, None, &mut tmp);
        for (d, v) in dst[..len].iter_mut().zip(tmp) {
            // SAFETY: every slot of `tmp` was initialised when it was made.
            *d = unsafe { v.assume_init() };
        }
    }

    /// One register tile: rows `r0..r0 + rr` of `x` times panels `p0` and `p0 + 1`, into the
    /// first `rr` rows of `tile`.
    fn tile(
        &self,
        x: &Bf16Acts,
        r0: usize,
        rr: usize,
        p0: usize,
        tile: &mut [[f32; TILE_COLS]; TILE_ROWS],
    ) {
        let panel = self.k2 * LANES * 2;
        let w = &self.w[p0 * panel..(p0 + TILE_PANELS) * panel];
        match (&x.data, x.kernel) {
            #[cfg(target_arch = "x86_64")]
            (ActData::Floats(xf), Kernel::Fma) => {
                let xs = &xf[r0 * 2 * self.k2..(r0 + rr) * 2 * self.k2];
                // SAFETY: `Kernel::Fma` is only chosen when the CPU has AVX-512F (see
                // `Kernel::available`); `w` holds two whole panels of `k2` pairs and `xs` `rr`
                // rows of `2 * k2` values, which is all the kernel reads.
                unsafe { avx512::tile_fma(w, xs, rr, self.k2, tile) }
            }
            #[cfg(target_arch = "x86_64")]
            (ActData::Pairs(xp), Kernel::DpBf16) => {
                let xs = &xp[r0 * self.k2..(r0 + rr) * self.k2];
                // SAFETY: `Kernel::DpBf16` is only chosen when the CPU has AVX-512F and
                // AVX512-BF16; the slices hold exactly what the kernel reads (as above).
                unsafe { avx512::tile_dp(w, xs, rr, self.k2, tile) }
            }
            _ => scalar_tile(w, x, r0, rr, tile),
        }
    }
}

/// The portable kernel (and the tests' oracle): per pair of inputs, odd product then even one.
fn scalar_tile(
    w: &[u16],
    x: &Bf16Acts,
    r0: usize,
    rr: usize,
    tile: &mut [[f32; TILE_COLS]; TILE_ROWS],
) {
    let k2 = x.k2;
    let panel = k2 * LANES * 2;
    for (r, tr) in tile.iter_mut().enumerate().take(rr) {
        for (c, out) in tr.iter_mut().enumerate() {
            let wp = &w[(c / LANES) * panel + (c % LANES) * 2..];
            let mut acc = 0f32;
            for j in 0..k2 {
                let (x0, x1) = x.pair(r0 + r, j);
                acc += bf16_to_f32(wp[j * LANES * 2 + 1]) * x1;
                acc += bf16_to_f32(wp[j * LANES * 2]) * x0;
            }
            *out = acc;
        }
    }
}

/// Which tile kernel a product runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// Portable scalar loop.
    Scalar,
    /// AVX-512F: bf16 weights widened to f32 in registers, FMAs.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Fma,
    /// AVX512-BF16 `vdpbf16ps`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    DpBf16,
}

impl Kernel {
    /// Every kernel, for tests and the override.
    pub const ALL: [Kernel; 3] = [Kernel::Scalar, Kernel::Fma, Kernel::DpBf16];

    fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Fma => "fma",
            Kernel::DpBf16 => "dpbf16",
        }
    }

    /// Whether this CPU can run the kernel (detected at run time: the build targets baseline
    /// x86-64).
    pub fn available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Fma => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Kernel::DpBf16 => {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The kernel products use: `LORAFUSE_BF16_KERNEL` if it names one this CPU has, else the
    /// fastest available one, timed once on a small product.
    pub fn best() -> Kernel {
        static BEST: OnceLock<Kernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            if let Ok(name) = std::env::var("LORAFUSE_BF16_KERNEL") {
                match Kernel::ALL.into_iter().find(|k| k.name() == name.trim()) {
                    Some(k) if k.available() => return k,
                    _ => tracing::warn!(
                        "LORAFUSE_BF16_KERNEL={name}: not a kernel this CPU has \
                         (scalar, fma, dpbf16); choosing by timing"
                    ),
                }
            }
            let simd: Vec<Kernel> = [Kernel::Fma, Kernel::DpBf16]
                .into_iter()
                .filter(|k| k.available())
                .collect();
            match simd.as_slice() {
                [] => Kernel::Scalar,
                [only] => *only,
                _ => fastest(&simd),
            }
        })
    }
}

/// The kernel among `kernels` with the shortest best-of-5 time on a 64 x 64 x 384 product.
fn fastest(kernels: &[Kernel]) -> Kernel {
    let (n, k, rows) = (64, 384, 64);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919) % 61) as f32 / 61.0 - 0.5)
        .collect();
    let x: Vec<f32> = (0..rows * k)
        .map(|i| ((i * 104729) % 53) as f32 / 53.0 - 0.5)
        .collect();
    let m = Bf16Matrix::new(&w, n, k);
    let mut dst = vec![0f32; rows * n];
    let mut best = (Kernel::Scalar, f64::INFINITY);
    for &kernel in kernels {
        let acts = Bf16Acts::with_kernel(&x, k, kernel);
        let mut t_min = f64::INFINITY;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            m.gemm(&acts, 0..n, &mut dst);
            t_min = t_min.min(t.elapsed().as_secs_f64());
        }
        if t_min < best.1 {
            best = (kernel, t_min);
        }
    }
    tracing::debug!("bf16 GEMM kernel: {} (of {kernels:?})", best.0.name());
    best.0
}

/// Activations rounded to bf16, laid out for one kernel.
#[derive(Debug)]
enum ActData {
    /// `[rows][2 * k2]` f32 values with bf16 precision (zero-padded): scalar and FMA kernels.
    Floats(Vec<f32>),
    /// `[rows][k2]` bf16 pairs (element `2j` in the low half): what `vdpbf16ps` broadcasts.
    Pairs(Vec<u32>),
}

/// `[rows, k]` activations rounded to bf16 for one product.
#[derive(Debug)]
pub(crate) struct Bf16Acts {
    data: ActData,
    rows: usize,
    k2: usize,
    kernel: Kernel,
}

impl Bf16Acts {
    /// Rounds `x` for `kernel` (one [`Kernel::available`] says this CPU has; others fall back to
    /// the scalar loop).
    pub fn with_kernel(x: &[f32], k: usize, kernel: Kernel) -> Self {
        let kernel = if kernel.available() {
            kernel
        } else {
            Kernel::Scalar
        };
        let k2 = k.div_ceil(2);
        let rows = x.len() / k.max(1);
        let data = match kernel {
            Kernel::DpBf16 => {
                let mut p = vec![0u32; rows * k2];
                for (pr, xr) in p.chunks_exact_mut(k2.max(1)).zip(x.chunks_exact(k.max(1))) {
                    for (j, v) in pr.iter_mut().enumerate() {
                        let lo = bf16_bits(xr[2 * j]) as u32;
                        let hi = xr.get(2 * j + 1).map_or(0, |&v| bf16_bits(v) as u32);
                        *v = lo | hi << 16;
                    }
                }
                ActData::Pairs(p)
            }
            Kernel::Scalar | Kernel::Fma => {
                let mut f = vec![0f32; rows * 2 * k2];
                for (fr, xr) in f
                    .chunks_exact_mut(2 * k2.max(1))
                    .zip(x.chunks_exact(k.max(1)))
                {
                    for (d, &v) in fr.iter_mut().zip(xr) {
                        *d = round_bf16(v);
                    }
                }
                ActData::Floats(f)
            }
        };
        Self {
            data,
            rows,
            k2,
            kernel,
        }
    }

    /// Inputs `2j` and `2j + 1` of row `r`, as rounded.
    fn pair(&self, r: usize, j: usize) -> (f32, f32) {
        match &self.data {
            ActData::Floats(f) => (f[(r * self.k2 + j) * 2], f[(r * self.k2 + j) * 2 + 1]),
            ActData::Pairs(p) => {
                let v = p[r * self.k2 + j];
                (bf16_to_f32(v as u16), bf16_to_f32((v >> 16) as u16))
            }
        }
    }
}

impl PackedWeight for Bf16Matrix {
    type Acts = Bf16Acts;
    const TILE_ROWS: usize = TILE_ROWS;
    const TILE_COLS: usize = TILE_COLS;
    const LABEL: &'static str = "bf16 linear";

    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn prepare(&self, x: &[f32]) -> Bf16Acts {
        Bf16Acts::with_kernel(x, self.k, Kernel::best())
    }

    /// [`Bf16Matrix::gemm`] for activation rows `rows` only, plus `bias` (`dst` is `[rows.len(),
    /// outs.len()]`, every slot of which is written).
    fn gemm_rows(
        &self,
        x: &Bf16Acts,
        rows: Range<usize>,
        outs: Range<usize>,
        bias: Option<&[f32]>,
        dst: &mut [MaybeUninit<f32>],
    ) {
        let width = outs.len();
        assert!(x.k2 == self.k2 && rows.end <= x.rows && outs.end <= self.n);
        assert!(dst.len() >= rows.len() * width);
        let mut tile = [[0f32; TILE_COLS]; TILE_ROWS];
        for_each_tile::<Self>(rows.clone(), outs.clone(), |r0, rr, t, cols| {
            self.tile(x, r0, rr, t * TILE_PANELS, &mut tile);
            let rows_out = (r0 - rows.start) * width..(r0 - rows.start + rr) * width;
            let place = (
                cols.start - outs.start,
                cols.start - t * TILE_COLS,
                cols.len(),
            );
            let bias = bias.map(|b| &b[cols]);
            bias_tile(&tile[..rr], bias, width, place, &mut dst[rows_out]);
        });
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::tiled_gemm::by_rows;
    use super::{LANES, TILE_COLS, TILE_PANELS, TILE_ROWS};
    use std::arch::x86_64::*;

    /// `rr` rows of `x` (`[rr][2 * k2]` bf16-valued f32) times two packed panels `w`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `w` must hold two panels of `k2` pairs and `x` `rr` rows
    /// (1..=8) of `2 * k2` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_fma(
        w: &[u16],
        x: &[f32],
        rr: usize,
        k2: usize,
        tile: &mut [[f32; TILE_COLS]; TILE_ROWS],
    ) {
        debug_assert!(w.len() >= TILE_PANELS * k2 * LANES * 2 && x.len() >= rr * 2 * k2);
        let (w, x) = (w.as_ptr(), x.as_ptr());
        by_rows!(fma_rows, rr, (w, x, k2, tile), [1, 2, 3, 4, 5, 6, 7], 8)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn fma_rows<const R: usize>(
        w: *const u16,
        x: *const f32,
        k2: usize,
        tile: &mut [[f32; TILE_COLS]; TILE_ROWS],
    ) {
        let panel = k2 * LANES * 2;
        let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let mut acc = [[_mm512_setzero_ps(); TILE_PANELS]; R];
        for j in 0..k2 {
            let mut even = [_mm512_setzero_ps(); TILE_PANELS];
            let mut odd = [_mm512_setzero_ps(); TILE_PANELS];
            for p in 0..TILE_PANELS {
                // SAFETY: pair `j < k2` of panel `p < 2`: inside the two panels the caller
                // passes.
                let v = _mm512_loadu_si512(w.add(p * panel + j * LANES * 2) as *const _);
                // Each 32-bit lane is (even input's bf16 | odd input's bf16 << 16).
                even[p] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                odd[p] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                // SAFETY: row `r < R <= rr`, inputs `2j + 1 < 2 * k2`: inside `x`.
                let xo = _mm512_set1_ps(*x.add(r * 2 * k2 + 2 * j + 1));
                let xe = _mm512_set1_ps(*x.add(r * 2 * k2 + 2 * j));
                for p in 0..TILE_PANELS {
                    // Odd then even, as `vdpbf16ps` and the scalar loop do.
                    acc_r[p] = _mm512_fmadd_ps(odd[p], xo, acc_r[p]);
                    acc_r[p] = _mm512_fmadd_ps(even[p], xe, acc_r[p]);
                }
            }
        }
        store(&acc, tile);
    }

    /// [`tile_fma`] with `vdpbf16ps`: `x` is `[rr][k2]` bf16 pairs.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX512-BF16; `w` must hold two panels of `k2` pairs and
    /// `x` `rr` rows (1..=8) of `k2` pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn tile_dp(
        w: &[u16],
        x: &[u32],
        rr: usize,
        k2: usize,
        tile: &mut [[f32; TILE_COLS]; TILE_ROWS],
    ) {
        debug_assert!(w.len() >= TILE_PANELS * k2 * LANES * 2 && x.len() >= rr * k2);
        let (w, x) = (w.as_ptr(), x.as_ptr());
        by_rows!(dp_rows, rr, (w, x, k2, tile), [1, 2, 3, 4, 5, 6, 7], 8)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dp_rows<const R: usize>(
        w: *const u16,
        x: *const u32,
        k2: usize,
        tile: &mut [[f32; TILE_COLS]; TILE_ROWS],
    ) {
        let panel = k2 * LANES * 2;
        let mut acc = [[_mm512_setzero_ps(); TILE_PANELS]; R];
        for j in 0..k2 {
            let mut wv = [_mm512_setzero_si512(); TILE_PANELS];
            for (p, wp) in wv.iter_mut().enumerate() {
                // SAFETY: pair `j < k2` of panel `p < 2`, inside the caller's two panels.
                *wp = _mm512_loadu_si512(w.add(p * panel + j * LANES * 2) as *const _);
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                // SAFETY: row `r < R <= rr`, pair `j < k2`: inside `x`.
                let xb: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*x.add(r * k2 + j) as i32));
                for p in 0..TILE_PANELS {
                    // SAFETY: a bit cast between two 512-bit vector types.
                    let wb: __m512bh = std::mem::transmute(wv[p]);
                    acc_r[p] = _mm512_dpbf16_ps(acc_r[p], wb, xb);
                }
            }
        }
        store(&acc, tile);
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store<const R: usize>(
        acc: &[[__m512; TILE_PANELS]; R],
        tile: &mut [[f32; TILE_COLS]; TILE_ROWS],
    ) {
        for (acc_r, tr) in acc.iter().zip(tile.iter_mut()) {
            for (p, a) in acc_r.iter().enumerate() {
                // SAFETY: 16 floats at column `16p` of a 32-float row.
                _mm512_storeu_ps(tr.as_mut_ptr().add(p * LANES), *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tiled_gemm::test_support::{check_driver, data};
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even_and_keeps_specials() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even one (1).
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6.
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(
            round_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)),
            1.0 + 2f32.powi(-7)
        );
        assert_eq!(round_bf16(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert!(round_bf16(f32::NAN).is_nan());
        for v in data(1000, 9) {
            let h = half::bf16::from_f32(v).to_bits();
            assert_eq!(bf16_bits(v), h, "{v}");
        }
    }

    /// Every kernel this CPU has against the scalar loop, and all of them against the f32
    /// product, on shapes with row, column and input tails (odd `k` included) and on output
    /// ranges that start and end inside a tile.
    #[test]
    fn every_kernel_matches_the_scalar_oracle_and_the_f32_product() {
        let n = 70; // 2 tiles of 32 and a tail of 6 (not a multiple of 16)
        for (rows, k) in [
            (1, 384),
            (5, 97),
            (37, 1536),
            (300, 384),
            (5, 1536),
            (37, 97),
        ] {
            let w = data(n * k, rows as u64);
            let x = data(rows * k, 1000 + k as u64);
            let m = Bf16Matrix::new(&w, n, k);
            for outs in [0..n, 5..37, 64..70] {
                let width = outs.len();
                let oracle = Bf16Acts::with_kernel(&x, k, Kernel::Scalar);
                let mut want = vec![f32::NAN; rows * width];
                m.gemm(&oracle, outs.clone(), &mut want);
                // Sum of |terms| per output, from the rounded operands.
                let abs_sum = |r: usize, o: usize| -> f64 {
                    (0..k)
                        .map(|c| {
                            f64::from((round_bf16(w[o * k + c]) * round_bf16(x[r * k + c])).abs())
                        })
                        .sum()
                };
                for kernel in Kernel::ALL.into_iter().filter(|k| k.available()) {
                    let acts = Bf16Acts::with_kernel(&x, k, kernel);
                    let mut got = vec![f32::NAN; rows * width];
                    m.gemm(&acts, outs.clone(), &mut got);
                    for r in 0..rows {
                        for (i, o) in outs.clone().enumerate() {
                            let (g, e) = (got[r * width + i], want[r * width + i]);
                            // The kernels make the same f32 roundings in the same order, so
                            // they agree to the last bit but for denormals; allow one f32
                            // rounding per term of slack all the same.
                            let tol = 1e-5 * abs_sum(r, o);
                            assert!(
                                (f64::from(g) - f64::from(e)).abs() <= tol,
                                "{kernel:?} rows {rows} k {k} out {o} row {r}: {g} vs {e}"
                            );
                        }
                    }
                }
                // Against the f32 product of the unrounded operands: each term's operands are
                // within 2^-8 (relative) of the f32 values, so a term is within 2^-7 + 2^-16;
                // f32 summation of k terms adds at most k 2^-24 (< 1e-4 for k <= 1536).
                for r in 0..rows {
                    for (i, o) in outs.clone().enumerate() {
                        let dense: f64 = (0..k)
                            .map(|c| f64::from(w[o * k + c]) * f64::from(x[r * k + c]))
                            .sum();
                        let abs: f64 = (0..k)
                            .map(|c| f64::from(w[o * k + c] * x[r * k + c]).abs())
                            .sum();
                        let err = (f64::from(want[r * width + i]) - dense).abs();
                        assert!(
                            err <= (2f64.powi(-7) + 2f64.powi(-16) + 1e-4) * abs,
                            "rows {rows} k {k} out {o} row {r}: {} vs {dense}",
                            want[r * width + i]
                        );
                    }
                }
            }
        }
    }

    /// The threaded driver with this kernel (see `tiled_gemm::test_support`).
    #[test]
    fn matmul_adds_the_bias_and_rows_do_not_interact() {
        let (n, k) = (200, 97);
        check_driver(Bf16Matrix::new(&data(n * k, 21), n, k), |m, x| {
            let mut want = vec![0f32; x.len() / k * n];
            m.gemm(
                &Bf16Acts::with_kernel(x, k, Kernel::Scalar),
                0..n,
                &mut want,
            );
            want.into_iter().map(f64::from).collect()
        });
    }

    #[test]
    fn packing_round_trips_every_element() {
        let (n, k) = (37, 97);
        let w = data(n * k, 3);
        let m = Bf16Matrix::new(&w, n, k);
        let back = m.dequantize();
        for (a, b) in w.iter().zip(&back) {
            assert_eq!(round_bf16(*a), *b);
        }
    }
}
