//! Metal: the generic engine (Candle's Metal GEMMs) with an elementwise-op epilogue.

use super::engine::{epilogue_ops, EngineStorage};
use super::OP;
use crate::error::shape_err;
use candle_core::{Layout, MetalStorage, Result, Storage};

impl EngineStorage for MetalStorage {
    fn pick(s: &Storage) -> Result<&Self> {
        match s {
            Storage::Metal(s) => Ok(s),
            _ => Err(shape_err(
                OP,
                "weights are on another device than the input",
            )),
        }
    }

    fn wrap(self) -> Storage {
        Storage::Metal(self)
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
}
