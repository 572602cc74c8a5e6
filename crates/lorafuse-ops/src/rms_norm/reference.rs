//! RMSNorm composed from stock Candle ops: the fallback and the test oracle. Statistics are taken
//! in f32 for half-precision inputs, as transformers does.

use candle_core::{DType, Result, Tensor, D};

/// `x / sqrt(mean(x^2, -1) + eps) * weight`.
pub fn rms_norm_reference(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let internal = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let xf = x.to_dtype(internal)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(ms + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}
