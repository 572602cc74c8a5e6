//! The ops crate's error type. Ops return `candle_core::Result` (Candle's `CustomOp` traits demand
//! it); these variants travel inside `candle_core::Error::Wrapped` and keep the op and shapes.

/// What can go wrong in a fused op, with the op's name and the shapes involved.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("{op}: unsupported dtype {dtype:?}")]
    DType {
        op: &'static str,
        dtype: candle_core::DType,
    },
    #[error("{op}: this build of lorafuse-ops has no {backend} support (built without the `{backend}` feature)")]
    BuiltWithout {
        op: &'static str,
        backend: &'static str,
    },
    #[error("{op}: {msg}")]
    Kernel { op: &'static str, msg: String },
}

impl From<OpError> for candle_core::Error {
    fn from(e: OpError) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// Shorthand for a shape error.
pub(crate) fn shape_err(op: &'static str, msg: impl Into<String>) -> candle_core::Error {
    OpError::Shape {
        op,
        msg: msg.into(),
    }
    .into()
}
