//! Shared plumbing for the fused ops' CPU kernels and dispatch: typed dispatch over the float
//! storages, contiguity checks, and the backend/dtype gate the public functions consult.
//!
//! CPU kernels are written once, generic over Candle's `WithDType`, and accumulate in f64 (exact
//! enough that f32 results agree with the f32 reference to ~1e-6, and f64 results to ~1e-12).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor, WithDType};

use crate::error::OpError;

/// The contiguous data of a kernel argument; an error naming the op if the layout is strided.
pub(crate) fn contiguous<'a, T>(
    data: &'a [T],
    layout: &Layout,
    op: &'static str,
) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(OpError::Kernel {
            op,
            msg: format!(
                "expects a contiguous input, got shape {:?} stride {:?}",
                layout.dims(),
                layout.stride()
            ),
        }
        .into()),
    }
}

/// A CPU kernel of one contiguous argument.
pub(crate) trait Kernel1 {
    const OP: &'static str;
    fn f<T: WithDType>(&self, a: &[T]) -> Result<Vec<T>>;
}

/// A CPU kernel of two contiguous arguments of one dtype.
pub(crate) trait Kernel2 {
    const OP: &'static str;
    fn f<T: WithDType>(&self, a: &[T], b: &[T]) -> Result<Vec<T>>;
}

/// A CPU kernel of three contiguous arguments of one dtype.
pub(crate) trait Kernel3 {
    const OP: &'static str;
    fn f<T: WithDType>(&self, a: &[T], b: &[T], c: &[T]) -> Result<Vec<T>>;
}

fn dtype_err(op: &'static str, dtype: DType) -> candle_core::Error {
    OpError::DType { op, dtype }.into()
}

fn mismatch(op: &'static str, dtypes: &[DType]) -> candle_core::Error {
    OpError::Kernel {
        op,
        msg: format!("arguments must share one dtype, got {dtypes:?}"),
    }
    .into()
}

/// Runs `k` on the float storage `s` (f32, f64, bf16, f16).
pub(crate) fn run1<K: Kernel1>(k: &K, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
    use CpuStorage as C;
    let op = K::OP;
    Ok(match s {
        C::F32(a) => C::F32(k.f(contiguous(a, l, op)?)?),
        C::F64(a) => C::F64(k.f(contiguous(a, l, op)?)?),
        C::BF16(a) => C::BF16(k.f(contiguous(a, l, op)?)?),
        C::F16(a) => C::F16(k.f(contiguous(a, l, op)?)?),
        other => return Err(dtype_err(op, other.dtype())),
    })
}

/// Runs `k` on two float storages of one dtype.
pub(crate) fn run2<K: Kernel2>(
    k: &K,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<CpuStorage> {
    use CpuStorage as C;
    let op = K::OP;
    Ok(match (s1, s2) {
        (C::F32(a), C::F32(b)) => C::F32(k.f(contiguous(a, l1, op)?, contiguous(b, l2, op)?)?),
        (C::F64(a), C::F64(b)) => C::F64(k.f(contiguous(a, l1, op)?, contiguous(b, l2, op)?)?),
        (C::BF16(a), C::BF16(b)) => C::BF16(k.f(contiguous(a, l1, op)?, contiguous(b, l2, op)?)?),
        (C::F16(a), C::F16(b)) => C::F16(k.f(contiguous(a, l1, op)?, contiguous(b, l2, op)?)?),
        (a, b) if a.dtype() == b.dtype() => return Err(dtype_err(op, a.dtype())),
        (a, b) => return Err(mismatch(op, &[a.dtype(), b.dtype()])),
    })
}

/// Runs `k` on three float storages of one dtype.
pub(crate) fn run3<K: Kernel3>(
    k: &K,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<CpuStorage> {
    use CpuStorage as C;
    let op = K::OP;
    macro_rules! go {
        ($v:ident, $a:expr, $b:expr, $c:expr) => {
            C::$v(k.f(
                contiguous($a, l1, op)?,
                contiguous($b, l2, op)?,
                contiguous($c, l3, op)?,
            )?)
        };
    }
    Ok(match (s1, s2, s3) {
        (C::F32(a), C::F32(b), C::F32(c)) => go!(F32, a, b, c),
        (C::F64(a), C::F64(b), C::F64(c)) => go!(F64, a, b, c),
        (C::BF16(a), C::BF16(b), C::BF16(c)) => go!(BF16, a, b, c),
        (C::F16(a), C::F16(b), C::F16(c)) => go!(F16, a, b, c),
        (a, b, c) if a.dtype() == b.dtype() && b.dtype() == c.dtype() => {
            return Err(dtype_err(op, a.dtype()))
        }
        (a, b, c) => return Err(mismatch(op, &[a.dtype(), b.dtype(), c.dtype()])),
    })
}

/// Which backends have a fused kernel for an op (Metal kernels exist per op; CUDA and CPU for all).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backends {
    pub metal: bool,
}

/// True when the fused kernel may run on `t`'s device and dtype (and the mode allows it): CPU
/// takes f32/f64/bf16/f16, CUDA and Metal f32/bf16/f16 (f64 on a GPU goes to the reference).
pub(crate) fn fused_supported(t: &Tensor, backends: Backends) -> bool {
    if !crate::dispatch::fused_enabled() || t.elem_count() == 0 {
        return false;
    }
    let half_or_f32 = matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16);
    match t.device() {
        Device::Cpu => half_or_f32 || t.dtype() == DType::F64,
        Device::Cuda(_) => cfg!(feature = "cuda") && half_or_f32,
        Device::Metal(_) => cfg!(feature = "metal") && backends.metal && half_or_f32,
    }
}

/// Splits `x`'s shape into `(rows, cols)` over its last dimension.
pub(crate) fn rows_cols(t: &Tensor) -> Result<(usize, usize)> {
    let cols = t.dim(candle_core::D::Minus1)?;
    let rows = t.elem_count().checked_div(cols).unwrap_or(0);
    Ok((rows, cols))
}

/// A zeroed output buffer for a kernel (every element is then written).
pub(crate) fn zeros<T: WithDType>(n: usize) -> Vec<T> {
    vec![T::zero(); n]
}

/// `(rows, cols)` of a layout over its last dimension (`cols` = 1 for a scalar).
pub(crate) fn layout_rows_cols(l: &Layout) -> (usize, usize) {
    let cols = l.dims().last().copied().unwrap_or(1);
    (l.shape().elem_count().checked_div(cols).unwrap_or(0), cols)
}
