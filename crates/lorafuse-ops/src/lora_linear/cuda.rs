//! CUDA: `y = x R0 + bias + s P R2` as at most two cuBLAS GEMMs into one output buffer.
//!
//! The bias (if any) is broadcast into `y` first; the base GEMM then runs with `beta = 1` (or 0
//! without bias) and the low-rank GEMM with `alpha = s, beta = 1`, so the low-rank product is
//! accumulated in place: no `[rows, out]` temporary and no elementwise pass, where the stock
//! composition makes two extra full-size tensors and three passes. Alpha and beta are f32 with
//! f32 accumulation (`cublasGemmEx`, compute 32F) for every storage dtype, so a scale like
//! `alpha / sqrt(r)` is not rounded to bf16. No custom kernel: the GEMMs are the work.
//! Operands in layouts cuBLAS cannot read directly go through the generic engine.

use super::engine::{dims2, epilogue_ops, fwd_generic, EngineStorage, LowRank, Plan};
use super::OP;
use crate::error::shape_err;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, WithDType};
use half::{bf16, f16};
use std::ffi::c_void;

impl EngineStorage for CudaStorage {
    fn pick(s: &Storage) -> Result<&Self> {
        match s {
            Storage::Cuda(s) => Ok(s),
            _ => Err(shape_err(
                OP,
                "weights are on another device than the input",
            )),
        }
    }

    fn wrap(self) -> Storage {
        Storage::Cuda(self)
    }

    fn epilogue(
        y: Self,
        c0: f64,
        low: Option<(&Self, f64)>,
        bias: Option<(&Self, &Layout)>,
        rows: usize,
        n: usize,
    ) -> Result<Self> {
        epilogue_ops(y, c0, low, bias, rows, n)
    }

    fn fwd(plan: &Plan, x: &Self, xl: &Layout, lr: Option<LowRank<Self>>) -> Result<(Self, Shape)> {
        match x.dtype() {
            DType::F32 => fwd_t::<f32>(plan, x, xl, lr),
            DType::BF16 => fwd_t::<bf16>(plan, x, xl, lr),
            DType::F16 => fwd_t::<f16>(plan, x, xl, lr),
            _ => fwd_generic(plan, x, xl, lr),
        }
    }
}

/// The storage dtypes cuBLAS reads here.
trait GemmType: CudaDType + DeviceRepr + WithDType {
    const CUDA: sys::cudaDataType;
}
impl GemmType for f32 {
    const CUDA: sys::cudaDataType = sys::cudaDataType::CUDA_R_32F;
}
impl GemmType for bf16 {
    const CUDA: sys::cudaDataType = sys::cudaDataType::CUDA_R_16BF;
}
impl GemmType for f16 {
    const CUDA: sys::cudaDataType = sys::cudaDataType::CUDA_R_16F;
}

/// A right-hand factor: a contiguous row-major matrix `[rows, cols]` read as itself
/// (`R = M`) or transposed (`R = M^T`).
struct Rhs<'a, T> {
    data: CudaView<'a, T>,
    cols: usize,
    transposed: bool,
}

impl<'a, T: GemmType> Rhs<'a, T> {
    fn new(s: &'a CudaStorage, l: &Layout, transposed: bool) -> Result<Option<Self>> {
        let (_, cols) = dims2(l, "weight")?;
        let Some((start, end)) = l.contiguous_offsets() else {
            return Ok(None);
        };
        Ok(Some(Self {
            data: s.as_cuda_slice::<T>()?.slice(start..end),
            cols,
            transposed,
        }))
    }

    /// `(k, n)` of `R`.
    fn kn(&self) -> (usize, usize) {
        let rows = self.data.len().checked_div(self.cols).unwrap_or(0);
        if self.transposed {
            (self.cols, rows)
        } else {
            (rows, self.cols)
        }
    }
}

fn int(n: usize) -> Result<i32> {
    crate::cuda_util::to_i32(n, "GEMM dimension", OP)
}

/// f32 accumulation for every dtype; for f32 storage, TF32 tensor-core products when Candle's
/// own f32 GEMMs are allowed them (`candle_core::cuda::set_gemm_reduced_precision_f32`, which
/// `configure_device` sets for `LORAFUSE_TF32=1`), so a LoRA layer never runs at another
/// precision than the base model's matmuls.
fn compute_type<T: GemmType>() -> sys::cublasComputeType_t {
    if T::DTYPE == DType::F32 && candle_core::cuda::gemm_reduced_precision_f32() {
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
    } else {
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
    }
}

/// `c = alpha * a R + beta * c` for a row-major `a` `[m, k]` and `c` `[m, n]`.
///
/// Row-major `C = A R` is column-major `C^T = R^T A^T`: cuBLAS gets `R` as its first operand
/// (`N` for a row-major `[k, n]`, `T` for a row-major `[n, k]` read transposed) and `A` as-is.
fn gemm<T: GemmType>(
    dev: &CudaDevice,
    a: &CudaView<T>,
    m: usize,
    r: &Rhs<T>,
    c: &mut CudaSlice<T>,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let (k, n) = r.kn();
    if a.len() != m * k || c.len() != m * n {
        return Err(shape_err(
            OP,
            format!(
                "GEMM [{m}, {}] x [{k}, {n}] into {} values",
                a.len() / m.max(1),
                c.len()
            ),
        ));
    }
    let (op_r, ld_r) = if r.transposed {
        (sys::cublasOperation_t::CUBLAS_OP_T, k)
    } else {
        (sys::cublasOperation_t::CUBLAS_OP_N, n)
    };
    let blas = dev.cublas_handle();
    let stream = dev.cuda_stream();
    let (rp, _r_rec) = r.data.device_ptr(&stream);
    let (ap, _a_rec) = a.device_ptr(&stream);
    let (cp, _c_rec) = c.device_ptr_mut(&stream);
    // SAFETY: the pointers are live device buffers of the sizes checked above (R: k*n, A: m*k,
    // C: m*n elements of T) on the device whose cuBLAS handle (bound to the device's stream) runs
    // the GEMM; alpha and beta are f32 as CUBLAS_COMPUTE_32F(_FAST_TF32) requires; the records keep the
    // buffers' stream ordering until the call is enqueued.
    unsafe {
        gemm_ex(
            *blas.handle(),
            op_r,
            sys::cublasOperation_t::CUBLAS_OP_N,
            int(n)?,
            int(m)?,
            int(k)?,
            (&alpha) as *const f32 as *const c_void,
            rp as *const c_void,
            T::CUDA,
            int(ld_r.max(1))?,
            ap as *const c_void,
            T::CUDA,
            int(k.max(1))?,
            (&beta) as *const f32 as *const c_void,
            cp as *mut c_void,
            T::CUDA,
            int(n.max(1))?,
            compute_type::<T>(),
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| {
        crate::OpError::Kernel {
            op: OP,
            msg: format!("cuBLAS GEMM failed: {e}"),
        }
        .into()
    })
}

fn fwd_t<T: GemmType>(
    plan: &Plan,
    x: &CudaStorage,
    xl: &Layout,
    lr: Option<LowRank<CudaStorage>>,
) -> Result<(CudaStorage, Shape)> {
    let dev = &x.device;
    let (rows, k) = dims2(xl, "x")?;
    let w = plan.w.map(|(w, t)| (w.storage_and_layout(), t));
    let bias = plan.bias.map(|b| b.storage_and_layout());
    let base = match &w {
        Some(((ws, wl), t)) => match Rhs::<T>::new(CudaStorage::pick(ws)?, wl, *t)? {
            Some(r) => Some(r),
            None => return fwd_generic(plan, x, xl, lr),
        },
        None => None,
    };
    let low = match (lr, plan.lowrank) {
        (Some((p, pl, r2, r2l)), Some((s, t))) => {
            match (Rhs::<T>::new(r2, r2l, t)?, pl.contiguous_offsets()) {
                (Some(r), Some((ps, pe))) => {
                    Some((p.as_cuda_slice::<T>()?.slice(ps..pe), dims2(pl, "P")?, r, s))
                }
                _ => return fwd_generic(plan, x, xl, lr),
            }
        }
        _ => None,
    };
    let Some((xs, xe)) = xl.contiguous_offsets() else {
        return fwd_generic(plan, x, xl, lr);
    };
    let xv = x.as_cuda_slice::<T>()?.slice(xs..xe);
    let n = match (&base, &low) {
        (Some(b), _) => b.kn().1,
        (None, Some((_, _, r, _))) => r.kn().1,
        (None, None) => return Err(shape_err(OP, "neither a base weight nor a low-rank path")),
    };
    if let Some(b) = &base {
        if b.kn() != (k, n) {
            return Err(shape_err(
                OP,
                format!("x {:?} does not fit the base weight", xl.dims()),
            ));
        }
    }
    if let Some((_, (prows, r), rhs, _)) = &low {
        if *prows != rows || rhs.kn() != (*r, n) {
            return Err(shape_err(
                OP,
                format!("x {:?}: low-rank factors do not fit", xl.dims()),
            ));
        }
    }
    if rows == 0 || n == 0 || k == 0 {
        return fwd_generic(plan, x, xl, lr);
    }
    let mut ys =
        CudaStorage::wrap_cuda_slice(crate::cuda_util::alloc::<T>(dev, rows * n)?, dev.clone());
    let mut y_has_value = false;
    if let Some((bs, bl)) = &bias {
        if bl.dims() != [n] {
            return Err(shape_err(
                OP,
                format!("bias {:?} for {n} outputs", bl.dims()),
            ));
        }
        // broadcast the bias into every row; the GEMMs then accumulate onto it
        CudaStorage::pick(bs)?.copy_strided_src(&mut ys, 0, &bl.broadcast_as((rows, n))?)?;
        y_has_value = true;
    }
    let y = ys.as_cuda_slice_mut::<T>()?;
    if let Some(b) = &base {
        gemm(
            dev,
            &xv,
            rows,
            b,
            y,
            1.0,
            if y_has_value { 1.0 } else { 0.0 },
        )?;
        y_has_value = true;
    }
    if let Some((p, _, r2, s)) = &low {
        gemm(
            dev,
            p,
            rows,
            r2,
            y,
            *s as f32,
            if y_has_value { 1.0 } else { 0.0 },
        )?;
    }
    Ok((ys, Shape::from((rows, n))))
}
