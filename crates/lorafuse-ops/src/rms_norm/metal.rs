//! RMSNorm Metal launchers for the kernels in `rms_norm.metal`.

use candle_core::backend::BackendStorage;
use candle_core::{Layout, MetalStorage, Result};

use crate::cpu_util::layout_rows_cols;
use crate::metal_util::{self, metal_module, Arg, MetalModule};

const MODULE: MetalModule = metal_module!("rms_norm");
const OP: &str = "rms_norm";

/// `y = x * rstd * w`, one threadgroup per row.
pub(super) fn fwd(
    eps: f32,
    x: &MetalStorage,
    xl: &Layout,
    w: &MetalStorage,
    wl: &Layout,
) -> Result<MetalStorage> {
    let dev = x.device();
    let dtype = x.dtype();
    let (rows, n) = layout_rows_cols(xl);
    let p = MODULE.pipeline_for(dev, "rms_norm_fwd", dtype, OP)?;
    let y = metal_util::output(dev, rows * n, dtype, OP)?;
    let args = [
        metal_util::input(x, xl, OP)?,
        metal_util::input(w, wl, OP)?,
        Arg::Out(&y, 0),
        Arg::U32(metal_util::to_u32(n, "hidden size", OP)?),
        Arg::F32(eps),
    ];
    metal_util::dispatch(dev, &p, &args, rows, metal_util::row_threads(&p, n))?;
    Ok(metal_util::storage(y, dev, rows * n, dtype))
}

/// `[dx; dw]` packed as `[rows + want_dw, n]`.
pub(super) fn bwd(
    eps: f32,
    want_dw: bool,
    (x, xl): (&MetalStorage, &Layout),
    (w, wl): (&MetalStorage, &Layout),
    (dy, dyl): (&MetalStorage, &Layout),
) -> Result<MetalStorage> {
    let dev = x.device();
    let dtype = x.dtype();
    let (rows, n) = layout_rows_cols(xl);
    let count = (rows + usize::from(want_dw)) * n;
    let out = metal_util::output(dev, count, dtype, OP)?;
    let rstd = metal_util::output(dev, rows, candle_core::DType::F32, OP)?;
    let n_u = metal_util::to_u32(n, "hidden size", OP)?;
    let p = MODULE.pipeline_for(dev, "rms_norm_bwd", dtype, OP)?;
    let args = [
        metal_util::input(x, xl, OP)?,
        metal_util::input(w, wl, OP)?,
        metal_util::input(dy, dyl, OP)?,
        Arg::Out(&out, 0),
        Arg::Out(&rstd, 0),
        Arg::U32(n_u),
        Arg::F32(eps),
    ];
    metal_util::dispatch(dev, &p, &args, rows, metal_util::row_threads(&p, n))?;
    if want_dw {
        let p = MODULE.pipeline_for(dev, "rms_norm_bwd_dw", dtype, OP)?;
        let args = [
            metal_util::input(x, xl, OP)?,
            metal_util::input(dy, dyl, OP)?,
            Arg::In(&rstd, 0),
            Arg::Out(&out, rows * n * dtype.size_in_bytes()),
            Arg::U32(metal_util::to_u32(rows, "rows", OP)?),
            Arg::U32(n_u),
        ];
        let (groups, threads) = metal_util::elementwise(n);
        metal_util::dispatch(dev, &p, &args, groups, threads)?;
    }
    Ok(metal_util::storage(out, dev, count, dtype))
}
