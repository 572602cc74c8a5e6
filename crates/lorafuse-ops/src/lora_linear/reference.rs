//! LoRA linear composed from stock Candle ops: the fallback and the test oracle.

use crate::error::shape_err;
use candle_core::{Result, Tensor, D};

/// `x [.., in] @ w^T [in, out]` for any number of leading dims.
fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let in_dim = x.dim(D::Minus1)?;
    let (out, w_in) = w.dims2()?;
    if in_dim != w_in {
        return Err(shape_err(
            "lora_linear",
            format!("input {:?} does not fit weight {:?}", x.dims(), w.dims()),
        ));
    }
    let mut lead: Vec<usize> = x.dims().to_vec();
    lead.pop();
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, in_dim))?.matmul(&w.t()?)?;
    lead.push(out);
    y.reshape(lead)
}

/// `x W^T + bias` with `W` detached so that no gradient reaches it.
pub fn frozen_linear_reference(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = matmul_t(x, &w.detach())?;
    match bias {
        Some(b) => y.broadcast_add(&b.detach()),
        None => Ok(y),
    }
}

/// `scale * (x A^T) B^T`.
pub fn lora_delta_reference(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    matmul_t(&matmul_t(x, a)?, b)? * scale
}
