//! RoPE CUDA launcher for the kernels in `rope.cu`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result, WithDType};
use half::{bf16, f16};

use crate::cuda_util::{self, ptx_module, PtxModule};
use crate::error::OpError;

const MODULE: PtxModule = ptx_module!("rope");
const OP: &str = "rope";

/// Rotates `x` (`[.., t, d]`) by `cos`/`sin` (`[t, d/2]`); `inverse` runs `rope_bwd_*`.
pub(super) fn rotate(
    td: (usize, usize),
    interleaved: bool,
    inverse: bool,
    x: (&CudaStorage, &Layout),
    cos: (&CudaStorage, &Layout),
    sin: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    match x.0.dtype() {
        DType::F32 => rotate_t::<f32>(td, interleaved, inverse, x, cos, sin),
        DType::BF16 => rotate_t::<bf16>(td, interleaved, inverse, x, cos, sin),
        DType::F16 => rotate_t::<f16>(td, interleaved, inverse, x, cos, sin),
        dtype => Err(OpError::DType { op: OP, dtype }.into()),
    }
}

fn rotate_t<T: CudaDType + DeviceRepr + WithDType>(
    (t, d): (usize, usize),
    interleaved: bool,
    inverse: bool,
    (x, xl): (&CudaStorage, &Layout),
    (cos, cl): (&CudaStorage, &Layout),
    (sin, sl): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let dev = &x.device;
    let n = xl.shape().elem_count();
    if d % 2 != 0 || cl.shape().elem_count() != t * d / 2 || sl.shape().elem_count() != t * d / 2 {
        return Err(crate::error::shape_err(
            OP,
            format!(
                "x {:?}, cos {:?}, sin {:?}",
                xl.dims(),
                cl.dims(),
                sl.dims()
            ),
        ));
    }
    let xv = cuda_util::contiguous_view::<T>(x, xl, OP)?;
    let cv = cuda_util::contiguous_view::<T>(cos, cl, OP)?;
    let sv = cuda_util::contiguous_view::<T>(sin, sl, OP)?;
    let y = cuda_util::alloc::<T>(dev, n)?;
    let t_i = cuda_util::to_i32(t, "sequence length", OP)?;
    let d_i = cuda_util::to_i32(d, "head dim", OP)?;
    let n_pairs = n / 2;
    let inter = i32::from(interleaved);
    let base = if inverse { "rope_bwd" } else { "rope_fwd" };
    let k = MODULE.kernel_for(dev, base, T::DTYPE, OP)?;
    let mut b = k.builder();
    b.arg(&xv).arg(&cv).arg(&sv).arg(&y);
    b.arg(&t_i).arg(&d_i).arg(&n_pairs).arg(&inter);
    // SAFETY: matches `rope_{fwd,bwd}_*(x, cos, sin, y, int t, int d, size_t n_pairs, int)`; x
    // and y hold n = 2 * n_pairs elements, cos and sin t * d / 2, grid-stride over pairs.
    unsafe { b.launch(cuda_util::elementwise_launch(n_pairs)) }
        .map_err(cuda_util::driver_err(OP))?;
    Ok(cuda_util::wrap(y, dev))
}
