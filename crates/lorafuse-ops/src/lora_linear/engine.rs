//! The one product every LoRA kernel evaluates: `y = x R0 + bias + s * P R2`, for the CPU and
//! (through the same generic code) Metal; CUDA has its own in `cuda.rs` to use cuBLAS `beta = 1`.
//!
//! `R0` is the frozen `W` read as `W^T` (forward) or `W` (input gradient); `P` is the `rows x r`
//! low-rank activation and `R2` the second factor (`B^T` forward, `A` for the input gradient).
//! The GEMMs are the backend's own (`BackendStorage::matmul`); what is fused is the epilogue: base
//! output, scaled low-rank output and bias are combined in one pass over `y`.

use super::OP;
use crate::cpu_util::{load_f32, load_f64, store_f32, store_f64, Acc};
use crate::error::shape_err;
use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// Which terms of `x R0 + bias + s P R2` an op evaluates.
pub(super) struct Plan<'a> {
    /// The frozen weight `[out, in]` and whether it is read transposed (`R0 = W^T`).
    pub w: Option<(&'a Tensor, bool)>,
    pub bias: Option<&'a Tensor>,
    /// `(s, transpose)`: the low-rank scale and whether `R2` is read transposed (`B^T`).
    pub lowrank: Option<(f64, bool)>,
}

/// The low-rank inputs of one call: `P` and `R2` with their layouts.
pub(super) type LowRank<'a, S> = (&'a S, &'a Layout, &'a S, &'a Layout);

/// A backend the engine runs on.
pub(super) trait EngineStorage: BackendStorage + Sized {
    /// This backend's storage inside a tensor's `Storage`.
    fn pick(s: &Storage) -> Result<&Self>;
    /// This backend's storage as a `Storage`.
    fn wrap(self) -> Storage;
    /// `y = c0 * y + (s * low) + bias` over a contiguous `[rows, n]` `y`.
    fn epilogue(
        y: Self,
        c0: f64,
        low: Option<(&Self, f64)>,
        bias: Option<(&Self, &Layout)>,
        rows: usize,
        n: usize,
    ) -> Result<Self>;
    /// `x R0` for the frozen weight (`R0`'s layout `rl`); backends may take a faster route.
    fn base_matmul(
        &self,
        w: &Self,
        dims: (usize, usize, usize, usize),
        xl: &Layout,
        rl: &Layout,
    ) -> Result<Self> {
        self.matmul(w, dims, xl, rl)
    }
    /// `y = x R0 + bias + s P R2` as the plan says (backends may fuse more than the default).
    fn fwd(plan: &Plan, x: &Self, xl: &Layout, lr: Option<LowRank<Self>>) -> Result<(Self, Shape)> {
        fwd_generic(plan, x, xl, lr)
    }
    /// The whole LoRA forward, `(y, shape, P)`, in one kernel where the backend has one for this
    /// call (CUDA: decode-sized inputs); `None` takes the GEMM route.
    fn lora_small(
        _plan: &Plan,
        _x: (&Self, &Layout),
        _a: (&Self, &Layout),
        _b: (&Self, &Layout),
    ) -> Result<Option<(Self, Shape, Self)>> {
        Ok(None)
    }
}

/// The LoRA forward: `P = x A^T`, then the engine with `R2 = B^T`; returns `P` as a tensor too
/// (kept by the op for `dB`).
pub(super) fn lora_fwd<S: EngineStorage>(
    plan: &Plan,
    (x, xl): (&S, &Layout),
    (a, al): (&S, &Layout),
    (b, bl): (&S, &Layout),
) -> Result<(S, Shape, Tensor)> {
    let (rows, _) = dims2(xl, "x")?;
    let (r, _) = dims2(al, "A")?;
    let p_tensor = |p: S| Tensor::from_storage(p.wrap(), (rows, r), BackpropOp::none(), false);
    if let Some((y, shape, p)) = S::lora_small(plan, (x, xl), (a, al), (b, bl))? {
        return Ok((y, shape, p_tensor(p)));
    }
    let p = p_tensor(lowrank_act(x, xl, a, al)?);
    let (y, shape) = {
        let (ps, pl) = p.storage_and_layout();
        S::fwd(plan, x, xl, Some((S::pick(&ps)?, pl, b, bl)))?
    };
    Ok((y, shape, p))
}

/// `R`'s layout as the right-hand side of `x R`: `[in, out]` from a `[out, in]` matrix if `t`.
pub(super) fn rhs_layout(l: &Layout, t: bool) -> Result<Layout> {
    if l.dims().len() != 2 {
        return Err(shape_err(
            OP,
            format!("weight must be 2-D, got {:?}", l.dims()),
        ));
    }
    if t {
        l.transpose(0, 1)
    } else {
        Ok(l.clone())
    }
}

/// `(rows, cols)` of a 2-D layout.
pub(super) fn dims2(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.dims() {
        [r, c] => Ok((*r, *c)),
        d => Err(shape_err(OP, format!("{what} must be 2-D, got {d:?}"))),
    }
}

/// `P = x A^T` (`[rows, r]`).
pub(super) fn lowrank_act<S: EngineStorage>(x: &S, xl: &Layout, a: &S, al: &Layout) -> Result<S> {
    let (rows, k) = dims2(xl, "x")?;
    let rl = rhs_layout(al, true)?;
    let (ak, r) = dims2(&rl, "A")?;
    if ak != k {
        return Err(shape_err(
            OP,
            format!("x {:?} does not fit A {:?}", xl.dims(), al.dims()),
        ));
    }
    x.matmul(a, (1, rows, r, k), xl, &rl)
}

/// `y = x R0 + bias + s P R2` from the backend's GEMMs and [`EngineStorage::epilogue`].
pub(super) fn fwd_generic<S: EngineStorage>(
    plan: &Plan,
    x: &S,
    xl: &Layout,
    lr: Option<LowRank<S>>,
) -> Result<(S, Shape)> {
    let (rows, k) = dims2(xl, "x")?;
    let w = plan.w.map(|(w, t)| (w.storage_and_layout(), t));
    let bias = plan.bias.map(|b| b.storage_and_layout());
    let mut n = None;
    let base = match &w {
        Some(((ws, wl), t)) => {
            let rl = rhs_layout(wl, *t)?;
            let (wk, wn) = dims2(&rl, "W")?;
            if wk != k {
                return Err(shape_err(
                    OP,
                    format!("x {:?} does not fit W {:?}", xl.dims(), wl.dims()),
                ));
            }
            n = Some(wn);
            Some(x.base_matmul(S::pick(ws)?, (1, rows, wn, k), xl, &rl)?)
        }
        None => None,
    };
    let low = match (lr, plan.lowrank) {
        (Some((p, pl, r2, r2l)), Some((s, t))) => {
            let (prow, r) = dims2(pl, "P")?;
            let rl = rhs_layout(r2l, t)?;
            let (rk, rn) = dims2(&rl, "B")?;
            if prow != rows || rk != r || n.is_some_and(|n| n != rn) {
                let msg = format!(
                    "x {:?}, P {:?}, second factor {:?}",
                    xl.dims(),
                    pl.dims(),
                    r2l.dims()
                );
                return Err(shape_err(OP, msg));
            }
            n = Some(rn);
            Some((p.matmul(r2, (1, rows, rn, r), pl, &rl)?, s))
        }
        _ => None,
    };
    let n = n.ok_or_else(|| shape_err(OP, "neither a base weight nor a low-rank path"))?;
    let bias = match &bias {
        Some((bs, bl)) => {
            if bl.dims() != [n] {
                return Err(shape_err(
                    OP,
                    format!("bias {:?} for {n} outputs", bl.dims()),
                ));
            }
            Some((S::pick(bs)?, *bl))
        }
        None => None,
    };
    let y = match (base, low) {
        (Some(base), None) if bias.is_none() => base,
        (Some(base), low) => {
            S::epilogue(base, 1.0, low.as_ref().map(|(l, s)| (l, *s)), bias, rows, n)?
        }
        (None, Some((low, s))) => S::epilogue(low, s, None, bias, rows, n)?,
        (None, None) => return Err(shape_err(OP, "nothing to compute")),
    };
    Ok((y, Shape::from((rows, n))))
}

/// One pass over `y`: `y = c0 y + s low + bias`, in the working precision ([`Acc`]: f32 for f32
/// and half types, f64 for f64), each case its own loop so that it vectorises: on the CPU this
/// pass follows every projection of an embedding model, where a per-element f64 loop with the
/// branches inside was 8% of the time.
fn combine<T: WithDType>(
    y: &mut [T],
    c0: f64,
    low: Option<(&[T], f64)>,
    bias: Option<&[T]>,
    n: usize,
) {
    if T::DTYPE == DType::F64 {
        combine_in(y, c0, low, bias, n, load_f64::<T>, store_f64::<T>);
    } else {
        combine_in(y, c0, low, bias, n, load_f32::<T>, store_f32::<T>);
    }
}

fn combine_in<T: WithDType, A: Acc>(
    y: &mut [T],
    c0: f64,
    low: Option<(&[T], f64)>,
    bias: Option<&[T]>,
    n: usize,
    load: impl Fn(T) -> A + Sync + Copy,
    store: impl Fn(A) -> T + Sync + Copy,
) {
    let c0 = A::from_f64(c0);
    y.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(row, yr)| {
            let lr = low.map(|(l, s)| (&l[row * n..row * n + yr.len()], A::from_f64(s)));
            // One rounding per element, as the terms are summed in `A` before the store.
            match (lr, bias) {
                (None, None) => yr.iter_mut().for_each(|v| *v = store(c0 * load(*v))),
                (None, Some(b)) => {
                    for (v, &bv) in yr.iter_mut().zip(b) {
                        *v = store(c0 * load(*v) + load(bv));
                    }
                }
                (Some((l, s)), None) => {
                    for (v, &lv) in yr.iter_mut().zip(l) {
                        *v = store(c0 * load(*v) + s * load(lv));
                    }
                }
                (Some((l, s)), Some(b)) => {
                    for ((v, &lv), &bv) in yr.iter_mut().zip(l).zip(b) {
                        *v = store(c0 * load(*v) + s * load(lv) + load(bv));
                    }
                }
            }
        });
}

/// A contiguous slice of `T` at `l`'s offset.
fn slice_at<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, len: usize) -> Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| shape_err(OP, format!("operand {:?} must be contiguous", l.dims())))?;
    let all = s.as_slice::<T>()?;
    all.get(start..start + len)
        .filter(|_| end - start == len)
        .ok_or_else(|| shape_err(OP, format!("storage too short for {:?}", l.dims())))
}

fn epilogue_t<T: WithDType>(
    mut y: Vec<T>,
    c0: f64,
    low: Option<(&CpuStorage, f64)>,
    bias: Option<(&CpuStorage, &Layout)>,
    rows: usize,
    n: usize,
) -> Result<Vec<T>> {
    let low = match low {
        Some((l, s)) => Some((
            slice_at::<T>(l, &Layout::contiguous((rows, n)), rows * n)?,
            s,
        )),
        None => None,
    };
    let bias = match bias {
        Some((b, bl)) => Some(slice_at::<T>(b, bl, n)?),
        None => None,
    };
    combine(&mut y, c0, low, bias, n);
    Ok(y)
}

impl EngineStorage for CpuStorage {
    fn pick(s: &Storage) -> Result<&Self> {
        match s {
            Storage::Cpu(s) => Ok(s),
            _ => Err(shape_err(
                OP,
                "weights are on another device than the input",
            )),
        }
    }

    fn wrap(self) -> Storage {
        Storage::Cpu(self)
    }

    fn base_matmul(
        &self,
        w: &Self,
        dims: (usize, usize, usize, usize),
        xl: &Layout,
        rl: &Layout,
    ) -> Result<Self> {
        let (_, rows, n, k) = dims;
        // Few rows of f32 against `W^T` read from a row-major `[n, k]` W: unpacked dot products.
        if let (CpuStorage::F32(xs), CpuStorage::F32(ws)) = (self, w) {
            let x_rows = xl.is_contiguous() && xl.dims() == [rows, k];
            let w_rows = rl.dims() == [k, n] && rl.stride() == [1, k];
            let x = xs.get(xl.start_offset()..xl.start_offset() + rows * k);
            let w = ws.get(rl.start_offset()..rl.start_offset() + n * k);
            if let (true, true, true, Some(x), Some(w)) =
                (rows <= super::cpu_small::MAX_ROWS, x_rows, w_rows, x, w)
            {
                return Ok(CpuStorage::F32(super::cpu_small::matmul_wt(
                    x, w, rows, n, k,
                )));
            }
        }
        self.matmul(w, dims, xl, rl)
    }

    fn epilogue(
        y: Self,
        c0: f64,
        low: Option<(&Self, f64)>,
        bias: Option<(&Self, &Layout)>,
        rows: usize,
        n: usize,
    ) -> Result<Self> {
        Ok(match y {
            CpuStorage::F32(v) => CpuStorage::F32(epilogue_t(v, c0, low, bias, rows, n)?),
            CpuStorage::F64(v) => CpuStorage::F64(epilogue_t(v, c0, low, bias, rows, n)?),
            CpuStorage::BF16(v) => CpuStorage::BF16(epilogue_t(v, c0, low, bias, rows, n)?),
            CpuStorage::F16(v) => CpuStorage::F16(epilogue_t(v, c0, low, bias, rows, n)?),
            other => {
                return Err(crate::OpError::DType {
                    op: OP,
                    dtype: other.dtype(),
                }
                .into())
            }
        })
    }
}

/// The epilogue from the backend's own elementwise ops (Metal; CUDA's default path): up to three
/// passes, where the CPU's is one.
#[cfg(any(feature = "cuda", feature = "metal"))]
pub(super) fn epilogue_ops<S: BackendStorage>(
    y: S,
    c0: f64,
    low: Option<(&S, f64)>,
    bias: Option<(&S, &Layout)>,
    rows: usize,
    n: usize,
) -> Result<S> {
    use candle_core::op::Add;
    let l = Layout::contiguous((rows, n));
    let mut y = if c0 == 1.0 { y } else { y.affine(&l, c0, 0.0)? };
    if let Some((low, s)) = low {
        y = if s == 1.0 {
            y.binary_impl::<Add>(low, &l, &l)?
        } else {
            y.binary_impl::<Add>(&low.affine(&l, s, 0.0)?, &l, &l)?
        };
    }
    if let Some((b, bl)) = bias {
        y = y.binary_impl::<Add>(b, &l, &bl.broadcast_as((rows, n))?)?;
    }
    Ok(y)
}
