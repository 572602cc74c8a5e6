//! Cross-entropy over a large vocabulary with `ignore_index`.
//!
//! The fused op reads each row of logits once in the forward (online logsumexp, accumulated in
//! f32, or f64 for f64 logits) and once in the backward, and never materialises an f32 copy of
//! the logits: for a bf16 `[tokens, 150k]` tensor that copy is the largest buffer of a LoRA step.
//! The forward keeps the per-row logsumexp and the counted-row total in the op (Candle's
//! `bwd` only gets inputs, output and output gradient), so the backward is one pass writing
//! `(softmax - onehot) * g / count` straight into the logits' dtype.
//!
//! The loss comes back in f32 (f64 for f64 logits), like the reference.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "metal")]
mod metal;
pub mod reference;

use crate::dispatch::fused_enabled;
use crate::error::shape_err;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor,
    WithDType,
};
use cpu::Elem;
use std::sync::Mutex;

const OP: &str = "cross_entropy";

/// How per-token losses are reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// Mean over the tokens whose target is not `ignore_index` (PyTorch's default).
    Mean,
    /// Sum over the tokens whose target is not `ignore_index`.
    Sum,
    /// One loss per row, 0 where the target is `ignore_index`.
    None,
}

/// Cross-entropy of `logits` (`[n, vocab]`) against `targets` (`[n]`, i64 or u32). Rows whose target
/// equals `ignore_index` (PyTorch: -100) contribute nothing.
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    reduction: Reduction,
) -> Result<Tensor> {
    let (n, _v) = logits.dims2()?;
    if targets.dims() != [n] {
        return Err(shape_err(
            OP,
            format!(
                "logits {:?} need targets [{n}], got {:?}",
                logits.dims(),
                targets.dims()
            ),
        ));
    }
    if fused_enabled() && supported(logits, targets, ignore_index) {
        cross_entropy_fused(logits, targets, ignore_index, reduction)
    } else {
        reference::cross_entropy_reference(logits, targets, ignore_index, reduction)
    }
}

/// The fused [`cross_entropy`], whatever the kernel mode; errors on a backend or dtype without a
/// kernel. The loss is f32 (f64 for f64 logits); the gradient has the logits' dtype.
pub fn cross_entropy_fused(
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    reduction: Reduction,
) -> Result<Tensor> {
    if logits.elem_count() == 0 {
        // nothing to fuse; the reference gives the empty/zero answer
        return reference::cross_entropy_reference(logits, targets, ignore_index, reduction);
    }
    // the GPU kernels read i64 targets (n values: the conversion is cheap)
    let targets = match logits.device() {
        Device::Cpu => targets.contiguous()?,
        _ => targets.to_dtype(DType::I64)?.contiguous()?,
    };
    let op = CrossEntropyOp {
        ignore_index,
        reduction,
        saved: Mutex::new(None),
    };
    logits.contiguous()?.apply_op2(&targets, op)
}

fn supported(logits: &Tensor, targets: &Tensor, ignore_index: i64) -> bool {
    let (l, t) = (logits.dtype(), targets.dtype());
    let half_or_f32 = matches!(l, DType::F32 | DType::BF16 | DType::F16);
    let gpu_targets = matches!(t, DType::I64 | DType::U32);
    logits.device().same_device(targets.device())
        && match logits.device() {
            Device::Cpu => {
                matches!(l, DType::F32 | DType::F64 | DType::BF16 | DType::F16)
                    && matches!(t, DType::I64 | DType::U32 | DType::I32 | DType::U8)
            }
            Device::Cuda(_) => cfg!(feature = "cuda") && half_or_f32 && gpu_targets,
            // the Metal kernels take the ignore index as a 32-bit int
            Device::Metal(_) => {
                cfg!(feature = "metal")
                    && half_or_f32
                    && gpu_targets
                    && i32::try_from(ignore_index).is_ok()
            }
        }
}

/// The accumulator (and loss) dtype for a logits dtype.
fn acc_dtype(logits: DType) -> DType {
    if logits == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// What the forward leaves for the backward: per-row logsumexp `[n]` and the number of counted
/// rows `[1]`, both in the accumulator dtype, on the logits' device.
#[derive(Clone)]
struct Saved {
    lse: Tensor,
    count: Tensor,
}

struct CrossEntropyOp {
    ignore_index: i64,
    reduction: Reduction,
    saved: Mutex<Option<Saved>>,
}

impl CrossEntropyOp {
    fn save(&self, s: Saved) {
        if let Ok(mut slot) = self.saved.lock() {
            *slot = Some(s);
        }
    }

    fn cpu_fwd_t<T: Elem>(
        &self,
        logits: &[T],
        vocab: usize,
        targets: &[i64],
        count: usize,
    ) -> Result<(CpuStorage, Shape)> {
        let n = targets.len();
        let (loss, lse) = cpu::fwd_rows(logits, vocab, targets, self.ignore_index);
        let total = || loss.iter().map(|l| l.to_f64()).sum::<f64>();
        let (out, shape) = match self.reduction {
            Reduction::None => (loss, Shape::from(n)),
            Reduction::Sum => (vec![T::A::from_f64(total())], Shape::from(())),
            Reduction::Mean => (
                vec![T::A::from_f64(total() / count.max(1) as f64)],
                Shape::from(()),
            ),
        };
        let lse = Tensor::from_vec(lse, n, &Device::Cpu)?;
        let count = Tensor::from_vec(vec![T::A::from_f64(count as f64)], 1, &Device::Cpu)?;
        self.save(Saved { lse, count });
        Ok((T::A::to_cpu_storage_owned(out), shape))
    }
}

fn dims2(l: &Layout) -> Result<(usize, usize)> {
    match l.dims() {
        [n, v] => Ok((*n, *v)),
        d => Err(shape_err(
            OP,
            format!("logits must be [n, vocab], got {d:?}"),
        )),
    }
}

impl CustomOp2 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = dims2(ll)?;
        let targets = cpu::targets_i64(ts, tl)?;
        if targets.len() != n {
            return Err(shape_err(
                OP,
                format!("{n} rows of logits, {} targets", targets.len()),
            ));
        }
        let count = cpu::check_targets(&targets, v, self.ignore_index)?;
        match ls {
            CpuStorage::F32(_) => {
                self.cpu_fwd_t(cpu::contiguous::<f32>(ls, ll)?, v, &targets, count)
            }
            CpuStorage::F64(_) => {
                self.cpu_fwd_t(cpu::contiguous::<f64>(ls, ll)?, v, &targets, count)
            }
            CpuStorage::BF16(_) => {
                self.cpu_fwd_t(cpu::contiguous::<half::bf16>(ls, ll)?, v, &targets, count)
            }
            CpuStorage::F16(_) => {
                self.cpu_fwd_t(cpu::contiguous::<half::f16>(ls, ll)?, v, &targets, count)
            }
            other => Err(crate::OpError::DType {
                op: OP,
                dtype: other.dtype(),
            }
            .into()),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ls: &candle_core::CudaStorage,
        ll: &Layout,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (out, shape, saved) = cuda::fwd(ls, ll, ts, tl, self.ignore_index, self.reduction)?;
        self.save(saved);
        Ok((out, shape))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        ls: &candle_core::MetalStorage,
        ll: &Layout,
        ts: &candle_core::MetalStorage,
        tl: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let (out, shape, saved) = metal::fwd(ls, ll, ts, tl, self.ignore_index, self.reduction)?;
        self.save(saved);
        Ok((out, shape))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !logits.track_op() {
            return Ok((None, None));
        }
        let saved = self.saved.lock().ok().and_then(|s| s.clone());
        let saved = match saved {
            Some(s) => s,
            None => {
                // the forward ran elsewhere (a cloned graph): recompute its statistics
                let op = CrossEntropyOp {
                    ignore_index: self.ignore_index,
                    reduction: self.reduction,
                    saved: Mutex::new(None),
                };
                logits.apply_op2_no_bwd(targets, &op)?;
                let s = op.saved.lock().ok().and_then(|s| s.clone());
                s.ok_or_else(|| shape_err(OP, "forward statistics missing"))?
            }
        };
        let g = g.to_dtype(acc_dtype(logits.dtype()))?.contiguous()?;
        let op = CrossEntropyBwd {
            saved,
            ignore_index: self.ignore_index,
            reduction: self.reduction,
        };
        Ok((Some(logits.apply_op3_no_bwd(targets, &g, &op)?), None))
    }
}

/// `dlogits = (softmax - onehot) * coef` on `(logits, targets, g)`.
struct CrossEntropyBwd {
    saved: Saved,
    ignore_index: i64,
    reduction: Reduction,
}

impl CrossEntropyBwd {
    fn cpu_t<T: Elem>(
        &self,
        logits: &[T],
        vocab: usize,
        targets: &[i64],
        g: &[T::A],
    ) -> Result<CpuStorage> {
        let (lse_s, lse_l) = self.saved.lse.storage_and_layout();
        let (count_s, count_l) = self.saved.count.storage_and_layout();
        let (Storage::Cpu(lse_s), Storage::Cpu(count_s)) = (&*lse_s, &*count_s) else {
            return Err(shape_err(OP, "saved statistics are not on the CPU"));
        };
        let lse = cpu::contiguous::<T::A>(lse_s, lse_l)?;
        let count = cpu::contiguous::<T::A>(count_s, count_l)?;
        let n = targets.len();
        let ok = lse.len() == n
            && count.len() == 1
            && match self.reduction {
                Reduction::None => g.len() == n,
                _ => g.len() == 1,
            };
        if !ok {
            return Err(shape_err(
                OP,
                format!("backward of {n} rows got gradient of {} values", g.len()),
            ));
        }
        let one = T::A::from_f64(1.0);
        let c = count[0];
        let denom = if c > one { c } else { one };
        let coef = |i: usize| match self.reduction {
            Reduction::None => g[i],
            Reduction::Sum => g[0],
            Reduction::Mean => g[0] / denom,
        };
        let d = cpu::bwd_rows(logits, vocab, targets, self.ignore_index, lse, &coef);
        Ok(T::to_cpu_storage_owned(d))
    }
}

impl CustomOp3 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, v) = dims2(ll)?;
        let targets = cpu::targets_i64(ts, tl)?;
        let d = match ls {
            CpuStorage::F32(_) => self.cpu_t(
                cpu::contiguous::<f32>(ls, ll)?,
                v,
                &targets,
                cpu::contiguous(gs, gl)?,
            ),
            CpuStorage::F64(_) => self.cpu_t(
                cpu::contiguous::<f64>(ls, ll)?,
                v,
                &targets,
                cpu::contiguous(gs, gl)?,
            ),
            CpuStorage::BF16(_) => self.cpu_t(
                cpu::contiguous::<half::bf16>(ls, ll)?,
                v,
                &targets,
                cpu::contiguous(gs, gl)?,
            ),
            CpuStorage::F16(_) => self.cpu_t(
                cpu::contiguous::<half::f16>(ls, ll)?,
                v,
                &targets,
                cpu::contiguous(gs, gl)?,
            ),
            other => Err(crate::OpError::DType {
                op: OP,
                dtype: other.dtype(),
            }
            .into()),
        }?;
        Ok((d, ll.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ls: &candle_core::CudaStorage,
        ll: &Layout,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = cuda::bwd(
            ls,
            ll,
            ts,
            tl,
            gs,
            gl,
            &self.saved,
            self.ignore_index,
            self.reduction,
        )?;
        Ok((d, ll.shape().clone()))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        ls: &candle_core::MetalStorage,
        ll: &Layout,
        ts: &candle_core::MetalStorage,
        tl: &Layout,
        gs: &candle_core::MetalStorage,
        gl: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let (s, i, r) = (&self.saved, self.ignore_index, self.reduction);
        let d = metal::bwd(ls, ll, ts, tl, gs, gl, s, i, r)?;
        Ok((d, ll.shape().clone()))
    }
}

/// Summed cross-entropy of the logits `h W^T` (`h` `[n, hidden]`, `W` `[vocab, hidden]` frozen)
/// against `targets`, as [`cross_entropy`] with [`Reduction::Sum`] over
/// [`crate::frozen_linear`]'s output, with gradient for `h` only.
///
/// On CUDA the full `[n, vocab]` logits never exist: rows go through the LM head in chunks of
/// about `chunk_bytes` of logits, and each chunk's input gradient `(softmax - onehot) W` is
/// formed right away (the loss is a sum, so its gradient needs only the final scalar factor,
/// applied in the backward). Only `[n, hidden]` survives the forward, instead of the logits,
/// their gradient and Candle's accumulation buffer for it (three logits-sized buffers). When `h`
/// tracks no gradient, the input gradient is skipped. Elsewhere (and in reference mode) this is
/// the two ops composed.
pub fn linear_cross_entropy_sum(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    chunk_bytes: usize,
) -> Result<Tensor> {
    let (n, hidden) = h.dims2()?;
    let (vocab, wh) = w.dims2()?;
    if wh != hidden || targets.dims() != [n] {
        return Err(shape_err(
            OP,
            format!(
                "h {:?}, W {:?}, targets {:?}",
                h.dims(),
                w.dims(),
                targets.dims()
            ),
        ));
    }
    let chunked = matches!(h.device(), Device::Cuda(_))
        && fused_enabled()
        && n > 0
        && vocab > 0
        && w.dtype() == h.dtype()
        && w.device().same_device(h.device())
        && supported(h, targets, ignore_index);
    if !chunked {
        let logits = crate::frozen_linear(h, w, None)?;
        return cross_entropy(&logits, targets, ignore_index, Reduction::Sum);
    }
    let elem = h.dtype().size_in_bytes();
    let chunk = (chunk_bytes / (vocab * elem)).clamp(1, n);
    let want_dx = h.track_op();
    let hd = h.detach().contiguous()?;
    let wd = w.detach().contiguous()?;
    let targets = targets.to_dtype(DType::I64)?.contiguous()?;
    let one = Tensor::ones(1, DType::F32, h.device())?;
    let mut loss: Option<Tensor> = None;
    let mut dx = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let hc = hd.narrow(0, start, len)?;
        let tc = targets.narrow(0, start, len)?;
        let logits = crate::lora_linear::frozen_linear_fused(&hc, &wd, None)?;
        let op = CrossEntropyOp {
            ignore_index,
            reduction: Reduction::Sum,
            saved: Mutex::new(None),
        };
        let lc = logits.apply_op2_no_bwd(&tc, &op)?;
        loss = Some(match loss {
            Some(l) => (l + lc)?,
            None => lc,
        });
        if want_dx {
            let saved = op.saved.lock().ok().and_then(|s| s.clone());
            let saved = saved.ok_or_else(|| shape_err(OP, "forward statistics missing"))?;
            let bwd = CrossEntropyBwd {
                saved,
                ignore_index,
                reduction: Reduction::Sum,
            };
            let dlogits = logits.apply_op3_no_bwd(&tc, &one, &bwd)?;
            drop(logits);
            dx.push(crate::lora_linear::frozen_linear_input_grad(&dlogits, &wd)?);
        }
        start += len;
    }
    let loss = loss.ok_or_else(|| shape_err(OP, "no rows"))?;
    if !want_dx {
        return Ok(loss);
    }
    let dx = Tensor::cat(&dx, 0)?;
    h.apply_op1(AttachLoss { loss, dx })
}

/// Puts a loss computed off the graph back on it: the forward returns `loss` (whatever its
/// input), the backward `dx * g`.
struct AttachLoss {
    loss: Tensor,
    dx: Tensor,
}

impl AttachLoss {
    fn loss_storage(&self) -> Result<(Storage, Shape)> {
        let (s, l) = self.loss.storage_and_layout();
        Ok((s.try_clone(l)?, l.shape().clone()))
    }
}

impl candle_core::CustomOp1 for AttachLoss {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        match self.loss_storage()? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => Err(shape_err(OP, "loss is not on the CPU")),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        match self.loss_storage()? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => Err(shape_err(OP, "loss is not on the GPU")),
        }
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if !h.track_op() {
            return Ok(None);
        }
        let g = g.to_dtype(self.dx.dtype())?.reshape(())?;
        Ok(Some(self.dx.broadcast_mul(&g)?))
    }
}
