//! RoPE Metal launcher for the kernels in `rope.metal`.

use candle_core::backend::BackendStorage;
use candle_core::{Layout, MetalStorage, Result};

use crate::metal_util::{self, metal_module, Arg, MetalModule};

const MODULE: MetalModule = metal_module!("rope");
const OP: &str = "rope";

/// Rotates `x` (`[.., t, d]`) by `cos`/`sin` (`[t, d/2]`); `inverse` runs `rope_bwd_*`.
pub(super) fn rotate(
    (t, d): (usize, usize),
    interleaved: bool,
    inverse: bool,
    (x, xl): (&MetalStorage, &Layout),
    (cos, cl): (&MetalStorage, &Layout),
    (sin, sl): (&MetalStorage, &Layout),
) -> Result<MetalStorage> {
    let (dev, dtype) = (x.device(), x.dtype());
    let n = xl.shape().elem_count();
    let base = if inverse { "rope_bwd" } else { "rope_fwd" };
    let p = MODULE.pipeline_for(dev, base, dtype, OP)?;
    let y = metal_util::output(dev, n, dtype, OP)?;
    let args = [
        metal_util::input(x, xl, OP)?,
        metal_util::input(cos, cl, OP)?,
        metal_util::input(sin, sl, OP)?,
        Arg::Out(&y, 0),
        Arg::U32(metal_util::to_u32(t, "sequence length", OP)?),
        Arg::U32(metal_util::to_u32(d, "head dim", OP)?),
        Arg::U32(metal_util::to_u32(n / 2, "pairs", OP)?),
        Arg::U32(u32::from(interleaved)),
    ];
    let (groups, threads) = metal_util::elementwise(n / 2);
    metal_util::dispatch(dev, &p, &args, groups, threads)?;
    Ok(metal_util::storage(y, dev, n, dtype))
}
