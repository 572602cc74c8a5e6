//! Attention CUDA launchers for the kernels in `attention.cu`.
//!
//! bf16/f16 with head dim 64 or 128 run the tensor-core (FlashAttention-2 style) kernels; f32
//! with those head dims runs the tiled SIMT kernels (forward, and a dq and a dk/dv kernel
//! backward); other head dims and `LORAFUSE_ATTENTION_KERNEL=simple` (A/B timing, debugging) run
//! the warp-per-row kernels.
//! Short query blocks (`tq <= SPLIT_MAX_TQ`) keep the split-key forward whatever the dtype.

use super::cpu::Dims;
use super::OP;
use crate::cuda_util::{self, ptx_module, PtxModule};
use crate::error::{shape_err, OpError};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor, WithDType};
use half::{bf16, f16};
use std::sync::OnceLock;

const MODULE: PtxModule = ptx_module!("attention");
/// Query (or key) rows per block: one warp each (`ATT_ROWS_PER_BLOCK` in the kernel source).
const ROWS_PER_BLOCK: usize = 4;
/// Warps sharing one query row in the split-key forward (`ATT_SPLIT` in the kernel source).
const SPLIT: u32 = 8;
/// Up to this many queries per head the forward splits each row's keys over a block of warps
/// (decode steps, short chunks: a warp per row would leave the card idle).
const SPLIT_MAX_TQ: usize = 16;

/// Keys of one tensor-core backward block (`ATT_TC_BK` in the kernel source).
const TC_TILE: usize = 64;
/// Threads of a tensor-core backward block (`ATT_TC_THREADS`).
const TC_THREADS: u32 = 128;

/// Warps of a tensor-core forward block (16 query rows each): the `NW` the kernel source
/// instantiates `att_tc::fwd` with, for either head dim.
const TC_FWD_WARPS: usize = 4;

/// Dynamic shared memory of a tensor-core backward block, bytes: `bwd_smem_bytes<D, QT>()` in
/// the kernel source (which traps on a launch with less), with QT = 64 for d = 64 and 32 for
/// d = 128: a 64-key tile, two query tiles of Q and of dO, the dS^T tile (16-bit elements, rows
/// padded by 8), and two buffers of the f32 lse and D rows.
fn tc_bwd_smem_bytes(d: usize) -> u32 {
    let qt = if d == 64 { 64 } else { 32 };
    (2 * (TC_TILE * (d + 8) + 4 * qt * (d + 8) + TC_TILE * (qt + 8)) + 16 * qt) as u32
}

/// The tensor-core kernels' head-dim suffix (`tc64`, `tc128`) when they take a call: 16-bit
/// storage (the mma operands), a head dim they are instantiated for, a positive finite scale (the
/// forward takes the row max before scaling), and not switched off by [`simple_forced`].
fn tensor_core_variant(dtype: DType, dm: &Dims) -> Option<&'static str> {
    let scale = dm.scale as f32; // as the kernels get it
    let scale_ok = scale.is_finite() && scale > 0.0;
    if simple_forced() || !scale_ok || !matches!(dtype, DType::BF16 | DType::F16) {
        return None;
    }
    match dm.d {
        64 => Some("tc64"),
        128 => Some("tc128"),
        _ => None,
    }
}

/// Query rows of a block and keys of a tile of the tiled f32 kernels (`ATT_F32_B`).
const F32_TILE: usize = 64;
/// Threads of a tiled f32 block (the kernels' `__launch_bounds__(256)`).
const F32_THREADS: u32 = 256;

/// The tiled f32 forward's head dim (`attention_fwd_f32t{64,128}_f32`) when it takes a call:
/// f32 storage, head dim 64 or 128, not `LORAFUSE_ATTENTION_KERNEL=simple`.
fn f32_tiled_variant(dtype: DType, dm: &Dims) -> Option<usize> {
    (dtype == DType::F32 && matches!(dm.d, 64 | 128) && !simple_forced()).then_some(dm.d)
}

/// `LORAFUSE_ATTENTION_KERNEL=simple`: every call takes the warp-per-row kernels (read once).
fn simple_forced() -> bool {
    static SIMPLE: OnceLock<bool> = OnceLock::new();
    *SIMPLE.get_or_init(|| {
        std::env::var("LORAFUSE_ATTENTION_KERNEL").is_ok_and(|v| v.eq_ignore_ascii_case("simple"))
    })
}

/// Dynamic shared memory of the tiled f32 forward: `att_f32_smem_bytes<D>()` in the kernel
/// source (Q, K, V tiles of 64 rows of d + 4 floats, P of 64 x 68).
fn f32_tiled_smem_bytes(d: usize) -> u32 {
    (4 * (3 * F32_TILE * (d + 4) + F32_TILE * (F32_TILE + 4))) as u32
}

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

/// The tensor-core kernels' grid: heads in x, tiles in y, so that blocks start tile by tile across
/// every head (heaviest first, see the kernels' comments). y is limited to 65535 blocks.
fn tile_grid(heads: usize, tiles: usize) -> Result<(u32, u32, u32)> {
    const MAX_Y: usize = 65535;
    if tiles > MAX_Y {
        return Err(shape_err(
            OP,
            format!("{tiles} tiles of one head exceed the grid's {MAX_Y}: sequence too long"),
        ));
    }
    let heads = u32::try_from(heads)
        .map_err(|_| shape_err(OP, format!("{heads} batch x heads exceed the grid")))?;
    Ok((heads.max(1), tiles.max(1) as u32, 1))
}

/// The tensor-core forward for `tc` and its launch. At d = 64 a grid of two full waves or more
/// of 128-row blocks takes `attention_fwd_tc64x2` (two 16-row tiles a warp, double-buffered K
/// and V: fewer shared-memory reads per product, for twice the registers); smaller grids keep
/// 64-row blocks, which leave fewer SMs idle at the causal tail.
fn tc_fwd_launch(
    dev: &CudaDevice,
    tc: &str,
    dtype: DType,
    dm: &Dims,
) -> Result<(String, LaunchConfig)> {
    let heads = dm.b * dm.hq;
    let threads = 32 * TC_FWD_WARPS as u32;
    if tc == "tc64" {
        let name = "attention_fwd_tc64x2";
        let tiles = dm.tq.div_ceil(2 * 16 * TC_FWD_WARPS);
        let (per_sm, sms) = MODULE.kernel_for(dev, name, dtype, OP)?.fit(threads, OP)?;
        let wave = per_sm as usize * sms as usize;
        if wave > 0 && heads * tiles >= 2 * wave {
            let cfg = LaunchConfig {
                grid_dim: tile_grid(heads, tiles)?,
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            return Ok((name.to_string(), cfg));
        }
    }
    let cfg = LaunchConfig {
        grid_dim: tile_grid(heads, dm.tq.div_ceil(16 * TC_FWD_WARPS))?,
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((format!("attention_fwd_{tc}"), cfg))
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
            ("attention_fwd_split".to_string(), cfg)
        } else if let Some(tc) = tensor_core_variant(T::DTYPE, &dm) {
            tc_fwd_launch(dev, tc, T::DTYPE, &dm)?
        } else if let Some(d) = f32_tiled_variant(T::DTYPE, &dm) {
            let name = format!("attention_fwd_f32t{d}");
            let smem = f32_tiled_smem_bytes(d);
            MODULE
                .kernel_for(dev, &name, T::DTYPE, OP)?
                .allow_dynamic_shared(smem, OP)?;
            let cfg = LaunchConfig {
                grid_dim: tile_grid(dm.b * dm.hq, dm.tq.div_ceil(F32_TILE))?,
                block_dim: (F32_THREADS, 1, 1),
                shared_mem_bytes: smem,
            };
            (name, cfg)
        } else {
            (
                "attention_fwd".to_string(),
                rows_launch(dm.tq, dm.b * dm.hq),
            )
        };
        let kern = MODULE.kernel_for(dev, &name, T::DTYPE, OP)?;
        let mut b = kern.builder();
        b.arg(&q).arg(&k).arg(&v).arg(&o).arg(&lse).arg(&a);
        // SAFETY: matches `attention_fwd{,_split,_tc64,_tc64x2,_tc128,_f32t64,_f32t128}_*(const
        // T*, const T*, const T*, T*, float*, AttDims)`; q/o hold b*hq*tq*d elements, k/v
        // b*hkv*tk*d, lse b*hq*tq; a warp (or a block of SPLIT warps) per query row, a
        // tensor-core block of TC_FWD_WARPS warps per 16 * TC_FWD_WARPS rows (twice that for
        // tc64x2: tc_fwd_launch), or a 256-thread f32 block per 64 rows with the dynamic shared
        // memory its source asks for; d matches the kernel's head dim (`tensor_core_variant`,
        // `f32_tiled_variant`).
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
    let tiled = tensor_core_variant(T::DTYPE, &dm)
        .map(TiledBwd::TensorCore)
        .or_else(|| f32_tiled_variant(T::DTYPE, &dm).map(TiledBwd::F32));
    if let Some(kind) = tiled {
        bwd_tiled::<T>(
            kind,
            dev,
            (&q, &k, &v, &o, &g, &lse),
            &mut delta,
            &mut out,
            a,
            dm,
        )?;
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

/// Which tiled backward takes a call: the tensor-core kernels (`tc64`, `tc128`) or the f32 SIMT
/// ones for head dim 64 or 128.
#[derive(Clone, Copy)]
enum TiledBwd {
    TensorCore(&'static str),
    F32(usize),
}

/// Dynamic shared memory of the tiled f32 backward kernels: `att_f32_bwd_smem_bytes<D>()` in the
/// kernel source (four 64-row tiles of d + 4 floats, two of 64 + 4, lse and D of 64 rows).
fn f32_bwd_smem_bytes(d: usize) -> u32 {
    (4 * (4 * F32_TILE * (d + 4) + 2 * F32_TILE * (F32_TILE + 4) + 2 * F32_TILE)) as u32
}

/// The tiled backward: `D = rowsum(dO * O)`, then the main pass into f32 buffers (the tensor-core
/// kernel: dq by atomics into a zeroed buffer and dk/dv per query head; f32: a dq kernel and a
/// dk/dv kernel per query head, no atomics), then one pass that sums the dk/dv partials over each
/// GQA group and writes the packed `[dq | dk | dv]`.
#[allow(clippy::type_complexity)]
fn bwd_tiled<T: CudaDType + DeviceRepr + WithDType>(
    kind: TiledBwd,
    dev: &CudaDevice,
    (q, k, v, o, g, lse): (
        &CudaView<'_, T>,
        &CudaView<'_, T>,
        &CudaView<'_, T>,
        &CudaView<'_, T>,
        &CudaView<'_, T>,
        &CudaView<'_, f32>,
    ),
    delta: &mut CudaSlice<f32>,
    out: &mut CudaSlice<T>,
    a: AttDims,
    dm: Dims,
) -> Result<()> {
    let nq = dm.b * dm.hq * dm.tq * dm.d;
    // dk and dv of every query head, before the sum over its group
    let n_part = dm.b * dm.hq * dm.tk * dm.d;
    let mut dq_acc = match kind {
        TiledBwd::TensorCore(_) => cuda_util::alloc_zeros::<f32>(dev, nq.max(1))?,
        // the f32 dq kernel writes every row
        TiledBwd::F32(_) => cuda_util::alloc::<f32>(dev, nq.max(1))?,
    };
    let mut dkv_part = cuda_util::alloc::<f32>(dev, (2 * n_part).max(1))?;
    {
        let kern = MODULE.kernel_for(dev, "attention_bwd_delta", T::DTYPE, OP)?;
        let mut b = kern.builder();
        b.arg(o).arg(g).arg(&mut *delta).arg(&a);
        // SAFETY: matches `attention_bwd_delta_*(const T* o, const T* dout, float* delta,
        // AttDims)`; o/dout hold b*hq*tq*d elements, delta b*hq*tq; a warp per row.
        unsafe { b.launch(rows_launch(dm.tq, dm.b * dm.hq)) }.map_err(cuda_util::driver_err(OP))?;
    }
    // (kernel, blocks a head, threads, dynamic shared memory): the tensor-core pass takes a block
    // per 64 keys; the f32 one a block per 64 query rows (dq) then one per 64 keys (dk, dv)
    let passes = match kind {
        TiledBwd::TensorCore(tc) => vec![(
            format!("attention_bwd_{tc}"),
            dm.tk.div_ceil(TC_TILE),
            TC_THREADS,
            tc_bwd_smem_bytes(dm.d),
        )],
        TiledBwd::F32(d) => vec![
            (
                format!("attention_bwd_dq_f32t{d}"),
                dm.tq.div_ceil(F32_TILE),
                F32_THREADS,
                f32_bwd_smem_bytes(d),
            ),
            (
                format!("attention_bwd_dkv_f32t{d}"),
                dm.tk.div_ceil(F32_TILE),
                F32_THREADS,
                f32_bwd_smem_bytes(d),
            ),
        ],
    };
    for (name, tiles, threads, smem) in passes {
        let kern = MODULE.kernel_for(dev, &name, T::DTYPE, OP)?;
        kern.allow_dynamic_shared(smem, OP)?;
        let mut b = kern.builder();
        b.arg(q)
            .arg(k)
            .arg(v)
            .arg(g)
            .arg(lse)
            .arg(&*delta)
            .arg(&mut dq_acc)
            .arg(&mut dkv_part)
            .arg(&a);
        let cfg = LaunchConfig {
            grid_dim: tile_grid(dm.b * dm.hq, tiles)?,
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem,
        };
        // SAFETY: matches `attention_bwd_{tc64,tc128}_*` and
        // `attention_bwd_{dq,dkv}_f32t{64,128}_f32` (const T* q, k, v, dout, const float* lse,
        // const float* delta, float* dq_acc, float* dkv_part, AttDims); q/dout hold b*hq*tq*d
        // elements, k/v b*hkv*tk*d, lse/delta b*hq*tq, dq_acc b*hq*tq*d floats (zeroed for the
        // tensor-core kernel's atomics; the f32 dq kernel writes every row), dkv_part
        // 2*b*hq*tk*d (every key row of every query head written); blocks, threads and dynamic
        // shared memory as each kernel's source asks, and d matches the kernel's head dim
        // (`tensor_core_variant`, `f32_tiled_variant`).
        unsafe { b.launch(cfg) }.map_err(cuda_util::driver_err(OP))?;
    }
    {
        let kern = MODULE.kernel_for(dev, "attention_bwd_finish", T::DTYPE, OP)?;
        let mut b = kern.builder();
        b.arg(&dq_acc).arg(&dkv_part).arg(&mut *out).arg(&a);
        let total = nq + 2 * dm.b * dm.hkv * dm.tk * dm.d;
        // SAFETY: matches `attention_bwd_finish_*(const float* dq_acc, const float* dkv_part,
        // T* out, AttDims)`; out holds nq + 2*b*hkv*tk*d elements, the kernel grid-strides.
        unsafe { b.launch(cuda_util::elementwise_launch(total)) }
            .map_err(cuda_util::driver_err(OP))?;
    }
    Ok(())
}
