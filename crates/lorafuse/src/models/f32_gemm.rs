//! Packed f32 copies of frozen weights for a register-tiled f32 GEMM: the exact weights, laid out
//! so that the encoder's products need no per-call packing.
//!
//! Why: the dense CPU path multiplies few rows (one document) by unpacked dot products, and many
//! rows through the `gemm` crate, which packs the weight on every call. Packing once, at load, lets
//! one kernel keep a 12 x 32 output tile in registers for any row count: one 55-token MiniLM
//! document ran its dot products at about a third of the cores' f32 peak.

use super::simd;
use super::tiled_gemm::{bias_tile, for_each_tile, PackedWeight, LANES, TILE_COLS, TILE_PANELS};
use std::mem::MaybeUninit;
use std::ops::Range;

/// Activation rows per register tile: 12 x 2 zmm accumulators, two weight vectors and a broadcast.
const TILE_ROWS: usize = 12;

/// A `[n, k]` f32 weight packed in panels of 16 outputs, each `[k][16]`; `n` short of a whole tile
/// is zero-padded.
#[derive(Debug)]
pub(crate) struct F32Matrix {
    w: Vec<f32>,
    n: usize,
    k: usize,
}

impl F32Matrix {
    /// Packs `w` (`[n, k]`, row-major).
    pub fn new(w: &[f32], n: usize, k: usize) -> Self {
        let panels = n.div_ceil(TILE_COLS) * TILE_PANELS;
        let mut packed = vec![0f32; panels * k * LANES];
        for (o, row) in w.chunks_exact(k.max(1)).take(n).enumerate() {
            let (p, lane) = (o / LANES, o % LANES);
            for (c, &v) in row.iter().enumerate() {
                packed[(p * k + c) * LANES + lane] = v;
            }
        }
        Self { w: packed, n, k }
    }

    /// Bytes of the packed weight (padding included).
    pub fn size_in_bytes(&self) -> usize {
        4 * self.w.len()
    }

    /// The weight, `[n, k]` row-major (exactly the packed values).
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.n * self.k)
            .map(|i| {
                let (o, c) = (i / self.k, i % self.k);
                self.w[((o / LANES) * self.k + c) * LANES + o % LANES]
            })
            .collect()
    }
}

/// Activation rows for one product, as given (`[rows, k]`).
#[derive(Debug)]
pub(crate) struct F32Acts {
    x: Vec<f32>,
    rows: usize,
}

impl PackedWeight for F32Matrix {
    type Acts = F32Acts;
    const TILE_ROWS: usize = TILE_ROWS;
    const TILE_COLS: usize = TILE_COLS;
    const LABEL: &'static str = "packed f32 linear";

    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn prepare(&self, x: &[f32]) -> F32Acts {
        F32Acts {
            x: x.to_vec(),
            rows: x.len() / self.k.max(1),
        }
    }

    /// Register tiles summed in f32 input by input, plus the bias, into `dst`.
    fn gemm_rows(
        &self,
        x: &F32Acts,
        rows: Range<usize>,
        outs: Range<usize>,
        bias: Option<&[f32]>,
        dst: &mut [MaybeUninit<f32>],
    ) {
        let (width, k) = (outs.len(), self.k);
        assert!(rows.end <= x.rows && outs.end <= self.n);
        assert!(dst.len() >= rows.len() * width);
        let panel = k * LANES;
        let mut tile = [[0f32; TILE_COLS]; TILE_ROWS];
        for_each_tile::<Self>(rows.clone(), outs.clone(), |r0, rr, t, cols| {
            let xs = &x.x[r0 * k..(r0 + rr) * k];
            let w = &self.w[t * TILE_PANELS * panel..(t + 1) * TILE_PANELS * panel];
            f32_tile(w, xs, rr, k, &mut tile);
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

/// Rows `0..rr` of `x` (`[rr][k]`) times the two panels `w`, into `tile`.
fn f32_tile(w: &[f32], x: &[f32], rr: usize, k: usize, tile: &mut [[f32; TILE_COLS]; TILE_ROWS]) {
    #[cfg(target_arch = "x86_64")]
    if simd::avx512() {
        // SAFETY: `avx512()` checked AVX-512F; `w` holds two panels of `k` inputs and `x` `rr <=
        // TILE_ROWS` rows of `k` (sliced so by the caller), which is all the kernel reads.
        unsafe { avx512::tile(w, x, rr, k, tile) };
        return;
    }
    scalar_tile(w, x, rr, k, tile);
}

/// The portable kernel: the same f32 fused multiply-adds in the same order as the SIMD one.
fn scalar_tile(
    w: &[f32],
    x: &[f32],
    rr: usize,
    k: usize,
    tile: &mut [[f32; TILE_COLS]; TILE_ROWS],
) {
    let panel = k * LANES;
    for (r, tr) in tile.iter_mut().enumerate().take(rr) {
        for (c, out) in tr.iter_mut().enumerate() {
            let wp = &w[(c / LANES) * panel + c % LANES..];
            let mut acc = 0f32;
            for (i, &xv) in x[r * k..(r + 1) * k].iter().enumerate() {
                acc = xv.mul_add(wp[i * LANES], acc);
            }
            *out = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::tiled_gemm::by_rows;
    use super::{LANES, TILE_COLS, TILE_PANELS, TILE_ROWS};
    use std::arch::x86_64::*;

    /// `rr` rows of `x` times two packed panels `w`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `w` must hold two panels of `k` inputs and `x` `rr` rows
    /// (1..=12) of `k`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile(
        w: &[f32],
        x: &[f32],
        rr: usize,
        k: usize,
        tile: &mut [[f32; TILE_COLS]; TILE_ROWS],
    ) {
        debug_assert!(w.len() >= TILE_PANELS * k * LANES && x.len() >= rr * k);
        let (w, x) = (w.as_ptr(), x.as_ptr());
        by_rows!(
            rows,
            rr,
            (w, x, k, tile),
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
            12
        )
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn rows<const R: usize>(
        w: *const f32,
        x: *const f32,
        k: usize,
        tile: &mut [[f32; TILE_COLS]; TILE_ROWS],
    ) {
        let panel = k * LANES;
        let mut acc = [[_mm512_setzero_ps(); TILE_PANELS]; R];
        for c in 0..k {
            // SAFETY: input `c < k` of panels 0 and 1: inside the two panels the caller passes.
            let w0 = _mm512_loadu_ps(w.add(c * LANES));
            let w1 = _mm512_loadu_ps(w.add(panel + c * LANES));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                // SAFETY: row `r < R <= rr`, input `c < k`: inside `x`.
                let xb = _mm512_set1_ps(*x.add(r * k + c));
                acc_r[0] = _mm512_fmadd_ps(xb, w0, acc_r[0]);
                acc_r[1] = _mm512_fmadd_ps(xb, w1, acc_r[1]);
            }
        }
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

    /// The kernel this CPU runs against the f64 product, on shapes with row, column and input
    /// tails and on output ranges inside a tile; the packing round-trips exactly.
    #[test]
    fn kernel_matches_the_f64_product() {
        let n = 70;
        for (rows, k) in [(1, 384), (13, 97), (37, 1536), (300, 384)] {
            let w = data(n * k, rows as u64);
            let x = data(rows * k, 1000 + k as u64);
            let m = F32Matrix::new(&w, n, k);
            assert_eq!(m.dequantize(), w);
            let acts = m.prepare(&x);
            for outs in [0..n, 5..37, 64..70] {
                let width = outs.len();
                let mut got = vec![MaybeUninit::new(f32::NAN); rows * width];
                m.gemm_rows(&acts, 0..rows, outs.clone(), None, &mut got);
                for r in 0..rows {
                    for (i, o) in outs.clone().enumerate() {
                        // SAFETY: initialised to NaN when made, then overwritten.
                        let g = f64::from(unsafe { got[r * width + i].assume_init() });
                        let (mut e, mut abs) = (0f64, 0f64);
                        for c in 0..k {
                            let t = f64::from(w[o * k + c]) * f64::from(x[r * k + c]);
                            e += t;
                            abs += t.abs();
                        }
                        // f32 accumulation of k terms: within k 2^-24 of the sum of |terms|.
                        let tol = k as f64 * 6e-8 * abs + 1e-30;
                        assert!(
                            (g - e).abs() <= tol,
                            "rows {rows} k {k} out {o} row {r}: {g} vs {e}"
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
        check_driver(F32Matrix::new(&data(n * k, 21), n, k), |m, x| {
            let rows = x.len() / k;
            let w = m.dequantize();
            (0..rows * n)
                .map(|i| {
                    let (r, o) = (i / n, i % n);
                    (0..k)
                        .map(|c| f64::from(x[r * k + c]) * f64::from(w[o * k + c]))
                        .sum()
                })
                .collect()
        });
    }
}
