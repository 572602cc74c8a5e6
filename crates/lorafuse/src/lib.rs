//! lorafuse: LoRA fine-tuning, text generation and sentence embeddings on Candle, with fused
//! kernels from `lorafuse-ops` on the hot paths.

pub mod config;
pub mod data;
pub mod device;
pub mod embed;
pub mod error;
pub mod generate;
pub mod loading;
pub mod lora;
pub mod models;
pub mod perplexity;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
