//! LayerNorm CUDA launchers for the kernels in `layer_norm.cu`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, WithDType};
use half::{bf16, f16};

use crate::cpu_util::layout_rows_cols;
use crate::cuda_util::{self, ptx_module, PtxModule};
use crate::error::OpError;

const MODULE: PtxModule = ptx_module!("layer_norm");
const OP: &str = "layer_norm";

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// `y = (x - mean) * rstd * w (+ b)`, one block per row.
pub(super) fn fwd(eps: f32, x: Arg, w: Arg, b: Option<Arg>) -> Result<CudaStorage> {
    match x.0.dtype() {
        DType::F32 => fwd_t::<f32>(eps, x, w, b),
        DType::BF16 => fwd_t::<bf16>(eps, x, w, b),
        DType::F16 => fwd_t::<f16>(eps, x, w, b),
        dtype => Err(OpError::DType { op: OP, dtype }.into()),
    }
}

fn fwd_t<T: CudaDType + DeviceRepr + WithDType>(
    eps: f32,
    (x, xl): Arg,
    (w, wl): Arg,
    b: Option<Arg>,
) -> Result<CudaStorage> {
    let dev = &x.device;
    let (rows, n) = layout_rows_cols(xl);
    let xv = cuda_util::contiguous_view::<T>(x, xl, OP)?;
    let wv = cuda_util::contiguous_view::<T>(w, wl, OP)?;
    // Without a bias the kernel never reads the pointer; the weight stands in for it.
    let (bv, has_bias) = match b {
        Some((b, bl)) => (cuda_util::contiguous_view::<T>(b, bl, OP)?, 1i32),
        None => (cuda_util::contiguous_view::<T>(w, wl, OP)?, 0i32),
    };
    let y = cuda_util::alloc::<T>(dev, rows * n)?;
    let n_i = cuda_util::to_i32(n, "hidden size", OP)?;
    let launch = cuda_util::row_launch_packed(rows, n, std::mem::size_of::<T>());
    if cuda_util::persistent_rows_apply(n, std::mem::size_of::<T>(), &launch, 0) {
        let k = MODULE.kernel_for(dev, "layer_norm_fwd_rows", T::DTYPE, OP)?;
        if let Some(cfg) = k.persistent_launch(launch, rows, OP)? {
            let rows_i = cuda_util::to_i32(rows, "rows", OP)?;
            let mut bld = k.builder();
            bld.arg(&xv).arg(&wv).arg(&bv).arg(&has_bias).arg(&y);
            bld.arg(&rows_i).arg(&n_i).arg(&eps);
            // SAFETY: matches `layer_norm_fwd_rows_*(x, w, b, has_bias, y, rows, n, eps)`; x and
            // y hold rows * n elements, w and b n; persistent_rows_apply checked the row fits the block.
            unsafe { bld.launch(cfg) }.map_err(cuda_util::driver_err(OP))?;
            return Ok(cuda_util::wrap(y, dev));
        }
    }
    let k = MODULE.kernel_for(
        dev,
        &cuda_util::row_fwd_kernel("layer_norm_fwd", n, std::mem::size_of::<T>()),
        T::DTYPE,
        OP,
    )?;
    let mut bld = k.builder();
    bld.arg(&xv)
        .arg(&wv)
        .arg(&bv)
        .arg(&has_bias)
        .arg(&y)
        .arg(&n_i)
        .arg(&eps);
    // SAFETY: matches `layer_norm_fwd{,8}_*(x, w, b, int has_bias, y, int n, float eps)`; x and y
    // hold rows * n elements, w and b n; one block per row.
    unsafe { bld.launch(launch) }.map_err(cuda_util::driver_err(OP))?;
    Ok(cuda_util::wrap(y, dev))
}

/// `[dx; dw?; db?]` packed as `[rows + want_dw + want_db, n]`.
pub(super) fn bwd(eps: f32, want: (bool, bool), x: Arg, w: Arg, dy: Arg) -> Result<CudaStorage> {
    match x.0.dtype() {
        DType::F32 => bwd_t::<f32>(eps, want, x, w, dy),
        DType::BF16 => bwd_t::<bf16>(eps, want, x, w, dy),
        DType::F16 => bwd_t::<f16>(eps, want, x, w, dy),
        dtype => Err(OpError::DType { op: OP, dtype }.into()),
    }
}

fn bwd_t<T: CudaDType + DeviceRepr + WithDType>(
    eps: f32,
    (want_dw, want_db): (bool, bool),
    (x, xl): Arg,
    (w, wl): Arg,
    (dy, dyl): Arg,
) -> Result<CudaStorage> {
    let dev = &x.device;
    let (rows, n) = layout_rows_cols(xl);
    let xv = cuda_util::contiguous_view::<T>(x, xl, OP)?;
    let wv = cuda_util::contiguous_view::<T>(w, wl, OP)?;
    let dyv = cuda_util::contiguous_view::<T>(dy, dyl, OP)?;
    let extra = usize::from(want_dw) + usize::from(want_db);
    let mut out = cuda_util::alloc::<T>(dev, (rows + extra) * n)?;
    let n_i = cuda_util::to_i32(n, "hidden size", OP)?;
    for (packs, plan) in cuda_util::bwd_rows_plans(n, std::mem::size_of::<T>()) {
        let k = MODULE.kernel_for(dev, &format!("layer_norm_bwd_rows{packs}"), T::DTYPE, OP)?;
        let Some(cfg) = k.persistent_launch(plan, rows, OP)? else {
            continue;
        };
        let grid = cfg.grid_dim.0;
        let partial_len = |want: bool| if want { grid as usize * n } else { 1 };
        let partial_dw = cuda_util::alloc::<f32>(dev, partial_len(want_dw))?;
        let partial_db = cuda_util::alloc::<f32>(dev, partial_len(want_db))?;
        let (want_dw_i, want_db_i) = (i32::from(want_dw), i32::from(want_db));
        let rows_i = cuda_util::to_i32(rows, "rows", OP)?;
        let mut b = k.builder();
        b.arg(&xv).arg(&wv).arg(&dyv).arg(&out);
        b.arg(&partial_dw)
            .arg(&partial_db)
            .arg(&want_dw_i)
            .arg(&want_db_i);
        b.arg(&rows_i).arg(&n_i).arg(&eps);
        // SAFETY: matches `layer_norm_bwd_rows{2,4}_*(x, w, dy, dx, partial_dw, partial_db,
        // want_dw, want_db, rows, n, eps)`; out holds at least rows * n elements, each partial
        // grid * n floats when wanted (the kernel writes it only then), and bwd_rows_plans
        // checked n / pack <= packs * threads.
        unsafe { b.launch(cfg) }.map_err(cuda_util::driver_err(OP))?;
        let mut next = rows;
        for (want, partial) in [(want_dw, &partial_dw), (want_db, &partial_db)] {
            if want {
                finish::<T>(dev, partial, &mut out, n, next, grid as usize)?;
                next += 1;
            }
        }
        return Ok(cuda_util::wrap(out, dev));
    }
    let stats = cuda_util::alloc::<f32>(dev, 2 * rows.max(1))?;
    {
        let k = MODULE.kernel_for(dev, "layer_norm_bwd", T::DTYPE, OP)?;
        let mut b = k.builder();
        b.arg(&xv)
            .arg(&wv)
            .arg(&dyv)
            .arg(&out)
            .arg(&stats)
            .arg(&n_i)
            .arg(&eps);
        // SAFETY: matches `layer_norm_bwd_*(x, w, dy, dx, float2* stats, n, eps)`; out holds at
        // least rows * n elements, stats two f32 per row; one block per row.
        unsafe { b.launch(cuda_util::row_launch(rows, n, 0)) }
            .map_err(cuda_util::driver_err(OP))?;
    }
    let mut next = rows;
    if want_dw {
        column_sum::<T>(
            dev,
            "layer_norm_bwd_dw",
            &xv,
            &dyv,
            Some(&stats),
            (rows, n),
            &mut out,
            next,
        )?;
        next += 1;
    }
    if want_db {
        column_sum::<T>(
            dev,
            "layer_norm_bwd_db",
            &xv,
            &dyv,
            None,
            (rows, n),
            &mut out,
            next,
        )?;
    }
    Ok(cuda_util::wrap(out, dev))
}

/// Runs one parameter-gradient column reduction (`_dw` with the row stats, `_db` without) and
/// writes its result into row `dst_row` of `out`.
#[allow(clippy::too_many_arguments)]
fn column_sum<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    base: &str,
    xv: &CudaView<T>,
    dyv: &CudaView<T>,
    stats: Option<&CudaSlice<f32>>,
    (rows, n): (usize, usize),
    out: &mut CudaSlice<T>,
    dst_row: usize,
) -> Result<()> {
    let (rows_per_chunk, n_chunks) = cuda_util::column_chunks(rows);
    let partial = cuda_util::alloc::<f32>(dev, n_chunks * n)?;
    let rows_i = cuda_util::to_i32(rows, "rows", OP)?;
    let n_i = cuda_util::to_i32(n, "hidden size", OP)?;
    let rpc_i = cuda_util::to_i32(rows_per_chunk, "rows per chunk", OP)?;
    {
        let k = MODULE.kernel_for(dev, base, T::DTYPE, OP)?;
        let mut b = k.builder();
        if let Some(stats) = stats {
            b.arg(xv).arg(dyv).arg(stats);
        } else {
            b.arg(dyv);
        }
        b.arg(&partial).arg(&rows_i).arg(&n_i).arg(&rpc_i);
        // SAFETY: matches `layer_norm_bwd_dw_*(x, dy, stats, partial, rows, n, rpc)` or
        // `layer_norm_bwd_db_*(dy, partial, rows, n, rpc)`; partial holds n_chunks * n floats.
        unsafe { b.launch(cuda_util::column_partial_launch(n, n_chunks)) }
            .map_err(cuda_util::driver_err(OP))?;
    }
    finish::<T>(dev, &partial, out, n, dst_row, n_chunks)
}

/// Row `dst_row` of `out` as the sum of `n_chunks` rows of f32 partial sums.
fn finish<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    partial: &CudaSlice<f32>,
    out: &mut CudaSlice<T>,
    n: usize,
    dst_row: usize,
    n_chunks: usize,
) -> Result<()> {
    MODULE
        .kernel_for(dev, "layer_norm_bwd_finish", T::DTYPE, OP)?
        .finish_columns(partial, out, (n, dst_row), n_chunks, OP)
}
