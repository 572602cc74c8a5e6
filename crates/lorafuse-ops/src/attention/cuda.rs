//! CUDA host code (kernels in progress: dispatch sends CUDA tensors to the reference meanwhile).

use super::cpu::Dims;
use super::OP;
use crate::error::OpError;
use candle_core::{CudaStorage, Layout, Result, Tensor};

fn pending() -> candle_core::Error {
    OpError::Kernel {
        op: OP,
        msg: "no CUDA kernel yet".into(),
    }
    .into()
}

pub(super) fn fwd(
    _q: (&CudaStorage, &Layout),
    _k: (&CudaStorage, &Layout),
    _v: (&CudaStorage, &Layout),
    _dm: Dims,
) -> Result<(CudaStorage, Tensor)> {
    Err(pending())
}

pub(super) fn bwd(
    _q: (&CudaStorage, &Layout),
    _k: (&CudaStorage, &Layout),
    _v: (&CudaStorage, &Layout),
    _o: &Tensor,
    _g: &Tensor,
    _lse: &Tensor,
    _dm: Dims,
) -> Result<CudaStorage> {
    Err(pending())
}
