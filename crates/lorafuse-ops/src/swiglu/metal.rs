//! SwiGLU Metal launchers for the kernels in `swiglu.metal`.

use candle_core::backend::BackendStorage;
use candle_core::{Layout, MetalStorage, Result};

use crate::metal_util::{self, metal_module, Arg, MetalModule};

const MODULE: MetalModule = metal_module!("swiglu");
const OP: &str = "swiglu";

/// `y = silu(gate) * up`.
pub(super) fn fwd(
    g: &MetalStorage,
    gl: &Layout,
    u: &MetalStorage,
    ul: &Layout,
) -> Result<MetalStorage> {
    let (dev, dtype) = (g.device(), g.dtype());
    let n = gl.shape().elem_count();
    let p = MODULE.pipeline_for(dev, "swiglu_fwd", dtype, OP)?;
    let y = metal_util::output(dev, n, dtype, OP)?;
    let args = [
        metal_util::input(g, gl, OP)?,
        metal_util::input(u, ul, OP)?,
        Arg::Out(&y, 0),
        Arg::U32(metal_util::to_u32(n, "elements", OP)?),
    ];
    let (groups, threads) = metal_util::elementwise(n);
    metal_util::dispatch(dev, &p, &args, groups, threads)?;
    Ok(metal_util::storage(y, dev, n, dtype))
}

/// `[dgate; dup]` packed as `[2, n]`.
pub(super) fn bwd(
    (g, gl): (&MetalStorage, &Layout),
    (u, ul): (&MetalStorage, &Layout),
    (dy, dyl): (&MetalStorage, &Layout),
) -> Result<MetalStorage> {
    let (dev, dtype) = (g.device(), g.dtype());
    let n = gl.shape().elem_count();
    let p = MODULE.pipeline_for(dev, "swiglu_bwd", dtype, OP)?;
    let out = metal_util::output(dev, 2 * n, dtype, OP)?;
    let args = [
        metal_util::input(g, gl, OP)?,
        metal_util::input(u, ul, OP)?,
        metal_util::input(dy, dyl, OP)?,
        Arg::Out(&out, 0),
        Arg::U32(metal_util::to_u32(n, "elements", OP)?),
    ];
    let (groups, threads) = metal_util::elementwise(n);
    metal_util::dispatch(dev, &p, &args, groups, threads)?;
    Ok(metal_util::storage(out, dev, 2 * n, dtype))
}
