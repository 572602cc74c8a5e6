//! The projection layer models are built from, and the slot that adapters replace.

use super::quantized::{QuantFormat, QuantizedWeight};
use candle_core::{Result, Tensor};
use std::any::Any;

/// Anything that can stand where a model has a linear projection: the frozen base layer, or a
/// LoRA wrapper around it.
pub trait LinearLayer: Send + Sync + std::fmt::Debug {
    /// `x [.., in] -> [.., out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The frozen base layer underneath.
    fn base(&self) -> &Linear;
    /// For downcasting to a concrete wrapper (adapter management).
    fn as_any(&self) -> &dyn Any;
    /// Mutable downcasting.
    fn as_any_mut(&mut self) -> &mut dyn Any;
    /// True when `forward` is exactly the base layer's product (no live adapter on top), so that
    /// an engine reading the base weights directly computes the same thing.
    fn is_plain(&self) -> bool {
        false
    }
}

/// A model's projection: boxed so that an adapter can be put in its place.
pub type LinearSlot = Box<dyn LinearLayer>;

/// A frozen `y = x W^T + b`, `W` `[out, in]` as stored in checkpoints. Its forward never computes
/// a gradient for `W` or `b` (see `lorafuse_ops::frozen_linear`).
///
/// It may also hold a quantized copy of `W` (see [`super::quantized`]): inference inputs (no
/// gradient tracked) then take the quantized product, as long as `weight` is still the tensor the
/// copy was made from.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    quantized: Option<QuantizedWeight>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            quantized: None,
        }
    }

    /// Loads `weight` (and `bias` when `bias` is set) under `vb`, checking the shape.
    pub fn load(
        vb: &candle_nn::VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self::new(weight, bias))
    }

    /// Makes a quantized copy of the current weight for inference (`name` labels errors).
    pub fn quantize(&mut self, name: &str, format: QuantFormat) -> crate::Result<()> {
        self.quantized = Some(QuantizedWeight::new(name, &self.weight, format)?);
        Ok(())
    }

    /// Drops the quantized copy: every forward is dense again.
    pub fn clear_quantized(&mut self) {
        self.quantized = None;
    }

    /// The quantized copy, if it is still a copy of the current weight.
    pub fn quantized(&self) -> Option<&QuantizedWeight> {
        self.quantized
            .as_ref()
            .filter(|q| q.is_copy_of(&self.weight))
    }

    /// `x W^T + b` from the quantized copy, or `None` when the dense product must run: no valid
    /// copy, `x` tracks a gradient (training differentiates through the exact weight), or the
    /// copy leaves inputs of this size to the dense product ([`QuantizedWeight::serves`]).
    pub fn forward_quantized(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(q) = self.quantized() else {
            return Ok(None);
        };
        if x.track_op() || !q.serves(x) {
            return Ok(None);
        }
        Ok(Some(q.forward(x, self.bias.as_ref())?))
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    /// Boxes the layer into a slot.
    pub fn into_slot(self) -> LinearSlot {
        Box::new(self)
    }
}

impl LinearLayer for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_quantized(x)? {
            return Ok(y);
        }
        lorafuse_ops::frozen_linear(x, &self.weight, self.bias.as_ref())
    }
    fn base(&self) -> &Linear {
        self
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    fn is_plain(&self) -> bool {
        true
    }
}
