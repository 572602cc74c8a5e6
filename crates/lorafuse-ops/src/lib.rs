//! Fused Candle custom ops with a backward pass, and a stock-Candle fallback for each.
//!
//! Every op lives in its own folder: `mod.rs` holds the public function, the `CustomOp` (forward on
//! every backend **and** `bwd`) and the dispatch; `reference.rs` composes the same math from stock
//! Candle ops and serves as both the fallback and the test oracle.
//!
//! Dispatch picks the fused kernel when the backend, dtype and layout are supported, else the
//! reference. `LORAFUSE_KERNELS=reference` forces the reference everywhere (debugging, A/B timing).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let x = Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu)?;
//! let w = Tensor::ones(4, candle_core::DType::F32, &Device::Cpu)?;
//! let y = lorafuse_ops::rms_norm(&x, &w, 1e-6)?;
//! assert_eq!(y.dims(), &[1, 4]);
//! # Ok::<(), candle_core::Error>(())
//! ```

pub mod adamw;
pub mod attention;
mod cpu_util;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
mod cuda_util;
mod device_setup;
mod dispatch;
pub mod encoder_attention;
mod error;
pub mod fused_decode;
pub mod layer_norm;
pub mod lora_linear;
#[cfg(feature = "metal")]
mod metal_util;
pub mod rms_norm;
pub mod rope;
pub mod softmax;
pub mod swiglu;

pub use adamw::{adamw_step, AdamWParams};
pub use attention::causal_attention;
pub use cross_entropy::{cross_entropy, linear_cross_entropy_sum, Reduction};
pub use device_setup::{configure_device, peak_allocated_bytes};
pub use dispatch::{kernel_mode, set_kernel_mode, KernelMode};
pub use encoder_attention::encoder_attention;
pub use error::OpError;
pub use fused_decode::{DecoderWeights, FusedDecoder, LayerWeights};
pub use layer_norm::layer_norm;
pub use lora_linear::{frozen_linear, lora_delta, lora_linear};
pub use rms_norm::{add_rms_norm, rms_norm};
pub use rope::{rope, RopeLayout};
pub use softmax::softmax_last_dim;
pub use swiglu::swiglu;
