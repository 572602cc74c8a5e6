//! Attention Metal launchers for the kernels in `attention.metal`.

use super::cpu::Dims;
use super::{GPU_MAX_HEAD_DIM, OP};
use crate::error::shape_err;
use crate::metal_util::{self, metal_module, Arg, MetalModule};
use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, MetalStorage, Result, Storage, Tensor};

const MODULE: MetalModule = metal_module!("attention");
/// Rows per threadgroup: one 32-wide SIMD group each (`ATT_ROWS` in the kernel source).
const ROWS: usize = 4;

/// The seven size arguments every kernel takes after its buffers.
fn dim_args(dm: Dims) -> Result<[Arg<'static>; 7]> {
    if dm.d == 0 || dm.d > GPU_MAX_HEAD_DIM {
        return Err(shape_err(
            OP,
            format!("head dim {} outside 1..={GPU_MAX_HEAD_DIM}", dm.d),
        ));
    }
    let u = |n: usize, what: &str| metal_util::to_u32(n, what, OP).map(Arg::U32);
    Ok([
        u(dm.b, "batch")?,
        u(dm.hq, "query heads")?,
        u(dm.hkv, "kv heads")?,
        u(dm.tq, "query length")?,
        u(dm.tk, "key length")?,
        u(dm.d, "head dim")?,
        Arg::F32(dm.scale as f32),
    ])
}

/// `(o, lse)`: the output and the per-row logsumexp (f32).
pub(super) fn fwd(
    (qs, ql): (&MetalStorage, &Layout),
    (ks, kl): (&MetalStorage, &Layout),
    (vs, vl): (&MetalStorage, &Layout),
    dm: Dims,
) -> Result<(MetalStorage, Tensor)> {
    let (dev, dtype) = (qs.device(), qs.dtype());
    let rows = dm.b * dm.hq * dm.tq;
    let p = MODULE.pipeline_for(dev, "attention_fwd", dtype, OP)?;
    let o = metal_util::output(dev, rows * dm.d, dtype, OP)?;
    let lse = metal_util::output(dev, rows, DType::F32, OP)?;
    let mut args = vec![
        metal_util::input(qs, ql, OP)?,
        metal_util::input(ks, kl, OP)?,
        metal_util::input(vs, vl, OP)?,
        Arg::Out(&o, 0),
        Arg::Out(&lse, 0),
    ];
    args.extend(dim_args(dm)?);
    let groups = dm.tq.div_ceil(ROWS) * dm.b * dm.hq;
    metal_util::dispatch(dev, &p, &args, groups, 32 * ROWS)?;
    let lse = metal_util::storage(lse, dev, rows, DType::F32);
    let lse = Tensor::from_storage(Storage::Metal(lse), rows, BackpropOp::none(), false);
    Ok((metal_util::storage(o, dev, rows * dm.d, dtype), lse))
}

/// Packed `[dq | dk | dv]`.
pub(super) fn bwd(
    (qs, ql): (&MetalStorage, &Layout),
    (ks, kl): (&MetalStorage, &Layout),
    (vs, vl): (&MetalStorage, &Layout),
    o: &Tensor,
    g: &Tensor,
    lse: &Tensor,
    dm: Dims,
) -> Result<MetalStorage> {
    let (dev, dtype) = (qs.device(), qs.dtype());
    let rows = dm.b * dm.hq * dm.tq;
    let (nq, nk) = (rows * dm.d, dm.b * dm.hkv * dm.tk * dm.d);
    let (os, ol) = o.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (ls, ll) = lse.storage_and_layout();
    let (Storage::Metal(os), Storage::Metal(gs), Storage::Metal(ls)) = (&*os, &*gs, &*ls) else {
        return Err(shape_err(OP, "saved tensors are not on the GPU"));
    };
    let out = metal_util::output(dev, nq + 2 * nk, dtype, OP)?;
    let delta = metal_util::output(dev, rows, DType::F32, OP)?;
    let esz = dtype.size_in_bytes();
    let p = MODULE.pipeline_for(dev, "attention_bwd_dq", dtype, OP)?;
    let mut args = vec![
        metal_util::input(qs, ql, OP)?,
        metal_util::input(ks, kl, OP)?,
        metal_util::input(vs, vl, OP)?,
        metal_util::input(os, ol, OP)?,
        metal_util::input(gs, gl, OP)?,
        metal_util::input(ls, ll, OP)?,
        Arg::Out(&delta, 0),
        Arg::Out(&out, 0),
    ];
    args.extend(dim_args(dm)?);
    metal_util::dispatch(
        dev,
        &p,
        &args,
        dm.tq.div_ceil(ROWS) * dm.b * dm.hq,
        32 * ROWS,
    )?;
    let p = MODULE.pipeline_for(dev, "attention_bwd_dkv", dtype, OP)?;
    let mut args = vec![
        metal_util::input(qs, ql, OP)?,
        metal_util::input(ks, kl, OP)?,
        metal_util::input(vs, vl, OP)?,
        metal_util::input(gs, gl, OP)?,
        metal_util::input(ls, ll, OP)?,
        Arg::In(&delta, 0),
        Arg::Out(&out, nq * esz),
        Arg::Out(&out, (nq + nk) * esz),
    ];
    args.extend(dim_args(dm)?);
    metal_util::dispatch(
        dev,
        &p,
        &args,
        dm.tk.div_ceil(ROWS) * dm.b * dm.hkv,
        32 * ROWS,
    )?;
    Ok(metal_util::storage(out, dev, nq + 2 * nk, dtype))
}
