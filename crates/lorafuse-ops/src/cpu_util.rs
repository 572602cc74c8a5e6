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

/// The working precision of a CPU kernel: f32 for f32/bf16/f16 tensors (with [`fast_exp`]),
/// f64 for f64 tensors (so that the finite-difference tests see f64 precision).
pub(crate) trait Acc:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::AddAssign
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + WithDType
{
    const NEG_INF: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
}

impl Acc for f32 {
    const NEG_INF: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn exp(self) -> Self {
        fast_exp(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Acc for f64 {
    const NEG_INF: Self = f64::NEG_INFINITY;
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// `sum(f(load(v)))` over `x` in the working precision, with 16 partial sums so that the loop
/// vectorises (one accumulator is a serial chain of dependent adds).
#[inline(always)]
pub(crate) fn row_sum<T: WithDType, A: Acc>(
    x: &[T],
    load: impl Fn(T) -> A + Sync + Copy,
    f: impl Fn(A) -> A,
) -> A {
    let zero = A::from_f64(0.0);
    let mut acc = [zero; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(load(v));
        }
    }
    let mut s = zero;
    for &v in chunks.remainder() {
        s += f(load(v));
    }
    for a in acc {
        s += a;
    }
    s
}

/// A storage element as its working-precision value, and back: the (load, store) pair a kernel
/// generic over `T: WithDType` picks at run time, f64 for f64 tensors and f32 otherwise.
pub(crate) fn load_f32<T: WithDType>(x: T) -> f32 {
    x.to_f64() as f32
}
pub(crate) fn store_f32<T: WithDType>(x: f32) -> T {
    T::from_f64(x as f64)
}
pub(crate) fn load_f64<T: WithDType>(x: T) -> f64 {
    x.to_f64()
}
pub(crate) fn store_f64<T: WithDType>(x: f64) -> T {
    T::from_f64(x)
}

/// `e^x` in f32, branch-free so that loops over slices vectorise (libm's `expf` is a call per
/// element, which made exponentials ~7% of a CPU training step). Cody-Waite reduction
/// `x = n ln2 + r`, `|r| <= ln2 / 2`, then a degree-7 Taylor polynomial for `e^r` (truncation
/// error < 1e-8) and `2^n` built in the exponent bits: within 2 ulp of `f32::exp` over the normal
/// range. Below -87.3 the result is the smallest normal value's order (not 0); NaN stays NaN.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n is an integer in [-126, 127] here, so the biased exponent is a normal one.
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// An output buffer of `n` elements filled by `fill` (through `MaybeUninit::write`), with no
/// zero-fill pass first: a kernel's output is written exactly once.
///
/// # Safety
/// `fill` must initialise every element of the slice it is given.
pub(crate) unsafe fn filled_vec<T>(
    n: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<T>]),
) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: the caller guarantees `fill` initialised all `n` elements; the capacity is >= n.
    unsafe { v.set_len(n) };
    v
}

#[cfg(test)]
mod fast_exp_tests {
    use super::fast_exp;

    #[test]
    fn fast_exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = fast_exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(f32::NAN).is_nan());
        assert!(fast_exp(-1e30) < 1e-37 && fast_exp(-1e30) >= 0.0);
    }
}
