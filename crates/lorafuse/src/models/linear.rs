//! The projection layer models are built from, and the slot that adapters replace.

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
}

/// A model's projection: boxed so that an adapter can be put in its place.
pub type LinearSlot = Box<dyn LinearLayer>;

/// A frozen `y = x W^T + b`, `W` `[out, in]` as stored in checkpoints. Its forward never computes
/// a gradient for `W` or `b` (see `lorafuse_ops::frozen_linear`).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Loads `weight` (and `bias` when `bias` is set) under `vb`, checking the shape.
    pub fn load(vb: &candle_nn::VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Self { weight, bias })
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
}
