//! Opt-in quantized inference for the frozen projections.
//!
//! Batch-1 decoding on a CPU is bound by the bytes of weight read per token (540 MB for
//! SmolLM2-135M in f32). Storing the frozen base weights in a llama.cpp block format cuts that by
//! 3.6x (q8_0) to 6x (q4_0); the products run as i8 block dot products ([`super::qgemv`]), the
//! activations being quantized per 32-block on the fly (as llama.cpp does).
//!
//! Batched encoding (sentence embeddings) is bound by multiply-adds instead, and there int8
//! activations cost too much accuracy; `bf16` keeps a bf16 copy multiplied by a register-tiled
//! GEMM with f32 accumulation ([`super::bf16_gemm`]).
//!
//! The quantized copy lives beside the dense weight in [`Linear`]; models never see it. It is only
//! used when the input tracks no gradient (inference), and only while the dense weight is the very
//! tensor it was made from: merging an adapter replaces the weight, which retires the stale copy
//! (the layer falls back to the dense product) instead of computing with old weights. The dense
//! weight stays in memory: merging, exporting and training read it.
//!
//! Why not Candle's `QMatMul`: its thread pool waits for its workers by spinning, which on a
//! loaded machine (other processes on the cores) costs a scheduler time slice per product and
//! made decoding 4x slower than one thread; and its x86 q8_0 dot converts two f16 scales through
//! a function call per 32-block (q4_1 and q5_* have no SIMD dot at all there). Here the calling
//! thread shares rows with [`super::gemv_pool`]'s helpers without ever waiting for one that has
//! not started, and the scales are f32.

use super::bf16_gemm::Bf16Matrix;
use super::f32_gemm::F32Matrix;
use super::gemv_pool::{self, RowJob};
use super::i16_gemm::I16Matrix;
use super::linear::Linear;
use super::qgemv::{QActs, QMatrix, K_MULTIPLE};
use super::tiled_gemm;
use crate::lora::HasLinears;
use crate::{Error, Result};
use candle_core::{DType, Tensor, TensorId};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A format for frozen weights: llama.cpp's q8_0, q4_1 and q4_0 block schemes (blocks of 32
/// input columns; the k-quants' blocks of 256 do not divide SmolLM2's width of 576), with f32
/// scales, whose input widths must be multiples of 64; or plain bf16, any width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    /// bf16 weights (round to nearest even), 2 bytes per weight; activations are rounded to bf16
    /// per product and products accumulate in f32 (AVX512-BF16 or AVX-512F, detected at run
    /// time). For batched encoding, which is bound by multiply-adds, not bytes: near-lossless,
    /// and the tiled GEMM beats the block formats' row-by-row products there.
    Bf16,
    /// Not a quantization: the exact f32 weights, packed once for a register-tiled f32 GEMM (4
    /// bytes per weight, a second copy). The CPU embedder uses it by default; for a few rows it is
    /// faster than products that stream the unpacked weight, for many it saves packing the weight
    /// on every call.
    F32,
    /// int16 weights with one f32 scale per output row, 2 bytes per weight; activations are
    /// quantized to int16 per row and per product, and the integer sums are exact (AVX512-VNNI
    /// `vpdpwssd` where the CPU has it). For batched encoding: twice the f32 multiply-add rate on
    /// AVX512-VNNI CPUs, with roundings about five times finer than bf16's (see
    /// `models::i16_gemm`).
    I16,
    /// 8-bit values, one scale per block of 32: 1.125 bytes per weight, near-lossless.
    Q8_0,
    /// 4-bit values, a scale and a minimum per block of 32: 0.75 bytes per weight. Exact for
    /// weights that come from a q4_1 GGUF.
    Q4_1,
    /// 4-bit values, one scale per block of 32: 0.625 bytes per weight.
    Q4_0,
}

impl QuantFormat {
    /// Every format, as the CLI lists them.
    pub const ALL: [QuantFormat; 6] = [
        QuantFormat::Bf16,
        QuantFormat::F32,
        QuantFormat::I16,
        QuantFormat::Q8_0,
        QuantFormat::Q4_1,
        QuantFormat::Q4_0,
    ];

    /// The name used on the command line and in GGUF files.
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Bf16 => "bf16",
            QuantFormat::I16 => "i16",
            QuantFormat::F32 => "f32",
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_1 => "q4_1",
            QuantFormat::Q4_0 => "q4_0",
        }
    }

    /// What the input width of a quantized weight must be a multiple of (two blocks of 32 for
    /// the block formats: q4 packs block pairs; any width for bf16).
    pub fn width_multiple(self) -> usize {
        match self {
            QuantFormat::Bf16 | QuantFormat::I16 | QuantFormat::F32 => 1,
            _ => K_MULTIPLE,
        }
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

/// Above this many input rows a packed f32 copy is passed over for the dense product.
const PACKED_F32_MAX_ROWS: usize = 2048;

/// The storage of a quantized copy.
#[derive(Debug, Clone)]
enum Storage {
    Blocks(Arc<QMatrix>),
    Bf16(Arc<Bf16Matrix>),
    I16(Arc<I16Matrix>),
    F32(Arc<F32Matrix>),
}

/// A quantized copy of a dense `[out, in]` weight, tied to the tensor it was made from.
#[derive(Debug, Clone)]
pub struct QuantizedWeight {
    storage: Storage,
    out_dim: usize,
    in_dim: usize,
    source: TensorId,
    format: QuantFormat,
}

impl QuantizedWeight {
    /// Quantizes `weight` (`[out, in]`, any float dtype, on the CPU); `name` labels errors.
    pub fn new(name: &str, weight: &Tensor, format: QuantFormat) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let block = format.width_multiple();
        if !weight.device().is_cpu() {
            return Err(Error::Invalid(format!(
                "`{name}`: quantized inference runs on the CPU only (weight is on {:?})",
                weight.device().location()
            )));
        }
        if in_dim % block != 0 || in_dim == 0 {
            return Err(Error::TensorShape {
                name: format!(
                    "{name} ({format} needs the input width to be a multiple of {block})"
                ),
                expected: vec![out_dim, in_dim.next_multiple_of(block).max(block)],
                found: vec![out_dim, in_dim],
            });
        }
        let w = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let storage = match format {
            QuantFormat::Bf16 => Storage::Bf16(Arc::new(Bf16Matrix::new(&w, out_dim, in_dim))),
            QuantFormat::I16 => Storage::I16(Arc::new(I16Matrix::new(&w, out_dim, in_dim))),
            QuantFormat::F32 => Storage::F32(Arc::new(F32Matrix::new(&w, out_dim, in_dim))),
            QuantFormat::Q8_0 => Storage::Blocks(Arc::new(QMatrix::q8(&w))),
            QuantFormat::Q4_1 => Storage::Blocks(Arc::new(QMatrix::q4_1(&w))),
            QuantFormat::Q4_0 => Storage::Blocks(Arc::new(QMatrix::q4_0(&w))),
        };
        Ok(Self {
            storage,
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

    /// Whether products with `x` should use this copy. A packed f32 copy pays for short batches
    /// only: past [`PACKED_F32_MAX_ROWS`] rows the dense product (the `gemm` crate's, which packs
    /// the weight per call) was 4-6% faster (all-MiniLM, 256 documents a batch). The other formats
    /// serve every size.
    pub fn serves(&self, x: &Tensor) -> bool {
        let rows = x.elem_count() / self.in_dim.max(1);
        self.format != QuantFormat::F32 || rows <= PACKED_F32_MAX_ROWS
    }

    /// Bytes of the quantized copy: what one product reads instead of the dense weight.
    pub fn size_in_bytes(&self) -> usize {
        match &self.storage {
            Storage::Blocks(b) => b.size_in_bytes(),
            Storage::Bf16(m) => m.size_in_bytes(),
            Storage::I16(m) => m.size_in_bytes(),
            Storage::F32(m) => m.size_in_bytes(),
        }
    }

    /// `x [.., in] -> x W^T [.., out]` on the quantized copy, in `x`'s dtype (computed in f32).
    /// No gradient flows through it.
    pub fn matmul_t(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward(x, None)
    }

    /// [`QuantizedWeight::matmul_t`] plus `bias` (`[out]`), which the bf16 product adds as it
    /// gathers its output blocks.
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        if dims.last() != Some(&self.in_dim) {
            candle_core::bail!(
                "quantized linear: input {dims:?} does not fit weight [{}, {}]",
                self.out_dim,
                self.in_dim
            );
        }
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = self.out_dim;
        }
        // The tiled formats add the bias as they write their output.
        let b = || {
            bias.map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
                .transpose()
        };
        let out = match &self.storage {
            Storage::Bf16(w) => tiled_gemm::matmul(w, x, b()?.as_deref())?,
            Storage::I16(w) => tiled_gemm::matmul(w, x, b()?.as_deref())?,
            Storage::F32(w) => tiled_gemm::matmul(w, x, b()?.as_deref())?,
            Storage::Blocks(w) => {
                let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let acts = QActs::new(&xs, self.in_dim);
                let rows = acts.rows();
                let job = BlockGemv {
                    w: w.clone(),
                    x: acts,
                };
                let out = gemv_pool::run(Arc::new(job), self.out_dim, rows);
                let y = Tensor::from_vec(out, out_dims, x.device())?.to_dtype(x.dtype())?;
                return match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                };
            }
        };
        Tensor::from_vec(out, out_dims, x.device())?.to_dtype(x.dtype())
    }

    /// The weight as the quantized copy represents it, `[out, in]`, f32.
    pub fn dequantize(&self) -> candle_core::Result<Tensor> {
        let w = match &self.storage {
            Storage::Blocks(b) => b.dequantize(),
            Storage::Bf16(m) => m.dequantize(),
            Storage::I16(m) => m.dequantize(),
            Storage::F32(m) => m.dequantize(),
        };
        Tensor::from_vec(w, (self.out_dim, self.in_dim), &candle_core::Device::Cpu)
    }
}

/// One product: quantized weight rows against quantized activation rows.
struct BlockGemv {
    w: Arc<QMatrix>,
    x: QActs,
}

impl RowJob for BlockGemv {
    fn cost_per_output(&self) -> usize {
        self.x.k
    }

    fn compute(&self, outs: std::ops::Range<usize>, dst: &mut [f32]) {
        self.w.gemv(&self.x, outs, dst, true);
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
