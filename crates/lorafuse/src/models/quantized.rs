//! Opt-in quantized inference for the frozen projections.
//!
//! Batch-1 decoding on a CPU is bound by the bytes of weight read per token (540 MB for
//! SmolLM2-135M in f32). Storing the frozen base weights in a GGML block format cuts that by 4x
//! (q8_0) or 7x (q4_0); the products run on Candle's SIMD block dot products, the activations
//! being quantized per 32-block on the fly (as llama.cpp does).
//!
//! The quantized copy lives beside the dense weight in [`Linear`]; models never see it. It is only
//! used when the input tracks no gradient (inference), and only while the dense weight is the very
//! tensor it was made from: merging an adapter replaces the weight, which retires the stale copy
//! (the layer falls back to the dense product) instead of computing with old weights. The dense
//! weight stays in memory: merging, exporting and training read it.
//!
//! The row loop is ours rather than `QMatMul`'s: Candle's pool waits for its workers by spinning,
//! which on a loaded machine (other processes on the cores) costs a scheduler time slice per
//! matmul and made decoding 4x slower than one thread. Here the calling thread takes rows from a
//! shared cursor with [`super::gemv_pool`]'s helpers and never waits for a helper that has not
//! started: it then simply does all the rows itself.

use super::gemv_pool::{self, RowJob};
use super::linear::Linear;
use crate::lora::HasLinears;
use crate::{Error, Result};
use candle_core::quantized::k_quants::{BlockQ4_0, BlockQ8_0, GgmlType};
use candle_core::{DType, Tensor, TensorId};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A GGML block format for frozen weights. Both use blocks of 32 input columns (the k-quants
/// need multiples of 256, which SmolLM2's 576 is not) and both have AVX2 dot products in Candle;
/// q4_1 and q5_* have only scalar ones on x86, so they are not offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    /// 8-bit values, one f16 scale per block of 32: 1.06 bytes per weight, near-lossless.
    Q8_0,
    /// 4-bit values, one f16 scale per block of 32: 0.56 bytes per weight.
    Q4_0,
}

impl QuantFormat {
    /// Every format, as the CLI lists them.
    pub const ALL: [QuantFormat; 2] = [QuantFormat::Q8_0, QuantFormat::Q4_0];

    /// The name used on the command line and in GGUF files.
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_0 => "q4_0",
        }
    }

    /// Input columns per block.
    pub fn block_size(self) -> usize {
        32
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for QuantFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        QuantFormat::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = QuantFormat::ALL.iter().map(|f| f.name()).collect();
                Error::Invalid(format!(
                    "unknown quantization `{s}` (expected one of {})",
                    names.join(", ")
                ))
            })
    }
}

/// The blocks of a `[out, in]` weight, row after row.
#[derive(Debug)]
enum Blocks {
    Q8_0(Arc<Vec<BlockQ8_0>>),
    Q4_0(Arc<Vec<BlockQ4_0>>),
}

/// A quantized copy of a dense `[out, in]` weight, tied to the tensor it was made from.
#[derive(Debug, Clone)]
pub struct QuantizedWeight {
    blocks: Arc<Blocks>,
    out_dim: usize,
    in_dim: usize,
    source: TensorId,
    format: QuantFormat,
}

fn quantize_rows<T: GgmlType>(w: &[f32]) -> Arc<Vec<T>> {
    let mut blocks = vec![T::zeros(); w.len() / T::BLCK_SIZE];
    T::from_float(w, &mut blocks);
    Arc::new(blocks)
}

impl QuantizedWeight {
    /// Quantizes `weight` (`[out, in]`, any float dtype, on the CPU); `name` labels errors.
    pub fn new(name: &str, weight: &Tensor, format: QuantFormat) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let block = format.block_size();
        if !weight.device().is_cpu() {
            return Err(Error::Invalid(format!(
                "`{name}`: quantized inference runs on the CPU only (weight is on {:?})",
                weight.device().location()
            )));
        }
        if in_dim % block != 0 || in_dim == 0 {
            return Err(Error::TensorShape {
                name: format!("{name} ({format} needs the input width to be a multiple of {block})"),
                expected: vec![out_dim, in_dim.next_multiple_of(block).max(block)],
                found: vec![out_dim, in_dim],
            });
        }
        let w = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let blocks = match format {
            QuantFormat::Q8_0 => Blocks::Q8_0(quantize_rows(&w)),
            QuantFormat::Q4_0 => Blocks::Q4_0(quantize_rows(&w)),
        };
        Ok(Self {
            blocks: Arc::new(blocks),
            out_dim,
            in_dim,
            source: weight.id(),
            format,
        })
    }

    /// Whether this is the quantized copy of exactly `weight` (not of a weight since replaced).
    pub fn is_copy_of(&self, weight: &Tensor) -> bool {
        self.source == weight.id()
    }

    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// Bytes of the quantized blocks: what one product reads instead of the dense weight.
    pub fn size_in_bytes(&self) -> usize {
        match &*self.blocks {
            Blocks::Q8_0(b) => std::mem::size_of_val(b.as_slice()),
            Blocks::Q4_0(b) => std::mem::size_of_val(b.as_slice()),
        }
    }

    /// `x [.., in] -> x W^T [.., out]` on the quantized blocks, in `x`'s dtype (computed in
    /// f32). No gradient flows through it.
    pub fn matmul_t(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        if dims.last() != Some(&self.in_dim) {
            candle_core::bail!(
                "quantized linear: input {dims:?} does not fit weight [{}, {}]",
                self.out_dim,
                self.in_dim
            );
        }
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let out = match &*self.blocks {
            Blocks::Q8_0(w) => self.run(w, &xs)?,
            Blocks::Q4_0(w) => self.run(w, &xs)?,
        };
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.out_dim;
        }
        Tensor::from_vec(out, out_dims, x.device())?.to_dtype(x.dtype())
    }

    fn run<T: GgmlType + 'static>(
        &self,
        w: &Arc<Vec<T>>,
        xs: &[f32],
    ) -> candle_core::Result<Vec<f32>> {
        let kb = self.in_dim / T::BLCK_SIZE;
        let rows = xs.len() / self.in_dim;
        let mut xq = vec![T::VecDotType::zeros(); rows * kb];
        for (x, q) in xs.chunks_exact(self.in_dim).zip(xq.chunks_exact_mut(kb)) {
            T::VecDotType::from_float(x, q);
        }
        let job = BlockGemv {
            w: w.clone(),
            xq,
            in_dim: self.in_dim,
        };
        gemv_pool::run(Arc::new(job), self.out_dim, rows)
    }

    /// The weight as the quantized blocks represent it, `[out, in]`, f32.
    pub fn dequantize(&self) -> candle_core::Result<Tensor> {
        let mut w = vec![0f32; self.out_dim * self.in_dim];
        match &*self.blocks {
            Blocks::Q8_0(b) => BlockQ8_0::to_float(b, &mut w),
            Blocks::Q4_0(b) => BlockQ4_0::to_float(b, &mut w),
        }
        Tensor::from_vec(w, (self.out_dim, self.in_dim), &candle_core::Device::Cpu)
    }
}

/// `y[r, o] = dot(W[o], x[r])` over quantized rows of `W` and quantized activation rows `x`.
struct BlockGemv<T: GgmlType> {
    w: Arc<Vec<T>>,
    /// `[rows, in / 32]` blocks.
    xq: Vec<T::VecDotType>,
    in_dim: usize,
}

impl<T: GgmlType> RowJob for BlockGemv<T> {
    fn cost_per_output(&self) -> usize {
        self.in_dim
    }

    fn compute(&self, outs: std::ops::Range<usize>, dst: &mut [f32]) {
        let kb = self.in_dim / T::BLCK_SIZE;
        let n = outs.len();
        // Output-major: one weight row stays in L1 while every activation row meets it.
        for (i, o) in outs.enumerate() {
            let w = &self.w[o * kb..(o + 1) * kb];
            for (r, x) in self.xq.chunks_exact(kb).enumerate() {
                dst[r * n + i] = T::vec_dot(self.in_dim, w, x);
            }
        }
    }
}

/// What [`quantize_linears`] quantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizeSpec {
    /// Format of every projection except the LM head.
    pub linears: QuantFormat,
    /// Format of the LM head; `None` leaves it dense. llama.cpp keeps the output layer at 8 bits
    /// or more too: its errors go straight into the logits.
    pub lm_head: Option<QuantFormat>,
}

impl QuantizeSpec {
    /// `format` for the projections and q8_0 for the LM head.
    pub fn new(format: QuantFormat) -> Self {
        Self {
            linears: format,
            lm_head: Some(QuantFormat::Q8_0),
        }
    }
}

/// What [`quantize_linears`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuantizeReport {
    /// Projections given a quantized copy.
    pub layers: usize,
    /// Their dense weights' bytes.
    pub dense_bytes: usize,
    /// Their quantized copies' bytes (what a decode step reads instead).
    pub quantized_bytes: usize,
}

/// Gives every projection of `model` a quantized copy of its base weight (the slot named
/// `lm_head` gets `spec.lm_head`). Run it before applying adapters: a slot that is already
/// wrapped is an error naming it, since its base is no longer reachable for writing. Adapters
/// applied afterwards keep the base's copy and add their delta on top.
pub fn quantize_linears<M: HasLinears + ?Sized>(
    model: &mut M,
    spec: QuantizeSpec,
) -> Result<QuantizeReport> {
    let mut report = QuantizeReport::default();
    for (name, slot) in model.named_linears_mut() {
        let format = if name == "lm_head" {
            match spec.lm_head {
                Some(f) => f,
                None => continue,
            }
        } else {
            spec.linears
        };
        let Some(linear) = slot.as_any_mut().downcast_mut::<Linear>() else {
            return Err(Error::Invalid(format!(
                "`{name}` is already wrapped (adapters applied?): quantize the model before \
                 applying adapters"
            )));
        };
        linear.quantize(&name, format)?;
        report.layers += 1;
        report.dense_bytes += linear.weight.elem_count() * linear.weight.dtype().size_in_bytes();
        report.quantized_bytes += linear.quantized().map_or(0, |q| q.size_in_bytes());
    }
    Ok(report)
}
