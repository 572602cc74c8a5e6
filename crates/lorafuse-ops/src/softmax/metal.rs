//! Softmax Metal launchers for the kernels in `softmax.metal`.

use candle_core::backend::BackendStorage;
use candle_core::{Layout, MetalStorage, Result};

use crate::cpu_util::layout_rows_cols;
use crate::metal_util::{self, metal_module, Arg, MetalModule};

const MODULE: MetalModule = metal_module!("softmax");
const OP: &str = "softmax";

/// `y = softmax(x)` over the last dimension, one threadgroup per row.
pub(super) fn fwd(x: &MetalStorage, xl: &Layout) -> Result<MetalStorage> {
    let (dev, dtype) = (x.device(), x.dtype());
    let (rows, n) = layout_rows_cols(xl);
    let p = MODULE.pipeline_for(dev, "softmax_fwd", dtype, OP)?;
    let y = metal_util::output(dev, rows * n, dtype, OP)?;
    let args = [
        metal_util::input(x, xl, OP)?,
        Arg::Out(&y, 0),
        Arg::U32(metal_util::to_u32(n, "row length", OP)?),
    ];
    metal_util::dispatch(dev, &p, &args, rows, metal_util::row_threads(&p, n))?;
    Ok(metal_util::storage(y, dev, rows * n, dtype))
}

/// `dx = y * (dy - sum(dy * y))`, one threadgroup per row.
pub(super) fn bwd(
    y: &MetalStorage,
    yl: &Layout,
    dy: &MetalStorage,
    dyl: &Layout,
) -> Result<MetalStorage> {
    let (dev, dtype) = (y.device(), y.dtype());
    let (rows, n) = layout_rows_cols(yl);
    let p = MODULE.pipeline_for(dev, "softmax_bwd", dtype, OP)?;
    let dx = metal_util::output(dev, rows * n, dtype, OP)?;
    let args = [
        metal_util::input(y, yl, OP)?,
        metal_util::input(dy, dyl, OP)?,
        Arg::Out(&dx, 0),
        Arg::U32(metal_util::to_u32(n, "row length", OP)?),
    ];
    metal_util::dispatch(dev, &p, &args, rows, metal_util::row_threads(&p, n))?;
    Ok(metal_util::storage(dx, dev, rows * n, dtype))
}
