//! Model definitions. Models never mention LoRA: their projections are [`linear::LinearSlot`]s that
//! `lora::apply_lora` replaces by module path.

pub mod bert;
mod bf16_gemm;
mod f32_gemm;
mod gemv_pool;
mod i16_gemm;
pub mod linear;
pub mod llama;
mod qgemv;
pub mod quantized;
mod simd;
mod tiled_gemm;

pub use linear::{Linear, LinearLayer, LinearSlot};
pub use llama::{KvCache, Llama};
pub use quantized::{quantize_linears, QuantFormat, QuantizeSpec};
