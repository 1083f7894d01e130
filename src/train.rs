//! The training loop: batching, learning-rate schedule, gradient accumulation, evaluation,
//! checkpoints, metrics and resume, over any [`Engine`].
//!
//! - **Data order**: epoch `e` visits the training examples in a permutation drawn from a
//!   generator seeded with `(seed, e)`; a step takes the next `batch_size · grad_accum` examples
//!   of that stream (a step may span two epochs). The data position is `(epoch, offset)`, so a
//!   checkpoint restores the order exactly.
//! - **Loss**: a step's loss is the mean over all target tokens of its examples. With gradient
//!   accumulation each micro-batch's gradient (of its own mean) is weighted by its share of the
//!   target tokens, so the step equals one big batch.
//! - **Update**: clip the global gradient norm (`max_grad_norm`, 0 = off), then one optimizer
//!   step at `lr · schedule(step)`. With the reparameterization the gradient flows through the
//!   MLP to its weights; at the end it is folded into a plain prefix.
//! - **Non-finite loss or gradient**: the run stops before the update, keeps the last good
//!   checkpoint untouched, and returns an error saying so.
//! - **fp16 overflow** (the GPU engine's dynamic loss scaling, [`GradOverflow`]): the step is
//!   skipped as torch's `GradScaler` skips it: no update, the step's remaining micro-batches are
//!   not run (its examples are still consumed), the step counts, and its metrics record has the
//!   loss so far, no `grad_norm`, and `overflow_skipped` (the running count) and `loss_scale`
//!   (the lowered scale). The scale is saved in checkpoints and restored on resume.
//! - **Outputs** in the run directory: `metrics.jsonl` (one line per step, plus the evaluations),
//!   `checkpoint/` (see [`crate::checkpoint`]), and at the end `prefix.safetensors`,
//!   `best_prefix.safetensors` (the prefix with the lowest eval loss) and `loss.svg`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{save_checkpoint, CheckpointParts};
use crate::data::{make_batch, Encoded};
use crate::engine::{Engine, StepOutcome, StepRequest};
use crate::optim::{AdamW, AdamWConfig, Optimizer, Schedule, Sgd, SgdConfig};
use crate::prefix::{save_prefix, PrefixBank, PrefixMeta, Reparam};
use crate::reference::model::RunOptions;
use crate::types::Batch;

/// Which optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adamw,
    Sgd,
}

/// Learning-rate schedule after the warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

/// The hyperparameters of a run (saved in checkpoints and prefix metadata).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    pub schedule: ScheduleKind,
    /// 0 = no clipping.
    pub max_grad_norm: f64,
    /// Total optimizer steps.
    pub steps: u64,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per step.
    pub grad_accum: usize,
    pub seed: u64,
    /// Evaluate every this many steps (0: only at the start and the end).
    pub eval_every: u64,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: u64,
}

impl TrainConfig {
    /// Checks every hyperparameter (finite, in range).
    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr must be a finite number > 0, got {}", self.lr);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!(
                "--weight-decay must be a finite number >= 0, got {}",
                self.weight_decay
            );
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            bail!(
                "--max-grad-norm must be a finite number >= 0 (0 turns clipping off), got {}",
                self.max_grad_norm
            );
        }
        if self.steps == 0 {
            bail!("the run has 0 steps (--steps or --epochs)");
        }
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if self.grad_accum == 0 {
            bail!("--grad-accum must be at least 1");
        }
        Ok(())
    }

    fn schedule(&self) -> Schedule {
        match self.schedule {
            ScheduleKind::Constant => Schedule::Constant {
                warmup: self.warmup_steps,
            },
            ScheduleKind::Linear => Schedule::Linear {
                warmup: self.warmup_steps,
                total: self.steps,
            },
            ScheduleKind::Cosine => Schedule::Cosine {
                warmup: self.warmup_steps,
                total: self.steps,
                cycles: 0.5,
            },
        }
    }

    /// A fresh optimizer for `n` parameters.
    pub fn new_optimizer(&self, n: usize) -> Optimizer {
        match self.optimizer {
            OptimizerKind::Adamw => Optimizer::AdamW(AdamW::new(
                AdamWConfig {
                    weight_decay: self.weight_decay,
                    ..AdamWConfig::default()
                },
                n,
            )),
            OptimizerKind::Sgd => Optimizer::Sgd(Sgd::new(SgdConfig {
                momentum: 0.0,
                weight_decay: self.weight_decay,
            })),
        }
    }
}

pub use crate::prefix::Trainable;

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricRecord {
    pub step: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f64>,
    /// Global gradient norm before clipping.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    /// Target tokens in this step.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens: Option<u64>,
    /// All tokens (input and target) processed so far in training.
    pub tokens_seen: u64,
    /// Seconds since the run started (across resumes).
    pub elapsed: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    /// Micro-batches skipped so far because they held no target token.
    pub skipped: u64,
    /// Steps skipped so far because the fp16 gradient overflowed (no update in those steps).
    #[serde(default)]
    pub overflow_skipped: u64,
    /// The engine's dynamic loss scale after this step (mixed-precision engines only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss_scale: Option<f64>,
}

/// The loop's state: what a checkpoint stores besides parameters and optimizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// Steps done.
    pub step: u64,
    /// Data position: epoch and offset into its permutation.
    pub epoch: u64,
    pub offset: usize,
    /// The data-order generator's seed (each epoch's permutation derives from it).
    pub rng_seed: u64,
    pub tokens_seen: u64,
    pub elapsed: f64,
    pub skipped: u64,
    /// Steps skipped because the fp16 gradient overflowed.
    #[serde(default)]
    pub overflow_skipped: u64,
    /// The engine's dynamic loss scale (restored on resume; `None` without one).
    #[serde(default)]
    pub loss_scale: Option<f32>,
    pub best_eval: Option<f64>,
    pub best_eval_step: Option<u64>,
    /// Every metrics record so far (the curve survives a resume).
    pub history: Vec<MetricRecord>,
}

/// A checkpoint's trainer state: the loop plus the configuration and the caller's arguments.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    pub config: TrainConfig,
    pub looping: LoopState,
    /// The command line's arguments as given (to rebuild the run on resume).
    pub args: serde_json::Value,
    /// `bank` or `reparam`, and the reparameterization's shape.
    pub trainable: TrainableShape,
}

/// Enough to rebuild a [`Trainable`] from flat parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TrainableShape {
    Bank {
        n_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        len: usize,
    },
    Reparam {
        n_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        len: usize,
        emb_dim: usize,
        hidden: usize,
    },
}

impl TrainableShape {
    pub fn of(t: &Trainable) -> Self {
        match t {
            Trainable::Bank(b) => TrainableShape::Bank {
                n_layers: b.n_layers,
                kv_heads: b.kv_heads,
                head_dim: b.head_dim,
                len: b.len,
            },
            Trainable::Reparam(r) => TrainableShape::Reparam {
                n_layers: r.n_layers,
                kv_heads: r.kv_heads,
                head_dim: r.head_dim,
                len: r.len,
                emb_dim: r.emb_dim,
                hidden: r.hidden,
            },
        }
    }

    /// How many parameters a trainable of this shape has; `None` when a size is 0 or the count
    /// overflows.
    pub fn n_params(&self) -> Option<usize> {
        let mul = |xs: &[usize]| {
            xs.iter()
                .try_fold(1usize, |a, &x| if x == 0 { None } else { a.checked_mul(x) })
        };
        match *self {
            TrainableShape::Bank {
                n_layers,
                kv_heads,
                head_dim,
                len,
            } => mul(&[2, n_layers, kv_heads, len, head_dim]),
            TrainableShape::Reparam {
                n_layers,
                kv_heads,
                head_dim,
                len,
                emb_dim,
                hidden,
            } => {
                let out = mul(&[2, n_layers, kv_heads, head_dim])?;
                [
                    mul(&[len, emb_dim])?,
                    mul(&[hidden, emb_dim])?,
                    hidden,
                    mul(&[out, hidden])?,
                    out,
                ]
                .iter()
                .try_fold(0usize, |a, &x| a.checked_add(x))
            }
        }
    }

    /// A trainable of this shape holding `flat` (checked before anything is allocated).
    pub fn build(&self, flat: &[f32]) -> Result<Trainable> {
        if self.n_params() != Some(flat.len()) {
            bail!(
                "the checkpoint holds {} parameters, its shape {self:?} needs {}",
                flat.len(),
                self.n_params().map_or(
                    "an impossible number (a size is 0 or too large)".into(),
                    |n| n.to_string()
                )
            );
        }
        let mut t = match *self {
            TrainableShape::Bank {
                n_layers,
                kv_heads,
                head_dim,
                len,
            } => Trainable::Bank(PrefixBank::zeros(1, n_layers, kv_heads, len, head_dim)),
            TrainableShape::Reparam {
                n_layers,
                kv_heads,
                head_dim,
                len,
                emb_dim,
                hidden,
            } => Trainable::Reparam(Reparam::random(
                n_layers, kv_heads, head_dim, len, emb_dim, hidden, 0,
            )),
        };
        if t.n_params() != flat.len() {
            bail!(
                "the checkpoint holds {} parameters, its shape {self:?} needs {}",
                flat.len(),
                t.n_params()
            );
        }
        t.copy_from_flat(flat);
        Ok(t)
    }
}

/// How a run reports and where it writes.
pub struct RunSetup<'a> {
    /// The run directory (created by the caller).
    pub out: &'a Path,
    pub run: RunOptions,
    pub pad_id: u32,
    /// Metadata for the prefix files written (prefix length and training args filled in).
    pub meta: PrefixMeta,
    /// The caller's arguments, stored in checkpoints.
    pub args: serde_json::Value,
    /// Stop (after checkpointing) once this run has done this many steps.
    pub stop_after: Option<u64>,
    /// Show a progress bar / log lines on stderr.
    pub progress: bool,
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    pub state: LoopState,
    /// The final prefix (folded).
    pub prefix: PrefixBank<f32>,
    /// Whether it stopped early on `stop_after`.
    pub stopped_early: bool,
    pub final_prefix_path: Option<PathBuf>,
}

/// Mean loss of `items` (Σ target losses / Σ target tokens) under `prefix`, in batches.
pub fn evaluate(
    engine: &mut dyn Engine,
    prefix: Option<&PrefixBank<f32>>,
    items: &[Encoded],
    batch_size: usize,
    pad_id: u32,
    run: &RunOptions,
) -> Result<(f64, u64)> {
    let mut sum = 0.0f64;
    let mut n = 0u64;
    for chunk in items.chunks(batch_size.max(1)) {
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let batch = make_batch(&refs, pad_id);
        let out = engine.loss(prefix, &batch, run)?;
        sum += out.loss_sum.iter().map(|&x| x as f64).sum::<f64>();
        n += out.n_targets.iter().sum::<usize>() as u64;
    }
    Ok((if n > 0 { sum / n as f64 } else { f64::NAN }, n))
}

/// The permutation of `n` training examples for `epoch`.
fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let s = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(epoch.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        ^ 0x7261_696E;
    order.shuffle(&mut StdRng::seed_from_u64(s));
    order
}

/// Appends records to `metrics.jsonl`.
struct MetricsFile {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsFile {
    /// Opens `metrics.jsonl` fresh with `history` as its content.
    fn create(out: &Path, history: &[MetricRecord]) -> Result<Self> {
        let path = out.join("metrics.jsonl");
        let mut text = String::new();
        for r in history {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        crate::prefix::file::write_atomic(&path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(MetricsFile { file, path })
    }
    fn push(&mut self, r: &MetricRecord) -> Result<()> {
        let line = serde_json::to_string(r)? + "\n";
        self.file
            .write_all(line.as_bytes())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Trains `trainable` on `train` (evaluating on `eval`) from a fresh start (`resume: None`) or
/// from a checkpoint's loop state and optimizer.
#[allow(clippy::too_many_arguments)]
pub fn train(
    engine: &mut dyn Engine,
    config: &TrainConfig,
    trainable: Trainable,
    resume: Option<(LoopState, Optimizer)>,
    train: &[Encoded],
    eval: &[Encoded],
    setup: &RunSetup,
) -> Result<TrainOutcome> {
    config.validate()?;
    if train.is_empty() {
        bail!("no training examples");
    }
    let n_params = trainable.n_params();
    let (mut st, optimizer) = match resume {
        Some((s, o)) => {
            o.check_len(n_params)?;
            if let Some(scale) = s.loss_scale {
                engine.set_loss_scale(scale);
            }
            (s, o)
        }
        None => (
            LoopState {
                step: 0,
                epoch: 0,
                offset: 0,
                rng_seed: config.seed,
                tokens_seen: 0,
                elapsed: 0.0,
                skipped: 0,
                overflow_skipped: 0,
                loss_scale: engine.loss_scale(),
                best_eval: None,
                best_eval_step: None,
                history: Vec::new(),
            },
            config.new_optimizer(n_params),
        ),
    };
    let schedule = config.schedule();
    let out = setup.out;
    // Records after the checkpoint's step are dropped (they will be redone).
    st.history.retain(|r| r.step <= st.step);
    let mut metrics = MetricsFile::create(out, &st.history)?;
    let started = Instant::now();
    let elapsed0 = st.elapsed;
    let elapsed = |st0: f64| st0 + started.elapsed().as_secs_f64();
    let shape = TrainableShape::of(&trainable);
    let state_for = |st: &LoopState| TrainerState {
        config: config.clone(),
        looping: st.clone(),
        args: setup.args.clone(),
        trainable: shape,
    };

    let mut order = epoch_order(st.rng_seed, st.epoch, train.len());
    // The engine keeps the training state from here on (the GPU engine: on the device).
    let mut state = engine.begin_training(trainable, optimizer)?;
    let mut prefix = engine.training_prefix(&mut *state)?;
    let per_step = config.batch_size * config.grad_accum;
    let mut steps_this_run = 0u64;

    let bar = make_bar(setup.progress, config.steps, st.step);
    let plain_log = setup.progress && !std::io::stderr().is_terminal();
    let log_every = (config.steps / 20).max(1);
    let say = |bar: &Option<indicatif::ProgressBar>, msg: String| match bar {
        Some(b) if !plain_log => b.println(msg),
        _ if setup.progress => eprintln!("{msg}"),
        _ => {}
    };

    // Evaluation before any training (fresh runs only).
    if st.step == 0 && !eval.is_empty() && st.history.iter().all(|r| r.eval_loss.is_none()) {
        let (e, _) = evaluate(
            engine,
            Some(&prefix),
            eval,
            config.batch_size,
            setup.pad_id,
            &setup.run,
        )?;
        let rec = MetricRecord {
            step: 0,
            loss: None,
            lr: None,
            grad_norm: None,
            tokens: None,
            tokens_seen: 0,
            elapsed: elapsed(elapsed0),
            eval_loss: Some(e),
            skipped: 0,
            overflow_skipped: 0,
            loss_scale: None,
        };
        metrics.push(&rec)?;
        st.history.push(rec);
        say(&bar, format!("step 0: eval loss {e:.4} (initial prefix)"));
    }

    let mut stopped_early = false;
    while st.step < config.steps {
        let step_started = Instant::now();
        // Gather the step's examples.
        let mut picked: Vec<&Encoded> = Vec::with_capacity(per_step);
        for _ in 0..per_step {
            if st.offset >= order.len() {
                st.epoch += 1;
                st.offset = 0;
                order = epoch_order(st.rng_seed, st.epoch, train.len());
            }
            picked.push(&train[order[st.offset]]);
            st.offset += 1;
        }
        // The step's micro-batches; those without a target token are skipped (and counted).
        // (tokens, target tokens) of every chunk; `micro` holds those with targets, `kept` their
        // chunk numbers.
        let mut chunks: Vec<(u64, usize)> = Vec::new();
        let (mut micro, mut kept): (Vec<Batch>, Vec<usize>) = (Vec::new(), Vec::new());
        for chunk in picked.chunks(config.batch_size) {
            let batch = make_batch(chunk, setup.pad_id);
            let tokens = batch.valid_len.iter().sum::<usize>() as u64;
            let n: usize = batch.n_targets().iter().sum();
            if n > 0 {
                kept.push(chunks.len());
                micro.push(batch);
            }
            chunks.push((tokens, n));
        }
        let step_targets: usize = chunks.iter().map(|c| c.1).sum();
        if step_targets == 0 {
            st.skipped += chunks.len() as u64;
            st.tokens_seen += chunks.iter().map(|c| c.0).sum::<u64>();
            st.step += 1;
            continue;
        }
        let lr = schedule.lr(config.lr, st.step);
        let outcome = engine.train_step(
            &mut *state,
            &StepRequest {
                micro: &micro,
                n_targets: step_targets,
                opts: &setup.run,
                lr,
                max_grad_norm: config.max_grad_norm,
            },
        )?;
        // The chunks the step went through: all, unless an fp16 overflow stopped it early.
        let chunks_run = match &outcome {
            StepOutcome::Skipped {
                micro_batches_run, ..
            } => kept[micro_batches_run - 1] + 1,
            _ => chunks.len(),
        };
        let step_tokens: u64 = chunks[..chunks_run].iter().map(|c| c.0).sum();
        st.tokens_seen += step_tokens;
        st.skipped += chunks[..chunks_run].iter().filter(|c| c.1 == 0).count() as u64;
        let (loss, n_targets, norm, overflow) = match outcome {
            StepOutcome::Updated {
                loss_sum,
                n_targets,
                grad_norm,
            } => (
                loss_sum / n_targets as f64,
                n_targets,
                Some(grad_norm),
                None,
            ),
            StepOutcome::Skipped {
                loss_sum,
                n_targets,
                new_scale,
                ..
            } => (
                loss_sum / n_targets as f64,
                n_targets,
                None,
                Some(new_scale),
            ),
            StepOutcome::NotFinite {
                loss_sum,
                grad_norm,
            } => {
                if let Some(b) = &bar {
                    b.abandon();
                }
                let loss = loss_sum / step_targets as f64;
                bail!(
                    "training stopped at step {}: the {} is not finite ({}); the prefix was not updated. \
                     The last good checkpoint (if any) is kept in {}; try a smaller --lr or --max-grad-norm",
                    st.step + 1,
                    if !loss.is_finite() { "loss" } else { "gradient norm" },
                    if !loss.is_finite() { loss } else { grad_norm },
                    out.join(crate::checkpoint::CHECKPOINT_DIR).display()
                );
            }
            StepOutcome::DivergedUpdate => {
                if let Some(b) = &bar {
                    b.abandon();
                }
                bail!(
                    "training stopped at step {}: the update made the prefix non-finite (learning rate {lr:e} is too large?); \
                     the last good checkpoint (if any) is kept in {}",
                    st.step + 1,
                    out.join(crate::checkpoint::CHECKPOINT_DIR).display()
                );
            }
        };
        if let Some(new_scale) = overflow {
            st.overflow_skipped += 1;
            say(
                &bar,
                format!(
                    "step {}/{} skipped: fp16 overflow, loss scale now {new_scale}",
                    st.step + 1,
                    config.steps,
                ),
            );
        }
        st.loss_scale = engine.loss_scale();
        st.step += 1;
        steps_this_run += 1;
        st.elapsed = elapsed(elapsed0);

        let step_secs = step_started.elapsed().as_secs_f64();
        let mut rec = MetricRecord {
            step: st.step,
            loss: Some(loss),
            lr: Some(lr),
            grad_norm: norm,
            tokens: Some(n_targets as u64),
            tokens_seen: st.tokens_seen,
            elapsed: st.elapsed,
            eval_loss: None,
            skipped: st.skipped,
            overflow_skipped: st.overflow_skipped,
            loss_scale: st.loss_scale.map(f64::from),
        };
        let last = st.step == config.steps;
        let want_eval = !eval.is_empty()
            && (last || (config.eval_every > 0 && st.step % config.eval_every == 0));
        if want_eval {
            prefix = engine.training_prefix(&mut *state)?;
            let (e, _) = evaluate(
                engine,
                Some(&prefix),
                eval,
                config.batch_size,
                setup.pad_id,
                &setup.run,
            )?;
            rec.eval_loss = Some(e);
            if e.is_finite() && st.best_eval.map_or(true, |b| e < b) {
                st.best_eval = Some(e);
                st.best_eval_step = Some(st.step);
                let mut meta = setup.meta.clone();
                meta.training_args = best_args(&setup.meta.training_args, st.step, e);
                save_prefix(&out.join("best_prefix.safetensors"), &prefix, &meta)?;
            }
            say(
                &bar,
                format!(
                    "step {}: eval loss {e:.4}{}",
                    st.step,
                    if st.best_eval_step == Some(st.step) {
                        " (best so far)"
                    } else {
                        ""
                    }
                ),
            );
        }
        metrics.push(&rec)?;
        st.history.push(rec);

        let tok_s = step_tokens as f64 / step_secs.max(1e-9);
        if let Some(b) = &bar {
            b.set_position(st.step);
            let overflows = match st.overflow_skipped {
                0 => String::new(),
                n => format!("  {n} skipped (fp16 overflow)"),
            };
            b.set_message(format!("loss {loss:.4}  {tok_s:.0} tok/s{overflows}"));
        }
        if plain_log && (st.step % log_every == 0 || last) {
            eprintln!(
                "step {}/{}  loss {loss:.4}  lr {lr:.2e}  grad-norm {}  {tok_s:.0} tok/s  {:.0}s{}",
                st.step,
                config.steps,
                norm.map_or("skipped".into(), |n| format!("{n:.3}")),
                st.elapsed,
                match st.overflow_skipped {
                    0 => String::new(),
                    n => format!("  ({n} steps skipped for fp16 overflow)"),
                }
            );
        }

        let stop_now = setup.stop_after.is_some_and(|n| steps_this_run >= n) && !last;
        let save_now =
            last || stop_now || (config.save_every > 0 && st.step % config.save_every == 0);
        if save_now {
            let (trainable, optimizer) = engine.training_snapshot(&mut *state)?;
            if !want_eval {
                // From the snapshot (a bank is its own prefix): no second read of the device.
                prefix = crate::engine::prefix_of(engine, &trainable)?;
            }
            let params = trainable.to_flat();
            let reparam = match &trainable {
                Trainable::Reparam(r) => Some(r),
                _ => None,
            };
            save_checkpoint(
                out,
                &state_for(&st),
                &CheckpointParts {
                    params: &params,
                    optimizer: &optimizer,
                    prefix: &prefix,
                    meta: &setup.meta,
                    reparam,
                },
            )?;
        }
        if stop_now {
            stopped_early = true;
            break;
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }

    let mut final_prefix_path = None;
    prefix = engine.training_prefix(&mut *state)?;
    if !stopped_early {
        let path = out.join("prefix.safetensors");
        save_prefix(&path, &prefix, &setup.meta)?;
        final_prefix_path = Some(path);
        write_plot(out, &st.history)?;
    }
    Ok(TrainOutcome {
        state: st,
        prefix,
        stopped_early,
        final_prefix_path,
    })
}

/// The training args JSON with the best step and eval loss added.
fn best_args(args: &str, step: u64, eval: f64) -> String {
    let mut v: serde_json::Value = serde_json::from_str(args).unwrap_or(serde_json::json!({}));
    if let Some(m) = v.as_object_mut() {
        m.insert("best_step".into(), serde_json::json!(step));
        m.insert("best_eval_loss".into(), serde_json::json!(eval));
    }
    v.to_string()
}

fn make_bar(progress: bool, total: u64, pos: u64) -> Option<indicatif::ProgressBar> {
    if !progress || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:30}] {msg}  {elapsed_precise} ETA {eta_precise}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(pos);
    bar.reset_eta();
    Some(bar)
}

/// Writes `loss.svg` from the metrics history.
pub fn write_plot(out: &Path, history: &[MetricRecord]) -> Result<()> {
    let train: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|r| r.loss.map(|l| (r.step as f64, l)))
        .collect();
    let eval: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|r| r.eval_loss.map(|l| (r.step as f64, l)))
        .collect();
    let svg = crate::plot::loss_svg("prefix-tune: loss per target token", &train, &eval);
    crate::prefix::file::write_atomic(&out.join("loss.svg"), svg.as_bytes())
        .with_context(|| format!("writing {}", out.join("loss.svg").display()))
}
