//! Softmax CUDA launchers for the kernels in `softmax.cu`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result, WithDType};
use half::{bf16, f16};

use crate::cpu_util::layout_rows_cols;
use crate::cuda_util::{self, ptx_module, PtxModule};
use crate::error::OpError;

const MODULE: PtxModule = ptx_module!("softmax");
const OP: &str = "softmax";

/// `y = softmax(x)` over the last dimension, one block per row.
pub(super) fn fwd(x: &CudaStorage, xl: &Layout) -> Result<CudaStorage> {
    match x.dtype() {
        DType::F32 => fwd_t::<f32>(x, xl),
        DType::BF16 => fwd_t::<bf16>(x, xl),
        DType::F16 => fwd_t::<f16>(x, xl),
        dtype => Err(OpError::DType { op: OP, dtype }.into()),
    }
}

fn fwd_t<T: CudaDType + DeviceRepr + WithDType>(
    x: &CudaStorage,
    xl: &Layout,
) -> Result<CudaStorage> {
    let dev = &x.device;
    let (rows, n) = layout_rows_cols(xl);
    let xv = cuda_util::contiguous_view::<T>(x, xl, OP)?;
    let y = cuda_util::alloc::<T>(dev, rows * n)?;
    let n_i = cuda_util::to_i32(n, "row length", OP)?;
    let launch = cuda_util::row_launch_packed(rows, n, std::mem::size_of::<T>());
    // Softmax gains from the persistent form only where a block fills most of its SM (on an
    // H200, bf16 16384x32000: 952 -> 688 us); at 4096 columns (128-thread blocks) it measured
    // slower (84 -> 90 us), unlike the norms.
    if cuda_util::persistent_rows_apply(n, std::mem::size_of::<T>(), &launch, 512) {
        let k = MODULE.kernel_for(dev, "softmax_fwd_rows", T::DTYPE, OP)?;
        if let Some(cfg) = k.persistent_launch(launch, rows, OP)? {
            let rows_i = cuda_util::to_i32(rows, "rows", OP)?;
            let mut b = k.builder();
            b.arg(&xv).arg(&y).arg(&rows_i).arg(&n_i);
            // SAFETY: matches `softmax_fwd_rows_*(const T*, T*, int rows, int n)`; x and y hold
            // rows * n elements; persistent_rows_apply checked the row fits the block.
            unsafe { b.launch(cfg) }.map_err(cuda_util::driver_err(OP))?;
            return Ok(cuda_util::wrap(y, dev));
        }
    }
    let k = MODULE.kernel_for(
        dev,
        &cuda_util::row_fwd_kernel("softmax_fwd", n, std::mem::size_of::<T>()),
        T::DTYPE,
        OP,
    )?;
    let mut b = k.builder();
    b.arg(&xv).arg(&y).arg(&n_i);
    // SAFETY: matches `softmax_fwd{,8}_*(const T*, T*, int)`; x and y hold rows * n elements, one
    // block per row.
    unsafe { b.launch(launch) }.map_err(cuda_util::driver_err(OP))?;
    Ok(cuda_util::wrap(y, dev))
}

/// `dx = y * (dy - sum(dy * y))`, one block per row.
pub(super) fn bwd(
    y: &CudaStorage,
    yl: &Layout,
    dy: &CudaStorage,
    dyl: &Layout,
) -> Result<CudaStorage> {
    match y.dtype() {
        DType::F32 => bwd_t::<f32>(y, yl, dy, dyl),
        DType::BF16 => bwd_t::<bf16>(y, yl, dy, dyl),
        DType::F16 => bwd_t::<f16>(y, yl, dy, dyl),
        dtype => Err(OpError::DType { op: OP, dtype }.into()),
    }
}

fn bwd_t<T: CudaDType + DeviceRepr + WithDType>(
    y: &CudaStorage,
    yl: &Layout,
    dy: &CudaStorage,
    dyl: &Layout,
) -> Result<CudaStorage> {
    let dev = &y.device;
    let (rows, n) = layout_rows_cols(yl);
    let yv = cuda_util::contiguous_view::<T>(y, yl, OP)?;
    let dyv = cuda_util::contiguous_view::<T>(dy, dyl, OP)?;
    let dx = cuda_util::alloc::<T>(dev, rows * n)?;
    let n_i = cuda_util::to_i32(n, "row length", OP)?;
    let k = MODULE.kernel_for(dev, "softmax_bwd", T::DTYPE, OP)?;
    let mut b = k.builder();
    b.arg(&yv).arg(&dyv).arg(&dx).arg(&n_i);
    // SAFETY: matches `softmax_bwd_*(const T*, const T*, T*, int)`; all three buffers hold
    // rows * n elements, one block per row.
    unsafe { b.launch(cuda_util::row_launch(rows, n, 0)) }.map_err(cuda_util::driver_err(OP))?;
    Ok(cuda_util::wrap(dx, dev))
}
