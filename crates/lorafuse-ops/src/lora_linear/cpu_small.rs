//! `y = x Wᵀ` on the CPU in f32 for few rows of `x` (a decode step, one short sentence).
//!
//! The `gemm` crate packs the whole weight into panels on every call, which for a handful of rows
//! costs several times the product itself. Here each output feature is a dot product of a
//! contiguous weight row with each row of `x` (all of `x` stays in cache), so the weight streams
//! through once, unpacked. Output features are split over Candle's threads; the dot products
//! are compiled for AVX-512 and AVX2 and picked at run time (the build targets baseline x86-64).

use rayon::prelude::*;

/// Up to this many rows take this path; past it the packed GEMM amortises its packing.
pub(super) const MAX_ROWS: usize = 128;

/// Output features per task.
const CHUNK: usize = 32;

/// Lanes the accumulators are written in: LLVM maps them onto the widest vectors enabled.
const LANES: usize = 16;

/// `y[r][j] = sum_k x[r][k] * w[j][k]`: `x` is `[rows, k]`, `w` is `[n, k]`, both row-major.
pub(super) fn matmul_wt(x: &[f32], w: &[f32], rows: usize, n: usize, k: usize) -> Vec<f32> {
    assert!(
        x.len() >= rows * k && w.len() >= n * k,
        "small matmul: operand sizes"
    );
    let mut yt = vec![0f32; n * rows];
    yt.par_chunks_mut(CHUNK * rows.max(1))
        .enumerate()
        .for_each(|(c, out)| {
            let j0 = c * CHUNK;
            let cols = out.len() / rows.max(1);
            let wc = &w[j0 * k..(j0 + cols) * k];
            dots(x, wc, rows, cols, k, out);
        });
    let mut y = vec![0f32; rows * n];
    for (j, col) in yt.chunks(rows.max(1)).enumerate() {
        for (r, v) in col.iter().enumerate() {
            y[r * n + j] = *v;
        }
    }
    y
}

/// `out[j * rows + r] = x[r] · w[j]` for `cols` weight rows.
fn dots(x: &[f32], w: &[f32], rows: usize, cols: usize, k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was detected at run time; the body only indexes slices.
            return unsafe { dots_avx512(x, w, rows, cols, k, out) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA were detected at run time; the body only indexes slices.
            return unsafe { dots_avx2(x, w, rows, cols, k, out) };
        }
    }
    dots_body(x, w, rows, cols, k, out)
}

/// AVX-512: blocks of four weight rows by four rows of `x` in sixteen 16-lane accumulators, so
/// each pair of loads feeds four multiply-adds. The last block of each direction overlaps the
/// previous one instead of running short (it rewrites the same values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512(x: &[f32], w: &[f32], rows: usize, cols: usize, k: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let main = k - k % 16;
    if rows < 4 || cols < 4 || main == 0 {
        return dots_body(x, w, rows, cols, k, out);
    }
    let mut j = 0;
    while j < cols {
        let j0 = j.min(cols - 4);
        let ws: [&[f32]; 4] = [0, 1, 2, 3].map(|i| &w[(j0 + i) * k..(j0 + i + 1) * k]);
        let mut r = 0;
        while r < rows {
            let r0 = r.min(rows - 4);
            let xs: [&[f32]; 4] = [0, 1, 2, 3].map(|i| &x[(r0 + i) * k..(r0 + i + 1) * k]);
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            let mut c = 0;
            while c < main {
                // SAFETY: `c + 16 <= main <= k`, and every row slice holds k floats.
                let wv = ws.map(|wr| _mm512_loadu_ps(wr.as_ptr().add(c)));
                for (acc_r, xi) in acc.iter_mut().zip(&xs) {
                    let xv = _mm512_loadu_ps(xi.as_ptr().add(c));
                    for (a, wvi) in acc_r.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(*wvi, xv, *a);
                    }
                }
                c += 16;
            }
            for (i, (acc_r, xi)) in acc.iter().zip(&xs).enumerate() {
                for (jj, (a, wr)) in acc_r.iter().zip(&ws).enumerate() {
                    let mut s = _mm512_reduce_add_ps(*a);
                    for kk in main..k {
                        s += wr[kk] * xi[kk];
                    }
                    out[(j0 + jj) * rows + r0 + i] = s;
                }
            }
            r = r0 + 4;
        }
        j = j0 + 4;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2(x: &[f32], w: &[f32], rows: usize, cols: usize, k: usize, out: &mut [f32]) {
    dots_body(x, w, rows, cols, k, out)
}

/// Four rows of `x` per pass over a weight row, so each weight load feeds four accumulators.
#[inline(always)]
fn dots_body(x: &[f32], w: &[f32], rows: usize, cols: usize, k: usize, out: &mut [f32]) {
    let main = k - k % LANES;
    for j in 0..cols {
        let wj = &w[j * k..(j + 1) * k];
        let mut r = 0;
        while r < rows {
            let take = (rows - r).min(4);
            let mut acc = [[0f32; LANES]; 4];
            let xr: [&[f32]; 4] = std::array::from_fn(|i| {
                let row = r + i.min(take - 1);
                &x[row * k..(row + 1) * k]
            });
            for (c, wv) in wj[..main].chunks_exact(LANES).enumerate() {
                for (a, xi) in acc.iter_mut().zip(&xr) {
                    let xv = &xi[c * LANES..(c + 1) * LANES];
                    for l in 0..LANES {
                        a[l] += wv[l] * xv[l];
                    }
                }
            }
            for i in 0..take {
                let mut s: f32 = acc[i].iter().sum();
                for kk in main..k {
                    s += wj[kk] * xr[i][kk];
                }
                out[j * rows + r + i] = s;
            }
            r += take;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_triple_loop() {
        for &(rows, n, k) in &[
            (1, 70, 37),
            (5, 33, 64),
            (29, 100, 384),
            (7, 1, 17),
            (6, 35, 50),
            (4, 4, 16),
        ] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
                .collect();
            let y = matmul_wt(&x, &w, rows, n, k);
            for r in 0..rows {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|t| x[r * k + t] as f64 * w[j * k + t] as f64)
                        .sum();
                    let got = y[r * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{rows}x{n}x{k} [{r},{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
