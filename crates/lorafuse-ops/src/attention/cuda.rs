//! Attention CUDA launchers for the kernels in `attention.cu`.

use super::cpu::Dims;
use super::OP;
use crate::cuda_util::{self, ptx_module, PtxModule};
use crate::error::{shape_err, OpError};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor, WithDType};
use half::{bf16, f16};

const MODULE: PtxModule = ptx_module!("attention");
/// Query (or key) rows per block: one warp each (`ATT_ROWS_PER_BLOCK` in the kernel source).
const ROWS_PER_BLOCK: usize = 4;
/// Warps sharing one query row in the split-key forward (`ATT_SPLIT` in the kernel source).
const SPLIT: u32 = 8;
/// Up to this many queries per head the forward splits each row's keys over a block of warps
/// (decode steps, short chunks: a warp per row would leave the card idle).
const SPLIT_MAX_TQ: usize = 16;

/// The kernels' `AttDims` argument.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AttDims {
    b: i32,
    hq: i32,
    hkv: i32,
    tq: i32,
    tk: i32,
    d: i32,
    scale: f32,
}

// SAFETY: a plain `#[repr(C)]` struct of i32/f32, laid out as the kernels' `struct AttDims`.
unsafe impl DeviceRepr for AttDims {}

impl AttDims {
    fn new(dm: Dims) -> Result<Self> {
        let i = |n: usize, what: &str| cuda_util::to_i32(n, what, OP);
        if dm.d == 0 || dm.d > super::GPU_MAX_HEAD_DIM {
            return Err(shape_err(
                OP,
                format!("head dim {} outside 1..={}", dm.d, super::GPU_MAX_HEAD_DIM),
            ));
        }
        Ok(Self {
            b: i(dm.b, "batch")?,
            hq: i(dm.hq, "query heads")?,
            hkv: i(dm.hkv, "kv heads")?,
            tq: i(dm.tq, "query length")?,
            tk: i(dm.tk, "key length")?,
            d: i(dm.d, "head dim")?,
            scale: dm.scale as f32,
        })
    }
}

/// A warp per row, `rows` rows in each of `groups` (batch x heads) grid columns.
fn rows_launch(rows: usize, groups: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            rows.div_ceil(ROWS_PER_BLOCK).max(1) as u32,
            groups.max(1) as u32,
            1,
        ),
        block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `(o, lse)`: the output and the per-row logsumexp (f32 `[b, hq, tq]`).
pub(super) fn fwd(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    dm: Dims,
) -> Result<(CudaStorage, Tensor)> {
    match q.0.dtype() {
        DType::F32 => fwd_t::<f32>(q, k, v, dm),
        DType::BF16 => fwd_t::<bf16>(q, k, v, dm),
        DType::F16 => fwd_t::<f16>(q, k, v, dm),
        dtype => Err(OpError::DType { op: OP, dtype }.into()),
    }
}

fn fwd_t<T: CudaDType + DeviceRepr + WithDType>(
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
    dm: Dims,
) -> Result<(CudaStorage, Tensor)> {
    let dev: &CudaDevice = &qs.device;
    let a = AttDims::new(dm)?;
    let rows = dm.b * dm.hq * dm.tq;
    let (q, k, v) = (
        cuda_util::contiguous_view::<T>(qs, ql, OP)?,
        cuda_util::contiguous_view::<T>(ks, kl, OP)?,
        cuda_util::contiguous_view::<T>(vs, vl, OP)?,
    );
    let o = cuda_util::alloc::<T>(dev, (rows * dm.d).max(1))?;
    let lse = cuda_util::alloc::<f32>(dev, rows.max(1))?;
    if rows > 0 {
        let split = dm.tq <= SPLIT_MAX_TQ;
        let (name, cfg) = if split {
            let cfg = LaunchConfig {
                grid_dim: (dm.tq as u32, (dm.b * dm.hq) as u32, 1),
                block_dim: (32 * SPLIT, 1, 1),
                shared_mem_bytes: 0,
            };
            ("attention_fwd_split", cfg)
        } else {
            ("attention_fwd", rows_launch(dm.tq, dm.b * dm.hq))
        };
        let kern = MODULE.kernel_for(dev, name, T::DTYPE, OP)?;
        let mut b = kern.builder();
        b.arg(&q).arg(&k).arg(&v).arg(&o).arg(&lse).arg(&a);
        // SAFETY: matches `attention_fwd{,_split}_*(const T*, const T*, const T*, T*, float*,
        // AttDims)`; q/o hold b*hq*tq*d elements, k/v b*hkv*tk*d, lse b*hq*tq; a warp (or a
        // block of SPLIT warps) per query row.
        unsafe { b.launch(cfg) }.map_err(cuda_util::driver_err(OP))?;
    }
    let lse = Tensor::from_storage(
        Storage::Cuda(cuda_util::wrap(lse, dev)),
        rows.max(1),
        BackpropOp::none(),
        false,
    );
    Ok((cuda_util::wrap(o, dev), lse))
}

/// A saved tensor's contiguous device buffer.
fn saved_view<'a, T: CudaDType>(s: &'a Storage, l: &Layout) -> Result<CudaView<'a, T>> {
    match s {
        Storage::Cuda(s) => cuda_util::contiguous_view::<T>(s, l, OP),
        _ => Err(shape_err(OP, "saved tensor is not on the GPU")),
    }
}

/// Packed `[dq | dk | dv]`.
pub(super) fn bwd(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    o: &Tensor,
    g: &Tensor,
    lse: &Tensor,
    dm: Dims,
) -> Result<CudaStorage> {
    match q.0.dtype() {
        DType::F32 => bwd_t::<f32>(q, k, v, o, g, lse, dm),
        DType::BF16 => bwd_t::<bf16>(q, k, v, o, g, lse, dm),
        DType::F16 => bwd_t::<f16>(q, k, v, o, g, lse, dm),
        dtype => Err(OpError::DType { op: OP, dtype }.into()),
    }
}

fn bwd_t<T: CudaDType + DeviceRepr + WithDType>(
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
    o: &Tensor,
    g: &Tensor,
    lse: &Tensor,
    dm: Dims,
) -> Result<CudaStorage> {
    let dev: &CudaDevice = &qs.device;
    let a = AttDims::new(dm)?;
    let rows = dm.b * dm.hq * dm.tq;
    let (nq, nk) = (rows * dm.d, dm.b * dm.hkv * dm.tk * dm.d);
    if o.dims() != ql.dims() || g.dims() != ql.dims() || lse.elem_count() < rows {
        return Err(shape_err(
            OP,
            format!(
                "output {:?} / gradient {:?} for q {:?}",
                o.dims(),
                g.dims(),
                ql.dims()
            ),
        ));
    }
    let (q, k, v) = (
        cuda_util::contiguous_view::<T>(qs, ql, OP)?,
        cuda_util::contiguous_view::<T>(ks, kl, OP)?,
        cuda_util::contiguous_view::<T>(vs, vl, OP)?,
    );
    let (os, ol) = o.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (ls, ll) = lse.storage_and_layout();
    let (o, g, lse) = (
        saved_view::<T>(&os, ol)?,
        saved_view::<T>(&gs, gl)?,
        saved_view::<f32>(&ls, ll)?,
    );
    let mut out = cuda_util::alloc::<T>(dev, (nq + 2 * nk).max(1))?;
    let mut delta = cuda_util::alloc::<f32>(dev, rows.max(1))?;
    if rows == 0 {
        return Ok(cuda_util::wrap(out, dev));
    }
    {
        let mut dq = out.slice_mut(0..nq);
        let kern = MODULE.kernel_for(dev, "attention_bwd_dq", T::DTYPE, OP)?;
        let mut b = kern.builder();
        b.arg(&q)
            .arg(&k)
            .arg(&v)
            .arg(&o)
            .arg(&g)
            .arg(&lse)
            .arg(&mut delta)
            .arg(&mut dq)
            .arg(&a);
        // SAFETY: matches `attention_bwd_dq_*(const T* q, k, v, o, dout, const float* lse,
        // float* delta, T* dq, AttDims)`; sizes as in the forward, dq is the first nq elements.
        unsafe { b.launch(rows_launch(dm.tq, dm.b * dm.hq)) }.map_err(cuda_util::driver_err(OP))?;
    }
    {
        let (_, mut dkv) = out.split_at_mut(nq);
        let (mut dk, mut dv) = dkv.split_at_mut(nk);
        let kern = MODULE.kernel_for(dev, "attention_bwd_dkv", T::DTYPE, OP)?;
        let mut b = kern.builder();
        b.arg(&q)
            .arg(&k)
            .arg(&v)
            .arg(&g)
            .arg(&lse)
            .arg(&delta)
            .arg(&mut dk)
            .arg(&mut dv)
            .arg(&a);
        // SAFETY: matches `attention_bwd_dkv_*(const T* q, k, v, dout, const float* lse,
        // const float* delta, T* dk, T* dv, AttDims)`; dk and dv are the two nk-element tails.
        unsafe { b.launch(rows_launch(dm.tk, dm.b * dm.hkv)) }
            .map_err(cuda_util::driver_err(OP))?;
    }
    Ok(cuda_util::wrap(out, dev))
}
