//! RMSNorm CUDA launchers for the kernels in `rms_norm.cu`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, WithDType};
use half::{bf16, f16};

use crate::cpu_util::layout_rows_cols;
use crate::cuda_util::{self, ptx_module, PtxModule};
use crate::error::OpError;

const MODULE: PtxModule = ptx_module!("rms_norm");
const OP: &str = "rms_norm";

/// `y = x * rstd * w` for `x` `[.., n]`, one block per row.
pub(super) fn fwd(
    eps: f32,
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
) -> Result<CudaStorage> {
    match x.dtype() {
        DType::F32 => fwd_t::<f32>(eps, x, xl, w, wl),
        DType::BF16 => fwd_t::<bf16>(eps, x, xl, w, wl),
        DType::F16 => fwd_t::<f16>(eps, x, xl, w, wl),
        dtype => Err(OpError::DType { op: OP, dtype }.into()),
    }
}

fn fwd_t<T: CudaDType + DeviceRepr + WithDType>(
    eps: f32,
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
) -> Result<CudaStorage> {
    let dev = &x.device;
    let (rows, n) = layout_rows_cols(xl);
    let xv = cuda_util::contiguous_view::<T>(x, xl, OP)?;
    let wv = cuda_util::contiguous_view::<T>(w, wl, OP)?;
    let y = cuda_util::alloc::<T>(dev, rows * n)?;
    let n_i = cuda_util::to_i32(n, "hidden size", OP)?;
    let launch = cuda_util::row_launch_packed(rows, n, std::mem::size_of::<T>());
    if cuda_util::persistent_rows_apply(n, std::mem::size_of::<T>(), &launch, 0) {
        let k = MODULE.kernel_for(dev, "rms_norm_fwd_rows", T::DTYPE, OP)?;
        if let Some(cfg) = k.persistent_launch(launch, rows, OP)? {
            let rows_i = cuda_util::to_i32(rows, "rows", OP)?;
            let mut b = k.builder();
            b.arg(&xv).arg(&wv).arg(&y).arg(&rows_i).arg(&n_i).arg(&eps);
            // SAFETY: matches `rms_norm_fwd_rows_*(x, w, y, rows, n, eps)`; x and y hold
            // rows * n elements and w holds n; persistent_rows_apply checked the row fits the block.
            unsafe { b.launch(cfg) }.map_err(cuda_util::driver_err(OP))?;
            return Ok(cuda_util::wrap(y, dev));
        }
    }
    let k = MODULE.kernel_for(
        dev,
        &cuda_util::row_fwd_kernel("rms_norm_fwd", n, std::mem::size_of::<T>()),
        T::DTYPE,
        OP,
    )?;
    let mut b = k.builder();
    b.arg(&xv).arg(&wv).arg(&y).arg(&n_i).arg(&eps);
    // SAFETY: the arguments match `rms_norm_fwd{,8}_*(const T*, const T*, T*, int, float)`; x, y
    // hold rows * n elements and w holds n, and the grid has one block per row.
    unsafe { b.launch(launch) }.map_err(cuda_util::driver_err(OP))?;
    Ok(cuda_util::wrap(y, dev))
}

/// `[dx; dw]` packed as `[rows + want_dw, n]`.
pub(super) fn bwd(
    eps: f32,
    want_dw: bool,
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    match x.0.dtype() {
        DType::F32 => bwd_t::<f32>(eps, want_dw, x, w, dy),
        DType::BF16 => bwd_t::<bf16>(eps, want_dw, x, w, dy),
        DType::F16 => bwd_t::<f16>(eps, want_dw, x, w, dy),
        dtype => Err(OpError::DType { op: OP, dtype }.into()),
    }
}

fn bwd_t<T: CudaDType + DeviceRepr + WithDType>(
    eps: f32,
    want_dw: bool,
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    (dy, dyl): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = &x.device;
    let (rows, n) = layout_rows_cols(xl);
    let xv = cuda_util::contiguous_view::<T>(x, xl, OP)?;
    let wv = cuda_util::contiguous_view::<T>(w, wl, OP)?;
    let dyv = cuda_util::contiguous_view::<T>(dy, dyl, OP)?;
    let mut out = cuda_util::alloc::<T>(dev, (rows + usize::from(want_dw)) * n)?;
    let n_i = cuda_util::to_i32(n, "hidden size", OP)?;
    for (packs, plan) in cuda_util::bwd_rows_plans(n, std::mem::size_of::<T>()) {
        let k = MODULE.kernel_for(dev, &format!("rms_norm_bwd_rows{packs}"), T::DTYPE, OP)?;
        let Some(cfg) = k.persistent_launch(plan, rows, OP)? else {
            continue;
        };
        let grid = cfg.grid_dim.0;
        let partial = cuda_util::alloc::<f32>(dev, if want_dw { grid as usize * n } else { 1 })?;
        let rows_i = cuda_util::to_i32(rows, "rows", OP)?;
        let want_i = i32::from(want_dw);
        let mut b = k.builder();
        b.arg(&xv).arg(&wv).arg(&dyv).arg(&out).arg(&partial);
        b.arg(&want_i).arg(&rows_i).arg(&n_i).arg(&eps);
        // SAFETY: matches `rms_norm_bwd_rows{2,4}_*(x, w, dy, dx, partial, want_dw, rows, n,
        // eps)`; out holds at least rows * n elements, partial grid * n floats when want_dw (the
        // kernel writes it only then), and bwd_rows_plans checked n / pack <= packs * threads.
        unsafe { b.launch(cfg) }.map_err(cuda_util::driver_err(OP))?;
        if want_dw {
            finish_dw::<T>(dev, &partial, &mut out, rows, n, grid as usize)?;
        }
        return Ok(cuda_util::wrap(out, dev));
    }
    let rstd = cuda_util::alloc::<f32>(dev, rows.max(1))?;
    {
        let k = MODULE.kernel_for(dev, "rms_norm_bwd", T::DTYPE, OP)?;
        let mut b = k.builder();
        b.arg(&xv)
            .arg(&wv)
            .arg(&dyv)
            .arg(&out)
            .arg(&rstd)
            .arg(&n_i)
            .arg(&eps);
        // SAFETY: matches `rms_norm_bwd_*(x, w, dy, dx, rstd, n, eps)`; out holds at least
        // rows * n elements, rstd one f32 per row, one block per row.
        unsafe { b.launch(cuda_util::row_launch(rows, n, 0)) }
            .map_err(cuda_util::driver_err(OP))?;
    }
    if want_dw {
        let (rows_per_chunk, n_chunks) = cuda_util::column_chunks(rows);
        let partial = cuda_util::alloc::<f32>(dev, n_chunks * n)?;
        let rows_i = cuda_util::to_i32(rows, "rows", OP)?;
        let rpc_i = cuda_util::to_i32(rows_per_chunk, "rows per chunk", OP)?;
        let k = MODULE.kernel_for(dev, "rms_norm_bwd_dw", T::DTYPE, OP)?;
        let mut b = k.builder();
        b.arg(&xv).arg(&dyv).arg(&rstd).arg(&partial);
        b.arg(&rows_i).arg(&n_i).arg(&rpc_i);
        // SAFETY: matches `rms_norm_bwd_dw_*(x, dy, rstd, partial, rows, n, rows_per_chunk)`;
        // partial holds n_chunks * n floats, the grid covers n columns by n_chunks chunks.
        unsafe { b.launch(cuda_util::column_partial_launch(n, n_chunks)) }
            .map_err(cuda_util::driver_err(OP))?;
        finish_dw::<T>(dev, &partial, &mut out, rows, n, n_chunks)?;
    }
    Ok(cuda_util::wrap(out, dev))
}

/// `dw` (the last `n` elements of `out`, after `rows` rows of dx) as the sum of `n_chunks` rows
/// of f32 partial sums.
fn finish_dw<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    partial: &CudaSlice<f32>,
    out: &mut CudaSlice<T>,
    rows: usize,
    n: usize,
    n_chunks: usize,
) -> Result<()> {
    MODULE
        .kernel_for(dev, "rms_norm_bwd_dw_finish", T::DTYPE, OP)?
        .finish_columns(partial, out, (n, rows), n_chunks, OP)
}
