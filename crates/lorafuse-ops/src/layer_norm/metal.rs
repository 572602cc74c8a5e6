//! LayerNorm Metal launchers for the kernels in `layer_norm.metal`.

use candle_core::backend::BackendStorage;
use candle_core::{DType, Layout, MetalStorage, Result};

use crate::cpu_util::layout_rows_cols;
use crate::metal_util::{self, metal_module, Arg, MetalModule};

const MODULE: MetalModule = metal_module!("layer_norm");
const OP: &str = "layer_norm";

type In<'a> = (&'a MetalStorage, &'a Layout);

/// `y = (x - mean) * rstd * w (+ b)`, one threadgroup per row.
pub(super) fn fwd(eps: f32, (x, xl): In, (w, wl): In, b: Option<In>) -> Result<MetalStorage> {
    let (dev, dtype) = (x.device(), x.dtype());
    let (rows, n) = layout_rows_cols(xl);
    let p = MODULE.pipeline_for(dev, "layer_norm_fwd", dtype, OP)?;
    let y = metal_util::output(dev, rows * n, dtype, OP)?;
    // Without a bias the kernel never reads buffer 2; the weight stands in for it.
    let (bias, has_bias) = match b {
        Some((b, bl)) => (metal_util::input(b, bl, OP)?, 1),
        None => (metal_util::input(w, wl, OP)?, 0),
    };
    let args = [
        metal_util::input(x, xl, OP)?,
        metal_util::input(w, wl, OP)?,
        bias,
        Arg::U32(has_bias),
        Arg::Out(&y, 0),
        Arg::U32(metal_util::to_u32(n, "hidden size", OP)?),
        Arg::F32(eps),
    ];
    metal_util::dispatch(dev, &p, &args, rows, metal_util::row_threads(&p, n))?;
    Ok(metal_util::storage(y, dev, rows * n, dtype))
}

/// `[dx; dw?; db?]` packed as `[rows + want_dw + want_db, n]`.
pub(super) fn bwd(
    eps: f32,
    (want_dw, want_db): (bool, bool),
    (x, xl): In,
    (w, wl): In,
    (dy, dyl): In,
) -> Result<MetalStorage> {
    let (dev, dtype) = (x.device(), x.dtype());
    let (rows, n) = layout_rows_cols(xl);
    let count = (rows + usize::from(want_dw) + usize::from(want_db)) * n;
    let out = metal_util::output(dev, count, dtype, OP)?;
    // (mean, rstd) per row, read back by the dw kernel as float2.
    let stats = metal_util::output(dev, 2 * rows, DType::F32, OP)?;
    let n_u = metal_util::to_u32(n, "hidden size", OP)?;
    let rows_u = metal_util::to_u32(rows, "rows", OP)?;
    let p = MODULE.pipeline_for(dev, "layer_norm_bwd", dtype, OP)?;
    let args = [
        metal_util::input(x, xl, OP)?,
        metal_util::input(w, wl, OP)?,
        metal_util::input(dy, dyl, OP)?,
        Arg::Out(&out, 0),
        Arg::Out(&stats, 0),
        Arg::U32(n_u),
        Arg::F32(eps),
    ];
    metal_util::dispatch(dev, &p, &args, rows, metal_util::row_threads(&p, n))?;
    let (groups, threads) = metal_util::elementwise(n);
    let mut next = rows;
    if want_dw {
        let p = MODULE.pipeline_for(dev, "layer_norm_bwd_dw", dtype, OP)?;
        let args = [
            metal_util::input(x, xl, OP)?,
            metal_util::input(dy, dyl, OP)?,
            Arg::In(&stats, 0),
            Arg::Out(&out, next * n * dtype.size_in_bytes()),
            Arg::U32(rows_u),
            Arg::U32(n_u),
        ];
        metal_util::dispatch(dev, &p, &args, groups, threads)?;
        next += 1;
    }
    if want_db {
        let p = MODULE.pipeline_for(dev, "layer_norm_bwd_db", dtype, OP)?;
        let args = [
            metal_util::input(dy, dyl, OP)?,
            Arg::Out(&out, next * n * dtype.size_in_bytes()),
            Arg::U32(rows_u),
            Arg::U32(n_u),
        ];
        metal_util::dispatch(dev, &p, &args, groups, threads)?;
    }
    Ok(metal_util::storage(out, dev, count, dtype))
}
