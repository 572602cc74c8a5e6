//! CUDA host code (kernels in progress: dispatch sends CUDA tensors to the reference meanwhile).

use super::{Reduction, Saved, OP};
use crate::error::OpError;
use candle_core::{CudaStorage, Layout, Result, Shape};

fn pending() -> candle_core::Error {
    OpError::Kernel {
        op: OP,
        msg: "no CUDA kernel yet".into(),
    }
    .into()
}

pub(super) fn fwd(
    _ls: &CudaStorage,
    _ll: &Layout,
    _ts: &CudaStorage,
    _tl: &Layout,
    _ignore: i64,
    _red: Reduction,
) -> Result<(CudaStorage, Shape, Saved)> {
    Err(pending())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn bwd(
    _ls: &CudaStorage,
    _ll: &Layout,
    _ts: &CudaStorage,
    _tl: &Layout,
    _gs: &CudaStorage,
    _gl: &Layout,
    _saved: &Saved,
    _ignore: i64,
    _red: Reduction,
) -> Result<CudaStorage> {
    Err(pending())
}
