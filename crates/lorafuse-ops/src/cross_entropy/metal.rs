//! Cross-entropy Metal launchers for the kernels in `cross_entropy.metal` (targets arrive as i64).

use super::{Reduction, Saved, OP};
use crate::error::shape_err;
use crate::metal_util::{self, metal_module, Arg, MetalModule};
use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, MetalStorage, Result, Shape, Storage, Tensor};

const MODULE: MetalModule = metal_module!("cross_entropy");

fn dims2(l: &Layout) -> Result<(usize, usize)> {
    match l.dims() {
        [n, v] if *n > 0 && *v > 0 => Ok((*n, *v)),
        d => Err(shape_err(
            OP,
            format!("logits must be a non-empty [n, vocab], got {d:?}"),
        )),
    }
}

/// The ignore index as the kernels' 32-bit `int` (dispatch sends others to the reference).
fn ignore_u32(ignore: i64) -> Result<u32> {
    i32::try_from(ignore)
        .map(|v| v as u32)
        .map_err(|_| shape_err(OP, format!("ignore_index {ignore} does not fit 32 bits")))
}

/// The loss (reduced as asked) and the statistics the backward needs.
pub(super) fn fwd(
    ls: &MetalStorage,
    ll: &Layout,
    ts: &MetalStorage,
    tl: &Layout,
    ignore: i64,
    red: Reduction,
) -> Result<(MetalStorage, Shape, Saved)> {
    let (dev, dtype) = (ls.device(), ls.dtype());
    let (n, v) = dims2(ll)?;
    if tl.dims() != [n] || ts.dtype() != DType::I64 {
        return Err(shape_err(
            OP,
            format!(
                "{n} rows of logits, targets {:?} {:?}",
                tl.dims(),
                ts.dtype()
            ),
        ));
    }
    let p = MODULE.pipeline_for(dev, "cross_entropy_fwd", dtype, OP)?;
    let loss = metal_util::output(dev, n, DType::F32, OP)?;
    let lse = metal_util::output(dev, n, DType::F32, OP)?;
    let out = metal_util::output(dev, 1, DType::F32, OP)?;
    let count = metal_util::output(dev, 1, DType::F32, OP)?;
    let (n_u, v_u, ign) = (
        metal_util::to_u32(n, "rows", OP)?,
        metal_util::to_u32(v, "vocabulary", OP)?,
        ignore_u32(ignore)?,
    );
    let args = [
        metal_util::input(ls, ll, OP)?,
        metal_util::input(ts, tl, OP)?,
        Arg::Out(&loss, 0),
        Arg::Out(&lse, 0),
        Arg::U32(v_u),
        Arg::U32(ign),
    ];
    metal_util::dispatch(dev, &p, &args, n, metal_util::row_threads(&p, v))?;
    let p = MODULE.pipeline(dev, "cross_entropy_fwd_reduce", OP)?;
    let args = [
        Arg::In(&loss, 0),
        metal_util::input(ts, tl, OP)?,
        Arg::Out(&out, 0),
        Arg::Out(&count, 0),
        Arg::U32(n_u),
        Arg::U32(ign),
        Arg::U32(u32::from(red == Reduction::Mean)),
    ];
    metal_util::dispatch(dev, &p, &args, 1, metal_util::row_threads(&p, 4 * n))?;
    let tensor = |b, len| {
        Tensor::from_storage(
            Storage::Metal(metal_util::storage(b, dev, len, DType::F32)),
            len,
            BackpropOp::none(),
            false,
        )
    };
    let saved = Saved {
        lse: tensor(lse, n),
        count: tensor(count, 1),
    };
    Ok(match red {
        Reduction::None => (
            metal_util::storage(loss, dev, n, DType::F32),
            Shape::from(n),
            saved,
        ),
        _ => (
            metal_util::storage(out, dev, 1, DType::F32),
            Shape::from(()),
            saved,
        ),
    })
}

/// `dlogits = (softmax - onehot) * coef`, in the logits' dtype.
#[allow(clippy::too_many_arguments)]
pub(super) fn bwd(
    ls: &MetalStorage,
    ll: &Layout,
    ts: &MetalStorage,
    tl: &Layout,
    gs: &MetalStorage,
    gl: &Layout,
    saved: &Saved,
    ignore: i64,
    red: Reduction,
) -> Result<MetalStorage> {
    let (dev, dtype) = (ls.device(), ls.dtype());
    let (n, v) = dims2(ll)?;
    let per_row = red == Reduction::None;
    if gl.shape().elem_count() != if per_row { n } else { 1 } || saved.lse.dims() != [n] {
        return Err(shape_err(
            OP,
            format!("backward of {n} rows got gradient {:?}", gl.dims()),
        ));
    }
    let (lse_s, lse_l) = saved.lse.storage_and_layout();
    let (count_s, count_l) = saved.count.storage_and_layout();
    let (Storage::Metal(lse_s), Storage::Metal(count_s)) = (&*lse_s, &*count_s) else {
        return Err(shape_err(OP, "saved statistics are not on the GPU"));
    };
    let p = MODULE.pipeline_for(dev, "cross_entropy_bwd", dtype, OP)?;
    let d = metal_util::output(dev, n * v, dtype, OP)?;
    let args = [
        metal_util::input(ls, ll, OP)?,
        metal_util::input(ts, tl, OP)?,
        metal_util::input(gs, gl, OP)?,
        metal_util::input(lse_s, lse_l, OP)?,
        metal_util::input(count_s, count_l, OP)?,
        Arg::Out(&d, 0),
        Arg::U32(metal_util::to_u32(v, "vocabulary", OP)?),
        Arg::U32(ignore_u32(ignore)?),
        Arg::U32(u32::from(per_row)),
        Arg::U32(u32::from(red == Reduction::Mean)),
    ];
    metal_util::dispatch(dev, &p, &args, n, metal_util::row_threads(&p, v))?;
    Ok(metal_util::storage(d, dev, n * v, dtype))
}
