//! Cross-entropy CUDA launchers for the kernels in `cross_entropy.cu` (targets arrive as i64).

use super::{Reduction, Saved, OP};
use crate::cuda_util::{self, ptx_module, PtxModule};
use crate::error::{shape_err, OpError};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{
    CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use half::{bf16, f16};

const MODULE: PtxModule = ptx_module!("cross_entropy");

fn dims2(l: &Layout) -> Result<(usize, usize)> {
    match l.dims() {
        [n, v] => Ok((*n, *v)),
        d => Err(shape_err(
            OP,
            format!("logits must be [n, vocab], got {d:?}"),
        )),
    }
}

fn as_tensor(s: CudaStorage, n: usize) -> Tensor {
    Tensor::from_storage(Storage::Cuda(s), n, BackpropOp::none(), false)
}

/// One block for a reduction over `n` values.
fn single_block(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (n.next_power_of_two().clamp(32, 1024) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The loss (reduced as asked) and the statistics the backward needs.
pub(super) fn fwd(
    ls: &CudaStorage,
    ll: &Layout,
    ts: &CudaStorage,
    tl: &Layout,
    ignore: i64,
    red: Reduction,
) -> Result<(CudaStorage, Shape, Saved)> {
    match ls.dtype() {
        DType::F32 => fwd_t::<f32>(ls, ll, ts, tl, ignore, red),
        DType::BF16 => fwd_t::<bf16>(ls, ll, ts, tl, ignore, red),
        DType::F16 => fwd_t::<f16>(ls, ll, ts, tl, ignore, red),
        dtype => Err(OpError::DType { op: OP, dtype }.into()),
    }
}

fn fwd_t<T: CudaDType + DeviceRepr + WithDType>(
    ls: &CudaStorage,
    ll: &Layout,
    ts: &CudaStorage,
    tl: &Layout,
    ignore: i64,
    red: Reduction,
) -> Result<(CudaStorage, Shape, Saved)> {
    let dev: &CudaDevice = &ls.device;
    let (n, v) = dims2(ll)?;
    if tl.dims() != [n] {
        return Err(shape_err(
            OP,
            format!("{n} rows of logits, targets {:?}", tl.dims()),
        ));
    }
    let logits = cuda_util::contiguous_view::<T>(ls, ll, OP)?;
    let targets = cuda_util::contiguous_view::<i64>(ts, tl, OP)?;
    if n == 0 || v == 0 {
        return Err(shape_err(OP, format!("empty logits {:?}", ll.dims())));
    }
    let loss = cuda_util::alloc::<f32>(dev, n)?;
    let lse = cuda_util::alloc::<f32>(dev, n)?;
    let out = cuda_util::alloc::<f32>(dev, 1)?;
    let count = cuda_util::alloc::<f32>(dev, 1)?;
    let v_i = cuda_util::to_i32(v, "vocabulary", OP)?;
    let n_i = cuda_util::to_i32(n, "rows", OP)?;
    let k = MODULE.kernel_for(dev, "cross_entropy_fwd", T::DTYPE, OP)?;
    let mut b = k.builder();
    b.arg(&logits)
        .arg(&targets)
        .arg(&loss)
        .arg(&lse)
        .arg(&v_i)
        .arg(&ignore);
    // SAFETY: matches `cross_entropy_fwd_*(const T*, const long long*, float*, float*, int,
    // long long)`; logits hold n * v elements, targets/loss/lse n; one block per row.
    unsafe { b.launch(cuda_util::row_launch(n, v, 0)) }.map_err(cuda_util::driver_err(OP))?;
    let mean = i32::from(red == Reduction::Mean);
    let k = MODULE.kernel(dev, "cross_entropy_fwd_reduce")?;
    let mut b = k.builder();
    b.arg(&loss)
        .arg(&targets)
        .arg(&out)
        .arg(&count)
        .arg(&n_i)
        .arg(&ignore)
        .arg(&mean);
    // SAFETY: matches `cross_entropy_fwd_reduce(const float*, const long long*, float*, float*,
    // int, long long, int)`; loss and targets hold n elements, out and count one; one block.
    unsafe { b.launch(single_block(n)) }.map_err(cuda_util::driver_err(OP))?;
    let saved = Saved {
        lse: as_tensor(cuda_util::wrap(lse, dev), n),
        count: as_tensor(cuda_util::wrap(count, dev), 1),
    };
    Ok(match red {
        Reduction::None => (cuda_util::wrap(loss, dev), Shape::from(n), saved),
        _ => (cuda_util::wrap(out, dev), Shape::from(()), saved),
    })
}

/// A saved statistic's f32 device buffer.
fn saved_view<'a>(
    s: &'a Storage,
    l: &Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
    match s {
        Storage::Cuda(s) => cuda_util::contiguous_view::<f32>(s, l, OP),
        _ => Err(shape_err(OP, "saved statistics are not on the GPU")),
    }
}

/// `dlogits = (softmax - onehot) * coef`, in the logits' dtype.
#[allow(clippy::too_many_arguments)]
pub(super) fn bwd(
    ls: &CudaStorage,
    ll: &Layout,
    ts: &CudaStorage,
    tl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
    saved: &Saved,
    ignore: i64,
    red: Reduction,
) -> Result<CudaStorage> {
    match ls.dtype() {
        DType::F32 => bwd_t::<f32>(ls, ll, ts, tl, gs, gl, saved, ignore, red),
        DType::BF16 => bwd_t::<bf16>(ls, ll, ts, tl, gs, gl, saved, ignore, red),
        DType::F16 => bwd_t::<f16>(ls, ll, ts, tl, gs, gl, saved, ignore, red),
        dtype => Err(OpError::DType { op: OP, dtype }.into()),
    }
}

#[allow(clippy::too_many_arguments)]
fn bwd_t<T: CudaDType + DeviceRepr + WithDType>(
    ls: &CudaStorage,
    ll: &Layout,
    ts: &CudaStorage,
    tl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
    saved: &Saved,
    ignore: i64,
    red: Reduction,
) -> Result<CudaStorage> {
    let dev: &CudaDevice = &ls.device;
    let (n, v) = dims2(ll)?;
    let per_row = red == Reduction::None;
    let want_g = if per_row { n } else { 1 };
    if gl.shape().elem_count() != want_g || saved.lse.dims() != [n] {
        return Err(shape_err(
            OP,
            format!("backward of {n} rows got gradient {:?}", gl.dims()),
        ));
    }
    let logits = cuda_util::contiguous_view::<T>(ls, ll, OP)?;
    let targets = cuda_util::contiguous_view::<i64>(ts, tl, OP)?;
    let g = cuda_util::contiguous_view::<f32>(gs, gl, OP)?;
    let (lse_s, lse_l) = saved.lse.storage_and_layout();
    let (count_s, count_l) = saved.count.storage_and_layout();
    let lse = saved_view(&lse_s, lse_l)?;
    let count = saved_view(&count_s, count_l)?;
    let d = cuda_util::alloc::<T>(dev, n * v)?;
    {
        let (v_i, per_row_i, mean_i) = (
            cuda_util::to_i32(v, "vocabulary", OP)?,
            i32::from(per_row),
            i32::from(red == Reduction::Mean),
        );
        let k = MODULE.kernel_for(dev, "cross_entropy_bwd", T::DTYPE, OP)?;
        let mut b = k.builder();
        b.arg(&logits)
            .arg(&targets)
            .arg(&g)
            .arg(&per_row_i)
            .arg(&lse)
            .arg(&count);
        b.arg(&mean_i).arg(&d).arg(&v_i).arg(&ignore);
        // SAFETY: matches `cross_entropy_bwd_*(const T*, const long long*, const float*, int,
        // const float*, const float*, int, T*, int, long long)`; logits and d hold n * v
        // elements, targets and lse n, g n or 1, count 1; one block per row.
        unsafe { b.launch(cuda_util::row_launch(n, v, 0)) }.map_err(cuda_util::driver_err(OP))?;
    }
    Ok(cuda_util::wrap(d, dev))
}
