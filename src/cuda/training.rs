//! A prefix bank's training state resident on the GPU: the fp32 master parameters, their fp32
//! gradient (written by the attention backward's prefix reduction, accumulated over the step's
//! micro-batches), the optimizer's moments, the reduction scratch and the step's results. A
//! step ([`DeviceTraining::step`]) sends only the batches' tokens and reads back one small
//! buffer — the gradient's and the parameters' sums of squares and the per-target losses — in
//! one transfer: the clipping factor and the fp16 overflow skip are decided on the device
//! (`kernels/optim.cu`'s `*_clipped` kernels), the fp16 bank the kernels read is rounded from
//! the master on the device, and the dynamic loss scale is updated after that one read. The
//! host sees the parameters and moments only when it asks ([`DeviceTraining::snapshot`]: a
//! checkpoint, an evaluation, the final prefix).
//!
//! The reparameterization MLP is not here yet: a run that trains it keeps its state on the host
//! ([`crate::engine::HostTraining`]) and runs the MLP's kernels per step.

use anyhow::{anyhow, ensure, Result};

use crate::cuda::backend::Backend;
use crate::cuda::device_optim::OptimOps;
use crate::cuda::engine::{non_finite_loss, ModelEngine};
use crate::engine::{StepOutcome, StepRequest, TrainingState};
use crate::optim::Optimizer;
use crate::prefix::{PrefixBank, Trainable};

/// Results buffer layout: `[Σ grad², Σ param², loss of each target token …]`.
const GRAD_SQ: usize = 0;
const PARAM_SQ: usize = 1;
const LOSSES: usize = 2;

/// The device-resident training state of a prefix bank (see the module documentation).
pub struct DeviceTraining<B: Backend> {
    /// A bank of the trained shape, for the input checks; its values are the initial ones
    /// (the current ones are on the device).
    shape: PrefixBank<f32>,
    n: usize,
    master: B::Buf<f32>,
    grad: B::Buf<f32>,
    /// AdamW's m, or SGD's momentum buffer.
    s1: B::Buf<f32>,
    /// AdamW's v.
    s2: B::Buf<f32>,
    partials: B::Buf<f32>,
    results: B::Buf<f32>,
    /// Page-locked host memory the results are read into (the step's one wait).
    readback: B::Pinned<f32>,
    /// The optimizer's configuration and step count; its moment vectors are empty here (they
    /// are `s1`/`s2`) and filled only in a snapshot.
    optimizer: Optimizer,
    /// SGD with momentum: whether the buffer holds a first step's value.
    momentum_started: bool,
}

impl<B: Backend + 'static> TrainingState for DeviceTraining<B> {
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl<B: OptimOps> DeviceTraining<B> {
    /// Uploads `bank` and `optimizer`'s state (a fresh one, or a checkpoint's) to `engine`'s
    /// device.
    pub fn new(
        engine: &mut ModelEngine<B>,
        bank: PrefixBank<f32>,
        mut optimizer: Optimizer,
    ) -> Result<Self> {
        let n = bank.n_params();
        ensure!(n > 0, "device training: the prefix bank is empty");
        optimizer.check_len(n)?;
        let be = engine.backend_mut();
        let mut master = be.alloc("trainable prefix (fp32 master)", n)?;
        be.write("uploading the prefix", &bank.to_flat(), &mut master)?;
        let grad = be.alloc("prefix gradient (fp32)", n)?;
        let mut s1 = be.alloc("optimizer state (first moment / momentum)", n)?;
        let mut s2 = be.alloc("optimizer state (second moment)", 1)?;
        let mut momentum_started = false;
        match &mut optimizer {
            Optimizer::AdamW(o) => {
                s2 = be.alloc("optimizer state (second moment)", n)?;
                be.write("uploading the optimizer state", &o.m, &mut s1)?;
                be.write("uploading the optimizer state", &o.v, &mut s2)?;
                o.m = Vec::new();
                o.v = Vec::new();
            }
            Optimizer::Sgd(o) => {
                if !o.buf.is_empty() {
                    be.write("uploading the optimizer state", &o.buf, &mut s1)?;
                    momentum_started = true;
                }
                o.buf = Vec::new();
            }
        }
        let partials = be.alloc(
            "reduction partials",
            crate::cuda::ops::sum_squares_partials(n),
        )?;
        let results = be.alloc("training step results", LOSSES + 1)?;
        let readback = be.alloc_pinned("training step results (host)", LOSSES + 1)?;
        Ok(DeviceTraining {
            shape: bank,
            n,
            master,
            grad,
            s1,
            s2,
            partials,
            results,
            readback,
            optimizer,
            momentum_started,
        })
    }

    /// One training step (see the module documentation): the micro-batches' forward and
    /// backward from the device master, the gradient norm, the clipped update, and one read.
    pub fn step(
        &mut self,
        engine: &mut ModelEngine<B>,
        req: &StepRequest<'_>,
    ) -> Result<StepOutcome> {
        let total = req.n_targets;
        ensure!(
            total > 0 && !req.micro.is_empty(),
            "a training step needs micro-batches with target tokens"
        );
        let need = LOSSES + total;
        if B::len(&self.results) < need {
            // Grows to the largest step seen, then stays.
            let cap = need.max(2 * B::len(&self.results));
            let be = engine.backend_mut();
            self.results = be.alloc("training step results", cap)?;
            self.readback = be.alloc_pinned("training step results (host)", cap)?;
        }
        let mut at = LOSSES;
        for (i, batch) in req.micro.iter().enumerate() {
            at += engine.train_micro(
                &self.master,
                &self.shape,
                batch,
                req.opts,
                total,
                &mut self.results,
                at,
                &mut self.grad,
                i > 0,
            )?;
        }
        ensure!(
            at - LOSSES == total,
            "training step: the micro-batches hold {} target tokens, the request says {total}",
            at - LOSSES
        );
        let unscale = 1.0 / engine.loss_scale();
        let n = self.n;
        let be = engine.backend_mut();
        be.sum_squares_into(
            n,
            &self.grad,
            &mut self.partials,
            &mut self.results,
            GRAD_SQ,
        )?;
        let sum_sq = (&self.results, GRAD_SQ);
        // The step's number; counted only once the update happened (the kernels skip a
        // non-finite norm).
        let next = self.optimizer.steps_done() + 1;
        match &self.optimizer {
            Optimizer::AdamW(o) => {
                be.adamw_step_clipped(
                    &o.config,
                    next,
                    req.lr,
                    unscale,
                    req.max_grad_norm,
                    sum_sq,
                    n,
                    &mut self.master,
                    &self.grad,
                    &mut self.s1,
                    &mut self.s2,
                )?;
            }
            Optimizer::Sgd(o) => {
                let momentum = o.config.momentum != 0.0;
                // The kernels tell the first momentum step by its number.
                let kernel_step = if self.momentum_started {
                    next.max(2)
                } else {
                    1
                };
                be.sgd_step_clipped(
                    &o.config,
                    kernel_step,
                    req.lr,
                    unscale,
                    req.max_grad_norm,
                    sum_sq,
                    n,
                    &mut self.master,
                    &self.grad,
                    momentum.then_some(&mut self.s1),
                )?;
            }
        }
        be.sum_squares_into(
            n,
            &self.master,
            &mut self.partials,
            &mut self.results,
            PARAM_SQ,
        )?;
        // The step's one transfer to the host and its one wait.
        let r = be.read_pinned(
            "reading the step's loss and norms",
            &self.results,
            0..need,
            &mut self.readback,
        )?;
        let loss_sum: f64 = r[LOSSES..].iter().map(|&x| x as f64).sum();
        let grad_norm = (r[GRAD_SQ] as f64).sqrt() * unscale as f64;
        let param_sq = r[PARAM_SQ];
        if !loss_sum.is_finite() {
            return Err(anyhow!(non_finite_loss(loss_sum / total as f64)));
        }
        if !grad_norm.is_finite() {
            // The kernel wrote nothing: lower the scale.
            let new_scale = engine
                .after_backward(false)?
                .expect("a non-finite gradient lowers the scale");
            return Ok(StepOutcome::Skipped {
                loss_sum,
                n_targets: total,
                micro_batches_run: req.micro.len(),
                new_scale,
            });
        }
        engine.after_backward(true)?;
        match &mut self.optimizer {
            Optimizer::AdamW(o) => o.step = next,
            Optimizer::Sgd(o) => {
                o.step = next;
                self.momentum_started |= o.config.momentum != 0.0;
            }
        }
        if !param_sq.is_finite() {
            return Ok(StepOutcome::DivergedUpdate);
        }
        Ok(StepOutcome::Updated {
            loss_sum,
            n_targets: total,
            grad_norm,
        })
    }

    /// The bank and the optimizer as of the last step, read back to the host.
    pub fn snapshot(&mut self, engine: &mut ModelEngine<B>) -> Result<(Trainable, Optimizer)> {
        let bank = self.prefix(engine)?;
        let be = engine.backend_mut();
        let n = self.n;
        let mut optimizer = self.optimizer.clone();
        match &mut optimizer {
            Optimizer::AdamW(o) => {
                o.m = be.read("reading the optimizer state", &self.s1, 0..n)?;
                o.v = be.read("reading the optimizer state", &self.s2, 0..n)?;
            }
            Optimizer::Sgd(o) => {
                if o.config.momentum != 0.0 && self.momentum_started {
                    o.buf = be.read("reading the optimizer state", &self.s1, 0..n)?;
                }
            }
        }
        Ok((Trainable::Bank(bank), optimizer))
    }

    /// The bank as of the last step, read back to the host.
    pub fn prefix(&mut self, engine: &mut ModelEngine<B>) -> Result<PrefixBank<f32>> {
        let flat = engine
            .backend_mut()
            .read("reading the prefix", &self.master, 0..self.n)?;
        let mut bank = self.shape.clone();
        bank.copy_from_flat(&flat);
        Ok(bank)
    }
}
