//! The training loop: batches, loss, accumulation, clipping, AdamW, validation, checkpoints and
//! the log, with every source of randomness derived from the seed and the step so that a resumed
//! run repeats a straight run exactly.

use super::checkpoint::{self, TrainerState};
use super::config::TrainConfig;
use super::log::{peak_rss_bytes, LogRecord, TrainLog};
use super::loss::{accumulate_grads, evaluate};
use super::optim::{clip_grad_norm, AdamW};
use super::schedule::lr_at;
use crate::data::batch::batches_in_order;
use crate::data::{Batch, BatchConfig, BatchIter, Example};
use crate::lora::{apply_lora, load_peft, reseed_dropout, save_peft, set_training, trainable_vars};
use crate::models::Llama;
use crate::{Error, Result};
use candle_core::{DType, Var};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The name of the adapter the trainer creates and saves.
pub const ADAPTER_NAME: &str = "default";

/// Tokenised training data.
#[derive(Debug, Clone)]
pub struct TrainData {
    pub train: Arc<[Example]>,
    /// May be empty: validation is then skipped.
    pub valid: Vec<Example>,
    /// The id that pads rows (see [`crate::data::pad_id`]).
    pub pad_id: u32,
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Non-padding tokens in the step's batches.
    pub tokens: usize,
    pub target_tokens: usize,
    pub secs: f64,
}

/// The mlx-lm-style summary of the steps since the previous report.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub step: usize,
    /// Mean of the steps' losses.
    pub train_loss: f64,
    pub lr: f64,
    pub it_per_s: f64,
    pub tokens_per_s: f64,
    pub trained_tokens: usize,
    /// Peak resident memory of the process when training on the CPU; on CUDA the device memory
    /// pool's high-water mark (what `torch.cuda.max_memory_allocated` reports); `None` where the
    /// backend does not say (the log line shows `n/a`).
    pub peak_mem_bytes: Option<u64>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mem = match self.peak_mem_bytes {
            Some(b) => format!("{:.3} GB", b as f64 / 1e9),
            None => "n/a".into(),
        };
        write!(
            f,
            "Iter {}: train loss {:.3}, lr {:.3e}, it/s {:.3}, tokens/s {:.1}, trained tokens {}, peak mem {mem}",
            self.step, self.train_loss, self.lr, self.it_per_s, self.tokens_per_s, self.trained_tokens
        )
    }
}

/// Progress the loop reports as it goes.
#[derive(Debug)]
pub enum TrainEvent<'a> {
    Step(&'a StepStats),
    Report(&'a Report),
    /// Validation loss after `step` steps (step 0: before training).
    Validation {
        step: usize,
        loss: f64,
    },
    Checkpoint {
        step: usize,
        dir: &'a Path,
    },
}

/// The outcome of [`Trainer::run`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub steps: usize,
    pub trained_tokens: usize,
    /// `(step, loss)` of each validation, first to last.
    pub val_losses: Vec<(usize, f64)>,
    pub secs: f64,
}

/// Trains adapter [`ADAPTER_NAME`] on a decoder.
pub struct Trainer<'m> {
    model: &'m mut Llama,
    cfg: TrainConfig,
    params: Vec<(String, Var)>,
    opt: AdamW,
    batches: BatchIter,
    valid: Vec<Batch>,
    step: usize,
    trained_tokens: usize,
    log: TrainLog,
    out_dir: Option<PathBuf>,
}

impl<'m> Trainer<'m> {
    /// Adds a fresh adapter made from `cfg.lora` (f32 matrices, init seeded by `cfg.seed`) and
    /// prepares to train it. With `out_dir`, the log, checkpoints and the final adapter go there.
    pub fn new(
        model: &'m mut Llama,
        cfg: TrainConfig,
        data: TrainData,
        out_dir: Option<&Path>,
    ) -> Result<Self> {
        cfg.validate()?;
        if data.train.is_empty() {
            return Err(Error::Invalid("the training set holds no example".into()));
        }
        let lora = cfg.lora_config(model, model.config().num_hidden_layers)?;
        apply_lora(model, ADAPTER_NAME, &lora, DType::F32, cfg.seed)?;
        let log = TrainLog::create(out_dir, Vec::new())?;
        Self::build(model, cfg, data, out_dir, 0, 0, Default::default(), log)
    }

    /// Continues from checkpoint folder `ckpt` (see [`checkpoint::resolve_checkpoint`]): the
    /// adapter, optimizer moments, step, data position and log come from it. `cfg` may change
    /// options such as `iters`; its LoRA settings must equal the checkpoint's.
    pub fn resume(
        model: &'m mut Llama,
        cfg: TrainConfig,
        ckpt: &Path,
        data: TrainData,
        out_dir: Option<&Path>,
    ) -> Result<Self> {
        cfg.validate()?;
        let state = checkpoint::read_state(ckpt)?;
        if cfg.lora != state.config.lora {
            return Err(Error::Invalid(format!(
                "the LoRA settings differ from checkpoint {}'s ({:?}): an adapter's shape cannot change on resume",
                ckpt.display(),
                state.config.lora
            )));
        }
        if cfg.iters < state.step {
            return Err(Error::Invalid(format!(
                "iters {} is below the checkpoint's step {}",
                cfg.iters, state.step
            )));
        }
        load_peft(model, ckpt, ADAPTER_NAME, DType::F32)?;
        let log = TrainLog::create(out_dir, state.log.clone())?;
        let t = Self::build(
            model,
            cfg,
            data,
            out_dir,
            state.step,
            state.trained_tokens,
            state.data_position,
            log,
        )?;
        checkpoint::load_optimizer(ckpt, &t.opt)?;
        Ok(t)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        model: &'m mut Llama,
        cfg: TrainConfig,
        data: TrainData,
        out_dir: Option<&Path>,
        step: usize,
        trained_tokens: usize,
        pos: crate::data::DataPosition,
        log: TrainLog,
    ) -> Result<Self> {
        set_training(model, true);
        let params = trainable_vars(model);
        let opt = AdamW::new(&params)?;
        let bcfg = BatchConfig {
            batch_size: cfg.batch_size,
            max_seq_len: cfg.max_seq_len,
            packing: cfg.packing,
            pad_id: data.pad_id,
            seed: cfg.seed,
        };
        let batches = BatchIter::resume(data.train, bcfg, pos)?;
        let mut valid = batches_in_order(&data.valid, cfg.batch_size, data.pad_id);
        if cfg.val_batches > 0 {
            valid.truncate(cfg.val_batches);
        }
        if let Some(d) = out_dir {
            let json = serde_json::to_vec_pretty(&cfg)
                .map_err(|e| Error::Invalid(format!("serialising the config: {e}")))?;
            crate::error::write_atomic(&d.join("train_config.json"), &json)?;
        }
        Ok(Self {
            model,
            cfg,
            params,
            opt,
            batches,
            valid,
            step,
            trained_tokens,
            log,
            out_dir: out_dir.map(Path::to_path_buf),
        })
    }

    /// Optimizer steps done.
    pub fn step_count(&self) -> usize {
        self.step
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The trained parameters by name (PEFT's in-memory names).
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The model being trained.
    pub fn model(&self) -> &Llama {
        self.model
    }

    /// The log so far.
    pub fn log(&self) -> &TrainLog {
        &self.log
    }

    /// One optimizer step: `grad_accum` micro-batches, clipping, AdamW. A non-finite loss or
    /// gradient norm stops with [`Error::Training`] naming the step; the parameters are then
    /// left as they were before the step.
    pub fn train_step(&mut self) -> Result<StepStats> {
        let start = Instant::now();
        let step = self.step + 1;
        // Dropout masks depend on the seed and the step only, so a resumed run repeats them.
        let step_seed = self.cfg.seed.wrapping_add(step as u64);
        reseed_dropout(self.model, step_seed);
        // Off the CPU, dropout masks come from the device's generator.
        if !self.model.device().is_cpu() {
            self.model.device().set_seed(step_seed)?;
        }
        let batches: Vec<Batch> = (0..self.cfg.grad_accum)
            .map(|_| self.batches.next_batch())
            .collect();
        let vars: Vec<Var> = self.params.iter().map(|(_, v)| v.clone()).collect();
        let mut g = accumulate_grads(self.model, &vars, &batches)?;
        if !g.loss.is_finite() {
            return Err(Error::Training {
                step,
                msg: format!(
                    "the loss is {} (diverged or bad weights); lower lr or check the data",
                    g.loss
                ),
            });
        }
        let grad_norm = match self.cfg.clip_grad_norm {
            Some(max) => clip_grad_norm(&mut g.grads, max)?,
            None => super::optim::global_norm(&g.grads)?,
        };
        if !grad_norm.is_finite() {
            return Err(Error::Training {
                step,
                msg: format!("the gradient norm is {grad_norm}"),
            });
        }
        let lr = lr_at(&self.cfg, step);
        self.opt.step(&vars, &g.grads, step, &self.cfg.adamw(lr))?;
        self.step = step;
        self.trained_tokens += g.tokens;
        let secs = start.elapsed().as_secs_f64();
        let stats = StepStats {
            step,
            loss: g.loss,
            lr,
            grad_norm,
            tokens: g.tokens,
            target_tokens: g.target_tokens,
            secs,
        };
        self.log.push(LogRecord {
            step,
            loss: Some(g.loss),
            lr: Some(lr),
            grad_norm: Some(grad_norm),
            tokens_per_s: Some(g.tokens as f64 / secs.max(1e-9)),
            trained_tokens: Some(self.trained_tokens),
            val_loss: None,
        })?;
        Ok(stats)
    }

    /// Mean validation loss with dropout off, logged at the current step; `None` without
    /// validation data.
    pub fn validate(&mut self) -> Result<Option<f64>> {
        if self.valid.is_empty() {
            return Ok(None);
        }
        set_training(self.model, false);
        let loss = evaluate(self.model, &self.valid);
        set_training(self.model, true);
        let loss = loss?;
        if !loss.is_finite() {
            return Err(Error::Training {
                step: self.step,
                msg: format!("the validation loss is {loss}"),
            });
        }
        self.log.push(LogRecord {
            step: self.step,
            val_loss: Some(loss),
            ..Default::default()
        })?;
        Ok(Some(loss))
    }

    /// The state a checkpoint stores.
    pub fn state(&self) -> TrainerState {
        TrainerState {
            step: self.step,
            data_position: self.batches.position(),
            trained_tokens: self.trained_tokens,
            config: self.cfg.clone(),
            log: self.log.records.clone(),
        }
    }

    /// Writes `dir` as a checkpoint of the current state.
    pub fn save_checkpoint_to(&self, dir: &Path) -> Result<()> {
        checkpoint::save_checkpoint(dir, &*self.model, ADAPTER_NAME, &self.opt, &self.state())
    }

    /// Saves the adapter (PEFT format) and the loss plot into the output folder, if any.
    pub fn save_outputs(&self) -> Result<()> {
        let Some(dir) = &self.out_dir else {
            return Ok(());
        };
        save_peft(&*self.model, ADAPTER_NAME, dir)?;
        let png = super::plot::loss_png(&self.log.train_points(), &self.log.val_points())?;
        crate::error::write_atomic(&dir.join(super::plot::PLOT_FILE), &png)
    }

    /// Trains up to `cfg.iters` steps: validation before the first step and every `val_every`
    /// steps and after the last, a report every `steps_per_report`, a checkpoint every
    /// `save_every` steps (with an output folder), then the final adapter and the plot.
    pub fn run(&mut self, on_event: &mut dyn FnMut(TrainEvent<'_>)) -> Result<TrainSummary> {
        let start = Instant::now();
        let first_step = self.step;
        let val_every = self.cfg.val_every;
        let mut val_losses = Vec::new();
        if val_every > 0 && self.step == 0 {
            if let Some(l) = self.validate()? {
                on_event(TrainEvent::Validation { step: 0, loss: l });
                val_losses.push((0, l));
            }
        }
        let (mut win_loss, mut win_steps, mut win_tokens) = (0f64, 0usize, 0usize);
        let mut win_start = Instant::now();
        while self.step < self.cfg.iters {
            let s = self.train_step()?;
            on_event(TrainEvent::Step(&s));
            win_loss += s.loss;
            win_steps += 1;
            win_tokens += s.tokens;
            let last = self.step == self.cfg.iters;
            if self.step.is_multiple_of(self.cfg.steps_per_report) || last {
                let secs = win_start.elapsed().as_secs_f64().max(1e-9);
                let r = Report {
                    step: self.step,
                    train_loss: win_loss / win_steps as f64,
                    lr: s.lr,
                    it_per_s: win_steps as f64 / secs,
                    tokens_per_s: win_tokens as f64 / secs,
                    trained_tokens: self.trained_tokens,
                    peak_mem_bytes: if self.model.device().is_cpu() {
                        peak_rss_bytes()
                    } else {
                        lorafuse_ops::peak_allocated_bytes(self.model.device())
                    },
                };
                on_event(TrainEvent::Report(&r));
                (win_loss, win_steps, win_tokens) = (0.0, 0, 0);
                win_start = Instant::now();
            }
            if val_every > 0 && (self.step.is_multiple_of(val_every) || last) {
                if let Some(l) = self.validate()? {
                    on_event(TrainEvent::Validation {
                        step: self.step,
                        loss: l,
                    });
                    val_losses.push((self.step, l));
                }
            }
            if let Some(out) = &self.out_dir {
                if self.cfg.save_every > 0 && self.step.is_multiple_of(self.cfg.save_every) {
                    let dir = checkpoint::checkpoint_dir(out, self.step);
                    self.save_checkpoint_to(&dir)?;
                    on_event(TrainEvent::Checkpoint {
                        step: self.step,
                        dir: &dir,
                    });
                }
            }
        }
        self.save_outputs()?;
        Ok(TrainSummary {
            steps: self.step - first_step,
            trained_tokens: self.trained_tokens,
            val_losses,
            secs: start.elapsed().as_secs_f64(),
        })
    }
}
