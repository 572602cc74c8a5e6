//! Opt-in quantized inference for the frozen projections.
//!
//! Batch-1 decoding on a CPU is bound by the bytes of weight read per token (540 MB for
//! SmolLM2-135M in f32). Storing the frozen base weights in a GGML block format cuts that by 4x
//! (q8_0) to 7x (q4_0), and Candle's quantized matmul runs on them with SIMD dot products
//! (activations quantized per 32-block on the fly).
//!
//! The quantized copy lives beside the dense weight in [`Linear`]; models never see it. It is only
//! used when the input tracks no gradient (inference), and only while the dense weight is the very
//! tensor it was made from: merging an adapter replaces the weight, which silently retires the
//! stale copy (the layer falls back to the dense product) instead of computing with old weights.
//! The dense weight stays in memory: merging, exporting and training read it.

use super::linear::Linear;
use crate::lora::HasLinears;
use crate::{Error, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Tensor, TensorId};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A GGML block format for frozen weights. All three use blocks of 32 input columns, so any
/// input width that is a multiple of 32 works (the k-quants need multiples of 256, which
/// SmolLM2's 576 is not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    /// 8-bit values, one f16 scale per block: 1.06 bytes per weight, near-lossless.
    Q8_0,
    /// 4-bit values, f16 scale and minimum per block: 0.625 bytes per weight.
    Q4_1,
    /// 4-bit values, one f16 scale per block: 0.5625 bytes per weight, the smallest.
    Q4_0,
}

impl QuantFormat {
    /// Every format, as the CLI lists them.
    pub const ALL: [QuantFormat; 3] = [QuantFormat::Q8_0, QuantFormat::Q4_1, QuantFormat::Q4_0];

    /// The name used on the command line and in GGUF files.
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_1 => "q4_1",
            QuantFormat::Q4_0 => "q4_0",
        }
    }

    /// Candle's block type.
    pub fn ggml(self) -> GgmlDType {
        match self {
            QuantFormat::Q8_0 => GgmlDType::Q8_0,
            QuantFormat::Q4_1 => GgmlDType::Q4_1,
            QuantFormat::Q4_0 => GgmlDType::Q4_0,
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

/// A quantized copy of a dense `[out, in]` weight, tied to the tensor it was made from.
#[derive(Debug, Clone)]
pub struct QuantizedWeight {
    q: Arc<QTensor>,
    source: TensorId,
    format: QuantFormat,
}

impl QuantizedWeight {
    /// Quantizes `weight` (`[out, in]`, any float dtype, on the CPU).
    pub fn new(name: &str, weight: &Tensor, format: QuantFormat) -> Result<Self> {
        let (_, in_dim) = weight.dims2()?;
        let block = format.ggml().block_size();
        if !weight.device().is_cpu() {
            return Err(Error::Invalid(format!(
                "`{name}`: quantized inference runs on the CPU only (weight is on {:?})",
                weight.device().location()
            )));
        }
        if in_dim % block != 0 {
            return Err(Error::TensorShape {
                name: format!("{name} ({format} needs the input width to be a multiple of {block})"),
                expected: vec![weight.dim(0)?, in_dim.next_multiple_of(block)],
                found: weight.dims().to_vec(),
            });
        }
        Ok(Self {
            q: Arc::new(QTensor::quantize(weight, format.ggml())?),
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

    /// Bytes of the quantized blocks.
    pub fn size_in_bytes(&self) -> usize {
        self.q.storage_size_in_bytes()
    }

    /// `x [.., in] -> x W^T [.., out]` on the quantized blocks. No gradient flows through it.
    pub fn matmul_t(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self.q.as_ref())
    }

    /// The weight as the quantized blocks represent it, `[out, in]`, f32.
    pub fn dequantize(&self) -> candle_core::Result<Tensor> {
        self.q.dequantize(&candle_core::Device::Cpu)
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
/// applied afterwards keep the base's copy and add their f32 delta on top.
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
