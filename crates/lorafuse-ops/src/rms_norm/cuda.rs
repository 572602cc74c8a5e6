//! RMSNorm CUDA launchers for the kernels in `rms_norm.cu`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result, WithDType};
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
    let k = MODULE.kernel_for(dev, "rms_norm_fwd", T::DTYPE, OP)?;
    let mut b = k.builder();
    b.arg(&xv).arg(&wv).arg(&y).arg(&n_i).arg(&eps);
    // SAFETY: the arguments match `rms_norm_fwd_*(const T*, const T*, T*, int, float)`; x and y
    // hold rows * n elements and w holds n, and the grid has one block per row.
    unsafe {
        b.launch(cuda_util::row_launch_packed(
            rows,
            n,
            std::mem::size_of::<T>(),
        ))
    }
    .map_err(cuda_util::driver_err(OP))?;
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
    let rstd = cuda_util::alloc::<f32>(dev, rows.max(1))?;
    let n_i = cuda_util::to_i32(n, "hidden size", OP)?;
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
        let chunks_i = cuda_util::to_i32(n_chunks, "chunks", OP)?;
        let k = MODULE.kernel_for(dev, "rms_norm_bwd_dw", T::DTYPE, OP)?;
        let mut b = k.builder();
        b.arg(&xv).arg(&dyv).arg(&rstd).arg(&partial);
        b.arg(&rows_i).arg(&n_i).arg(&rpc_i);
        // SAFETY: matches `rms_norm_bwd_dw_*(x, dy, rstd, partial, rows, n, rows_per_chunk)`;
        // partial holds n_chunks * n floats, the grid covers n columns by n_chunks chunks.
        unsafe { b.launch(cuda_util::column_partial_launch(n, n_chunks)) }
            .map_err(cuda_util::driver_err(OP))?;
        let mut dw = out.slice_mut(rows * n..);
        let k = MODULE.kernel_for(dev, "rms_norm_bwd_dw_finish", T::DTYPE, OP)?;
        let mut b = k.builder();
        b.arg(&partial).arg(&mut dw).arg(&n_i).arg(&chunks_i);
        // SAFETY: matches `rms_norm_bwd_dw_finish_*(partial, dw, n, n_chunks)`; dw is the last
        // n elements of out.
        unsafe { b.launch(cuda_util::elementwise_launch(n)) }.map_err(cuda_util::driver_err(OP))?;
    }
    Ok(cuda_util::wrap(out, dev))
}
