//! LoRA training: [`TrainConfig`] (every option and its default), the [`Trainer`] loop (AdamW with
//! f32 moments, LR schedules, gradient accumulation and clipping, validation), checkpoints that
//! resume exactly, a JSONL log and a loss-curve PNG.
//!
//! ```no_run
//! # fn demo(model: &mut lorafuse::models::Llama, data: lorafuse::train::TrainData) -> lorafuse::Result<()> {
//! use lorafuse::train::{TrainConfig, Trainer};
//! let cfg = TrainConfig { iters: 100, ..TrainConfig::default() };
//! let mut trainer = Trainer::new(model, cfg, data, Some(std::path::Path::new("adapters/run")))?;
//! trainer.run(&mut |event| println!("{event:?}"))?;
//! # Ok(()) }
//! ```

pub mod checkpoint;
pub mod config;
pub mod log;
pub mod loss;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod trainer;

pub use checkpoint::{resolve_checkpoint, TrainerState};
pub use config::{parse_targets, LoraSettings, Schedule, TrainConfig};
pub use log::{LogRecord, TrainLog};
pub use optim::{clip_grad_norm, global_norm, AdamW};
pub use schedule::lr_at;
pub use trainer::{Report, StepStats, TrainData, TrainEvent, TrainSummary, Trainer, ADAPTER_NAME};
