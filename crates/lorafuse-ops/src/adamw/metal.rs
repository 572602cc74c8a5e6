//! AdamW Metal launcher for `adamw.metal`: one dispatch per tensor, in place, on Candle's encoder.

use super::{Coeffs, OP};
use crate::error::shape_err;
use crate::metal_util::{self, metal_module, Arg, MetalModule};
use candle_core::{Device, Layout, MetalStorage, Result, Storage, StorageRef, Tensor, Var};

const MODULE: MetalModule = metal_module!("adamw");

/// The Metal storage behind a guard, or an error.
fn metal<'a>(s: &'a StorageRef<'_>) -> Result<&'a MetalStorage> {
    match &**s {
        Storage::Metal(s) => Ok(s),
        _ => Err(shape_err(OP, "tensor is not on the GPU")),
    }
}

/// A buffer the kernel updates in place, at the layout's first element.
fn in_place<'a>(s: &'a MetalStorage, l: &Layout) -> Result<Arg<'a>> {
    match metal_util::input(s, l, OP)? {
        Arg::In(b, off) => Ok(Arg::Out(b, off)),
        other => Ok(other),
    }
}

/// Steps the listed Metal tensors whose gradient shares the parameter's dtype (f32, bf16, f16);
/// returns the indices left for the reference.
pub(super) fn step(
    c: &Coeffs,
    idx: &[usize],
    params: &[Var],
    grads: &[Tensor],
    m: &[Var],
    v: &[Var],
) -> Result<Vec<usize>> {
    let mut rest = Vec::new();
    for &i in idx {
        let (Device::Metal(dev), dt) = (params[i].device(), params[i].dtype()) else {
            rest.push(i);
            continue;
        };
        if grads[i].dtype() != dt
            || !matches!(
                dt,
                candle_core::DType::F32 | candle_core::DType::BF16 | candle_core::DType::F16
            )
            || params[i].elem_count() == 0
        {
            rest.push(i);
            continue;
        }
        let n = params[i].elem_count();
        let p = MODULE.pipeline_for(dev, "adamw_fwd", dt, OP)?;
        // Read guards for the whole encoding: no Rust code touches these buffers meanwhile (the
        // exclusion `Var::set` relies on); the kernel writes p, m and v in place.
        let (ps, pl) = params[i].storage_and_layout();
        let (gs, gl) = grads[i].storage_and_layout();
        let (ms, ml) = m[i].storage_and_layout();
        let (vs, vl) = v[i].storage_and_layout();
        let args = [
            in_place(metal(&ps)?, pl)?,
            metal_util::input(metal(&gs)?, gl, OP)?,
            in_place(metal(&ms)?, ml)?,
            in_place(metal(&vs)?, vl)?,
            Arg::U32(metal_util::to_u32(n, "elements", OP)?),
            Arg::F32(c.b1),
            Arg::F32(c.one_minus_b1),
            Arg::F32(c.b2),
            Arg::F32(c.one_minus_b2),
            Arg::F32(c.inv_bc1),
            Arg::F32(c.inv_bc2),
            Arg::F32(c.eps),
            Arg::F32(c.decay),
            Arg::F32(c.lr),
        ];
        let (groups, threads) = metal_util::elementwise(n);
        metal_util::dispatch(dev, &p, &args, groups, threads)?;
    }
    Ok(rest)
}
