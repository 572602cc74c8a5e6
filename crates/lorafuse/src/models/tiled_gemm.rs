//! The threaded driver shared by the packed-weight GEMMs ([`super::bf16_gemm`],
//! [`super::i16_gemm`]).
//!
//! Many rows (an encoder batch): row blocks run on rayon's threads, each preparing (rounding or
//! quantizing) its own rows and writing its slice of the output, bias included, in place. For a
//! 256-document MiniLM batch the outputs are ~170 MB a layer: zero-filling them, and gathering
//! per-block copies with the bias, took a quarter of a pass.
//!
//! Few rows (one document, a decode step): the activations are prepared once, and output blocks
//! split over the columns go to [`gemv_pool`], whose caller never waits for a descheduled helper.

use super::gemv_pool::{self, TileJob};
use super::simd;
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

/// Output columns per packed panel (one zmm of 32-bit lanes), in every packed format.
pub(crate) const LANES: usize = 16;
/// Panels per register tile; a packed weight's panel count is padded to a multiple of it.
pub(crate) const TILE_PANELS: usize = 2;
/// Output columns per register tile.
pub(crate) const TILE_COLS: usize = LANES * TILE_PANELS;

/// `by_rows!(kernel, rr, (args...), [1, 2, ...], max)`: calls `kernel::<R>(args...)` for the
/// runtime row count `rr` of a register tile, the kernels being instantiated for every count up
/// to `max` (any larger `rr` takes `max`).
macro_rules! by_rows {
    ($kernel:ident, $rr:expr, $args:tt, [$($n:literal),*], $max:literal) => {
        match $rr {
            $($n => $kernel::<$n> $args,)*
            _ => $kernel::<$max> $args,
        }
    };
}
pub(crate) use by_rows;

simd::wide_fn!(
    /// The epilogue of an f32 tile: `d[r][dc + i] = tile[r][tc + i] + bias[i]` for `i < n` (`d`
    /// rows are `width` apart).
    pub(crate) fn bias_tile(
        tile: &[[f32; TILE_COLS]],
        bias: Option<&[f32]>,
        width: usize,
        place: (usize, usize, usize),
        d: &mut [MaybeUninit<f32>],
    ) => bias_tile_body
);

#[inline(always)]
fn bias_tile_body(
    tile: &[[f32; TILE_COLS]],
    bias: Option<&[f32]>,
    width: usize,
    (dc, tc, n): (usize, usize, usize),
    d: &mut [MaybeUninit<f32>],
) {
    for (tr, d) in tile.iter().zip(d.chunks_mut(width)) {
        let (d, acc) = (&mut d[dc..dc + n], &tr[tc..tc + n]);
        match bias {
            Some(b) => {
                for ((d, &a), &b) in d.iter_mut().zip(acc).zip(b) {
                    d.write(a + b);
                }
            }
            None => {
                for (d, &a) in d.iter_mut().zip(acc) {
                    d.write(a);
                }
            }
        }
    }
}

/// A frozen `[n, k]` weight packed for a register-tiled kernel.
pub(crate) trait PackedWeight: Send + Sync + 'static {
    /// Activation rows as the kernel reads them (rounded or quantized once per product).
    type Acts: Send + Sync + 'static;
    /// Rows of one register tile; output blocks are whole multiples of it.
    const TILE_ROWS: usize;
    /// Columns of one register tile.
    const TILE_COLS: usize;
    /// Names the layer kind in errors.
    const LABEL: &'static str;

    /// `(n, k)`: outputs and inputs.
    fn dims(&self) -> (usize, usize);
    /// Activations `x` (`[rows, k]` row-major) for this weight's kernel.
    fn prepare(&self, x: &[f32]) -> Self::Acts;
    /// `dst[r, i] = sum_c W[outs.start + i][c] * x[rows.start + r][c] + bias[outs.start + i]`,
    /// writing every one of the first `rows.len() * outs.len()` slots of `dst` (callers rely on
    /// that to treat them as initialised). Panics if `dst` is shorter.
    fn gemm_rows(
        &self,
        x: &Self::Acts,
        rows: Range<usize>,
        outs: Range<usize>,
        bias: Option<&[f32]>,
        dst: &mut [MaybeUninit<f32>],
    );
}

/// Walks the register tiles that cover rows `rows` and outputs `outs` (tiles of `W::TILE_ROWS` x
/// `W::TILE_COLS`, row tiles outer): `f(r0, rr, t, cols)` for rows `r0..r0 + rr`, column tile `t`,
/// and `cols`, the outputs of that tile which `outs` asks for.
pub(crate) fn for_each_tile<W: PackedWeight>(
    rows: Range<usize>,
    outs: Range<usize>,
    mut f: impl FnMut(usize, usize, usize, Range<usize>),
) {
    if outs.is_empty() {
        return;
    }
    let (first, last) = (outs.start / W::TILE_COLS, outs.end.div_ceil(W::TILE_COLS));
    for r0 in rows.clone().step_by(W::TILE_ROWS) {
        let rr = W::TILE_ROWS.min(rows.end - r0);
        for t in first..last {
            let col0 = t * W::TILE_COLS;
            f(
                r0,
                rr,
                t,
                outs.start.max(col0)..outs.end.min(col0 + W::TILE_COLS),
            );
        }
    }
}

/// Register tiles per output block, in rows, when there are many rows: with a MiniLM layer's
/// widest weight (1536 x 384, 1.2 MB in 16 bits) a block's activations and outputs stay in the
/// 2 MB L2 beside it.
const BLOCK_TILES: usize = 8;

/// `x W^T + bias` for `x` `[.., k]` (any float dtype, on the CPU), as `[rows, n]` row-major
/// f32: output blocks computed on the calling thread and [`gemv_pool`]'s helpers, bias added
/// while they are gathered.
pub(crate) fn matmul<W: PackedWeight>(
    w: &Arc<W>,
    x: &Tensor,
    bias: Option<&[f32]>,
) -> candle_core::Result<Vec<f32>> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let (n, k) = w.dims();
    let rows = x.elem_count() / k.max(1);
    if rows * k != x.elem_count() || bias.is_some_and(|b| b.len() != n) {
        candle_core::bail!(
            "{}: input {:?} or bias does not fit [{n}, {k}]",
            W::LABEL,
            x.dims()
        );
    }
    if rows == 0 || n == 0 {
        return Ok(Vec::new());
    }
    let threads = threads();
    let block_rows = (BLOCK_TILES * W::TILE_ROWS)
        .min(rows.next_multiple_of(W::TILE_ROWS))
        .max(W::TILE_ROWS);
    let row_blocks = rows.div_ceil(block_rows);
    if row_blocks >= 2 * threads {
        return with_input_rows::<W, _>(&x, rows, k, |xs| {
            let mut out = Vec::with_capacity(rows * n);
            out.spare_capacity_mut()[..rows * n]
                .par_chunks_mut(block_rows * n)
                .enumerate()
                .for_each(|(rb, dst)| {
                    let r0 = rb * block_rows;
                    let rr = dst.len() / n;
                    let acts = w.prepare(&xs[r0 * k..(r0 + rr) * k]);
                    w.gemm_rows(&acts, 0..rr, 0..n, bias, dst);
                });
            // SAFETY: the chunks partition the first `rows * n` slots and `gemm_rows` writes
            // every slot of its chunk (its contract), so all of them are initialised.
            unsafe { out.set_len(rows * n) };
            out
        });
    }
    // Prepared once for all tiles (a tile of few rows and many columns would redo it).
    let acts = with_input_rows::<W, _>(&x, rows, k, |xs| w.prepare(xs))?;
    // Split the columns too, into enough blocks for every thread to take a few.
    let col_blocks = (4 * threads).div_ceil(row_blocks.max(1)).max(1);
    let block_cols = n
        .div_ceil(col_blocks)
        .next_multiple_of(W::TILE_COLS)
        .max(W::TILE_COLS);
    let col_blocks = n.div_ceil(block_cols);
    let job = Arc::new(GemmJob {
        w: w.clone(),
        x: acts,
        bias: bias.map(<[f32]>::to_vec),
        rows,
        block_rows,
        block_cols,
        col_blocks,
    });
    let results = gemv_pool::run_tiles(job);
    let mut out = Vec::with_capacity(rows * n);
    for rb in 0..row_blocks {
        let rows_here = block_rows.min(rows - rb * block_rows);
        for r in 0..rows_here {
            for cb in 0..col_blocks {
                let width = block_cols.min(n - cb * block_cols);
                let tile = results.get(rb * col_blocks + cb);
                let Some(seg) = tile.get(r * width..(r + 1) * width) else {
                    candle_core::bail!("{}: output block {rb}.{cb} is missing", W::LABEL);
                };
                out.extend_from_slice(seg);
            }
        }
    }
    Ok(out)
}

/// Candle's CPU thread count (what [`gemv_pool`] runs on), read once.
fn threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

/// The first `rows` rows of `x` (f32, contiguous, on the CPU, `k` wide), handed to `f`.
fn with_input_rows<W: PackedWeight, T>(
    x: &Tensor,
    rows: usize,
    k: usize,
    f: impl FnOnce(&[f32]) -> T,
) -> candle_core::Result<T> {
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{}: input is not on the CPU", W::LABEL);
    };
    let all = cpu.as_slice::<f32>()?;
    let Some((start, _)) = layout.contiguous_offsets() else {
        candle_core::bail!("{}: input is not contiguous", W::LABEL);
    };
    match all.get(start..start + rows * k) {
        Some(s) => Ok(f(s)),
        None => candle_core::bail!("{}: input shorter than its shape", W::LABEL),
    }
}

/// One product: output blocks of `block_rows` x `block_cols`, row block after row block.
struct GemmJob<W: PackedWeight> {
    w: Arc<W>,
    x: W::Acts,
    bias: Option<Vec<f32>>,
    rows: usize,
    block_rows: usize,
    block_cols: usize,
    col_blocks: usize,
}

impl<W: PackedWeight> TileJob for GemmJob<W> {
    fn tiles(&self) -> usize {
        self.rows.div_ceil(self.block_rows) * self.col_blocks
    }

    fn macs(&self) -> usize {
        let (n, k) = self.w.dims();
        self.rows * n * k
    }

    fn compute(&self, t: usize) -> Vec<f32> {
        let (n, _) = self.w.dims();
        let (rb, cb) = (t / self.col_blocks, t % self.col_blocks);
        let rows = rb * self.block_rows..self.rows.min((rb + 1) * self.block_rows);
        let cols = cb * self.block_cols..n.min((cb + 1) * self.block_cols);
        let len = rows.len() * cols.len();
        let mut out = Vec::with_capacity(len);
        let bias = self.bias.as_deref();
        self.w.gemm_rows(
            &self.x,
            rows,
            cols,
            bias,
            &mut out.spare_capacity_mut()[..len],
        );
        // SAFETY: `gemm_rows` writes all of the first `len` slots (its contract).
        unsafe { out.set_len(len) };
        out
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::{matmul, PackedWeight};
    use candle_core::Tensor;
    use std::sync::Arc;

    /// `n` seeded values uniform in `[-1, 1)`.
    pub fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    /// The driver on `w` against `want(w, x)`, the kernel's own product of `x` (`[rows, k]`)
    /// without bias: bias added, for row counts that take the pool (one row, 29) and the row
    /// blocks (300); and a row alone gets the bits it gets inside a batch.
    pub fn check_driver<W: PackedWeight>(w: W, want: impl Fn(&W, &[f32]) -> Vec<f64>) {
        let (n, k) = w.dims();
        let w = Arc::new(w);
        let bias = data(n, 23);
        for rows in [1, 29, 300] {
            let x = data(rows * k, 22 + rows as u64);
            let xt = Tensor::from_vec(x.clone(), (rows, k), &candle_core::Device::Cpu).unwrap();
            let got = matmul(&w, &xt, Some(&bias)).unwrap();
            let expected = want(&w, &x);
            assert_eq!(got.len(), expected.len());
            for (i, (&g, &e)) in got.iter().zip(&expected).enumerate() {
                let e = e + f64::from(bias[i % n]);
                let g = f64::from(g);
                assert!(
                    (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "{} rows {rows} [{i}]: {g} vs {e}",
                    W::LABEL
                );
            }
            let row = rows / 2;
            let one = x[row * k..(row + 1) * k].to_vec();
            let one = Tensor::from_vec(one, (1, k), xt.device()).unwrap();
            let one = matmul(&w, &one, Some(&bias)).unwrap();
            assert_eq!(one, got[row * n..(row + 1) * n], "rows {rows}, row {row}");
        }
    }
}
