//! SwiGLU CUDA launchers for the kernels in `swiglu.cu`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result, WithDType};
use half::{bf16, f16};

use crate::cuda_util::{self, ptx_module, PtxModule};
use crate::error::OpError;

const MODULE: PtxModule = ptx_module!("swiglu");
const OP: &str = "swiglu";

/// Threads the launch asks for: one per 4 elements, the packs' smallest width.
fn launch(n: usize) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    cuda_util::elementwise_launch(n.div_ceil(4))
}

/// `y = silu(gate) * up`.
pub(super) fn fwd(
    g: &CudaStorage,
    gl: &Layout,
    u: &CudaStorage,
    ul: &Layout,
) -> Result<CudaStorage> {
    match g.dtype() {
        DType::F32 => fwd_t::<f32>(g, gl, u, ul),
        DType::BF16 => fwd_t::<bf16>(g, gl, u, ul),
        DType::F16 => fwd_t::<f16>(g, gl, u, ul),
        dtype => Err(OpError::DType { op: OP, dtype }.into()),
    }
}

fn fwd_t<T: CudaDType + DeviceRepr + WithDType>(
    g: &CudaStorage,
    gl: &Layout,
    u: &CudaStorage,
    ul: &Layout,
) -> Result<CudaStorage> {
    let dev = &g.device;
    let n = gl.shape().elem_count();
    let gv = cuda_util::contiguous_view::<T>(g, gl, OP)?;
    let uv = cuda_util::contiguous_view::<T>(u, ul, OP)?;
    let y = cuda_util::alloc::<T>(dev, n)?;
    let k = MODULE.kernel_for(dev, "swiglu_fwd", T::DTYPE, OP)?;
    let mut b = k.builder();
    b.arg(&gv).arg(&uv).arg(&y).arg(&n);
    // SAFETY: matches `swiglu_fwd_*(const T*, const T*, T*, size_t)`; all buffers hold n
    // elements and the kernel grid-strides over them.
    unsafe { b.launch(launch(n)) }.map_err(cuda_util::driver_err(OP))?;
    Ok(cuda_util::wrap(y, dev))
}

/// `[dgate; dup]` packed as `[2, n]`.
pub(super) fn bwd(
    g: (&CudaStorage, &Layout),
    u: (&CudaStorage, &Layout),
    dy: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    match g.0.dtype() {
        DType::F32 => bwd_t::<f32>(g, u, dy),
        DType::BF16 => bwd_t::<bf16>(g, u, dy),
        DType::F16 => bwd_t::<f16>(g, u, dy),
        dtype => Err(OpError::DType { op: OP, dtype }.into()),
    }
}

fn bwd_t<T: CudaDType + DeviceRepr + WithDType>(
    (g, gl): (&CudaStorage, &Layout),
    (u, ul): (&CudaStorage, &Layout),
    (dy, dyl): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = &g.device;
    let n = gl.shape().elem_count();
    let gv = cuda_util::contiguous_view::<T>(g, gl, OP)?;
    let uv = cuda_util::contiguous_view::<T>(u, ul, OP)?;
    let dyv = cuda_util::contiguous_view::<T>(dy, dyl, OP)?;
    let out = cuda_util::alloc::<T>(dev, 2 * n)?;
    let k = MODULE.kernel_for(dev, "swiglu_bwd", T::DTYPE, OP)?;
    let mut b = k.builder();
    b.arg(&gv).arg(&uv).arg(&dyv).arg(&out).arg(&n);
    // SAFETY: matches `swiglu_bwd_*(g, u, dy, out, size_t n)`; inputs hold n elements, out 2n.
    unsafe { b.launch(launch(n)) }.map_err(cuda_util::driver_err(OP))?;
    Ok(cuda_util::wrap(out, dev))
}
