//! Every fused op against its reference, on the CPU and, when built with `cuda` and a GPU is
//! present, on CUDA. One test binary (rather than one per op) so that a CUDA build ships to the GPU
//! machine as a single executable.

#[macro_use]
mod common;

mod adamw;
mod attention;
mod cross_entropy;
mod encoder_attention;
mod fused_decode;
mod lora_linear;
mod norms;
mod rope;
mod softmax;
mod swiglu;
