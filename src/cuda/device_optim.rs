//! The optimizer step on the device: the AdamW / SGD and sum-of-squares kernels of
//! `kernels/optim.cu` on fp32 master weights that stay resident between steps.
//!
//! [`OptimOps`] is what the backend needs (the kernels through [`crate::cuda::ops`]);
//! [`DeviceOptimizer`] holds the device copies of the
//! flat trainable parameters, their gradient and the optimizer state, and does one update the
//! way [`crate::engine::cpu_update`] does on the host: the global gradient norm (two-stage
//! reduction), `clip_grad_norm_`'s factor folded into the kernel's `grad_scale`, then the
//! optimizer kernel.
//!
//! [`DeviceOptimEngine`] is the GPU engine `train --device cuda` runs. Training a prefix bank,
//! its [`Engine::begin_training`] makes a [`DeviceTraining`] (`cuda::training`): parameters,
//! gradient and moments stay on the device and a step reads back one small buffer. Training
//! the reparameterization MLP keeps the state on the host ([`HostTraining`]) and each
//! [`Engine::apply_update`] runs on [`DeviceOptimizer`]: the host stays the owner of record,
//! the parameters and optimizer state are copied back after each update, and the device
//! copies are re-uploaded only when the host values differ from what the device last returned
//! (a resume, an outside change).

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use crate::cuda::backend::{Backend, GpuBackend};
use crate::cuda::engine::ModelEngine;
use crate::cuda::reparam::ReparamOps;
use crate::cuda::training::DeviceTraining;
use crate::engine::{
    host_train_step, DecodeCache, Engine, HostTraining, StepOutcome, StepRequest, TrainingState,
};
use crate::model::config::ModelConfig;
use crate::optim::{AdamWConfig, Optimizer, SgdConfig};
use crate::prefix::{PrefixBank, Reparam, ReparamCache, ReparamGrads, Trainable};
use crate::types::{Batch, LossOutput, RunOptions};

/// Optimizer kernels of a backend. `n` elements of each buffer take part (buffers may be longer).
pub trait OptimOps: Backend {
    /// AdamW update number `step` (1-based) of `param` from `grad * grad_scale`.
    #[allow(clippy::too_many_arguments)]
    fn adamw_step(
        &self,
        config: &AdamWConfig,
        step: u64,
        lr: f64,
        grad_scale: f32,
        n: usize,
        param: &mut Self::Buf<f32>,
        grad: &Self::Buf<f32>,
        m: &mut Self::Buf<f32>,
        v: &mut Self::Buf<f32>,
    ) -> Result<()>;
    /// SGD update; `step` 1 marks the first (the momentum buffer's contents are then ignored).
    #[allow(clippy::too_many_arguments)]
    fn sgd_step(
        &self,
        config: &SgdConfig,
        step: u64,
        lr: f64,
        grad_scale: f32,
        n: usize,
        param: &mut Self::Buf<f32>,
        grad: &Self::Buf<f32>,
        momentum_buf: Option<&mut Self::Buf<f32>>,
    ) -> Result<()>;
    /// `out[0] = Σ x[..n]²`.
    fn sum_squares(&self, n: usize, x: &Self::Buf<f32>, out: &mut Self::Buf<f32>) -> Result<()>;
    /// `out[at] = Σ x[..n]²` with the reduction's partials in `partials` (nothing allocated).
    fn sum_squares_into(
        &self,
        n: usize,
        x: &Self::Buf<f32>,
        partials: &mut Self::Buf<f32>,
        out: &mut Self::Buf<f32>,
        at: usize,
    ) -> Result<()>;
    /// [`OptimOps::adamw_step`] of the loss-scaled gradient `grad` with the clipping decided on
    /// the device from `sum_sq[at]` (its sum of squares): unscaled by `unscale`, clipped to
    /// `max_grad_norm` (0: off), and nothing written when the norm is not finite.
    #[allow(clippy::too_many_arguments)]
    fn adamw_step_clipped(
        &self,
        config: &AdamWConfig,
        step: u64,
        lr: f64,
        unscale: f32,
        max_grad_norm: f64,
        sum_sq: (&Self::Buf<f32>, usize),
        n: usize,
        param: &mut Self::Buf<f32>,
        grad: &Self::Buf<f32>,
        m: &mut Self::Buf<f32>,
        v: &mut Self::Buf<f32>,
    ) -> Result<()>;
    /// [`OptimOps::sgd_step`] with the clipping decided on the device, as
    /// [`OptimOps::adamw_step_clipped`].
    #[allow(clippy::too_many_arguments)]
    fn sgd_step_clipped(
        &self,
        config: &SgdConfig,
        step: u64,
        lr: f64,
        unscale: f32,
        max_grad_norm: f64,
        sum_sq: (&Self::Buf<f32>, usize),
        n: usize,
        param: &mut Self::Buf<f32>,
        grad: &Self::Buf<f32>,
        momentum_buf: Option<&mut Self::Buf<f32>>,
    ) -> Result<()>;
}

/// The leading `n` elements of a device buffer (an error, not cudarc's panic, past its end).
fn head<'a>(what: &str, b: &'a CudaSlice<f32>, n: usize) -> Result<CudaView<'a, f32>> {
    let len = b.len();
    b.try_slice(..n)
        .ok_or_else(|| anyhow!("{what}: {n} elements of a device buffer of {len}"))
}

fn head_mut<'a>(what: &str, b: &'a mut CudaSlice<f32>, n: usize) -> Result<CudaViewMut<'a, f32>> {
    let len = b.len();
    b.try_slice_mut(..n)
        .ok_or_else(|| anyhow!("{what}: {n} elements of a device buffer of {len}"))
}

impl OptimOps for GpuBackend {
    fn adamw_step(
        &self,
        config: &AdamWConfig,
        step: u64,
        lr: f64,
        grad_scale: f32,
        n: usize,
        param: &mut Self::Buf<f32>,
        grad: &Self::Buf<f32>,
        m: &mut Self::Buf<f32>,
        v: &mut Self::Buf<f32>,
    ) -> Result<()> {
        crate::cuda::ops::adamw_step(
            &self.gpu,
            config,
            step,
            lr,
            grad_scale,
            &mut head_mut("AdamW parameters", param, n)?,
            &head("AdamW gradient", grad, n)?,
            &mut head_mut("AdamW first moment", m, n)?,
            &mut head_mut("AdamW second moment", v, n)?,
            None,
        )
    }

    fn sgd_step(
        &self,
        config: &SgdConfig,
        step: u64,
        lr: f64,
        grad_scale: f32,
        n: usize,
        param: &mut Self::Buf<f32>,
        grad: &Self::Buf<f32>,
        momentum_buf: Option<&mut Self::Buf<f32>>,
    ) -> Result<()> {
        let mut buf = momentum_buf
            .map(|b| head_mut("SGD momentum buffer", b, n))
            .transpose()?;
        crate::cuda::ops::sgd_step(
            &self.gpu,
            config,
            step,
            lr,
            grad_scale,
            &mut head_mut("SGD parameters", param, n)?,
            &head("SGD gradient", grad, n)?,
            buf.as_mut(),
            None,
        )
    }

    fn sum_squares(&self, n: usize, x: &Self::Buf<f32>, out: &mut Self::Buf<f32>) -> Result<()> {
        crate::cuda::ops::sum_squares(
            &self.gpu,
            &head("sum of squares input", x, n)?,
            &mut head_mut("sum of squares output", out, 1)?,
            false,
        )
    }

    fn sum_squares_into(
        &self,
        n: usize,
        x: &Self::Buf<f32>,
        partials: &mut Self::Buf<f32>,
        out: &mut Self::Buf<f32>,
        at: usize,
    ) -> Result<()> {
        let len = out.len();
        let mut o = out
            .try_slice_mut(at..at + 1)
            .ok_or_else(|| anyhow!("sum of squares output: element {at} of {len}"))?;
        crate::cuda::ops::sum_squares_with(
            &self.gpu,
            &head("sum of squares input", x, n)?,
            &mut partials.as_view_mut(),
            &mut o,
            false,
        )
    }

    fn adamw_step_clipped(
        &self,
        config: &AdamWConfig,
        step: u64,
        lr: f64,
        unscale: f32,
        max_grad_norm: f64,
        sum_sq: (&Self::Buf<f32>, usize),
        n: usize,
        param: &mut Self::Buf<f32>,
        grad: &Self::Buf<f32>,
        m: &mut Self::Buf<f32>,
        v: &mut Self::Buf<f32>,
    ) -> Result<()> {
        let (sq, at) = sum_sq;
        let sq = sq
            .try_slice(at..at + 1)
            .ok_or_else(|| anyhow!("gradient sum of squares: element {at} of {}", sq.len()))?;
        crate::cuda::ops::adamw_step_clipped(
            &self.gpu,
            config,
            step,
            lr,
            unscale,
            &crate::cuda::ops::DeviceClip {
                sum_sq: &sq,
                max_grad_norm,
            },
            &mut head_mut("AdamW parameters", param, n)?,
            &head("AdamW gradient", grad, n)?,
            &mut head_mut("AdamW first moment", m, n)?,
            &mut head_mut("AdamW second moment", v, n)?,
        )
    }

    fn sgd_step_clipped(
        &self,
        config: &SgdConfig,
        step: u64,
        lr: f64,
        unscale: f32,
        max_grad_norm: f64,
        sum_sq: (&Self::Buf<f32>, usize),
        n: usize,
        param: &mut Self::Buf<f32>,
        grad: &Self::Buf<f32>,
        momentum_buf: Option<&mut Self::Buf<f32>>,
    ) -> Result<()> {
        let (sq, at) = sum_sq;
        let sq = sq
            .try_slice(at..at + 1)
            .ok_or_else(|| anyhow!("gradient sum of squares: element {at} of {}", sq.len()))?;
        let mut buf = momentum_buf
            .map(|b| head_mut("SGD momentum buffer", b, n))
            .transpose()?;
        crate::cuda::ops::sgd_step_clipped(
            &self.gpu,
            config,
            step,
            lr,
            unscale,
            &crate::cuda::ops::DeviceClip {
                sum_sq: &sq,
                max_grad_norm,
            },
            &mut head_mut("SGD parameters", param, n)?,
            &head("SGD gradient", grad, n)?,
            buf.as_mut(),
        )
    }
}

/// Device copies of the flat parameters, gradient and optimizer state, with the host values
/// they were last synchronised with.
pub struct DeviceOptimizer<B: Backend> {
    n: usize,
    param: B::Buf<f32>,
    grad: B::Buf<f32>,
    /// AdamW's m, or SGD's momentum buffer.
    s1: B::Buf<f32>,
    /// AdamW's v.
    s2: B::Buf<f32>,
    norm: B::Buf<f32>,
    /// Host values the device copies hold (empty: nothing uploaded yet).
    host_param: Vec<f32>,
    host_s1: Vec<f32>,
    host_s2: Vec<f32>,
}

impl<B: OptimOps> DeviceOptimizer<B> {
    /// Device buffers for `n` parameters.
    pub fn new(be: &B, n: usize) -> Result<Self> {
        Ok(DeviceOptimizer {
            n,
            param: be.alloc("trainable parameters (fp32 master)", n)?,
            grad: be.alloc("gradient of the trainable parameters", n)?,
            s1: be.alloc("optimizer state (first moment / momentum)", n)?,
            s2: be.alloc("optimizer state (second moment)", n)?,
            norm: be.alloc("gradient norm", 1)?,
            host_param: Vec::new(),
            host_s1: Vec::new(),
            host_s2: Vec::new(),
        })
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// One update of `params` from `grads` with `optimizer` and learning rate `lr`, clipping the
    /// global gradient norm to `max_grad_norm` (0: off). Returns the norm before clipping; when
    /// it is not finite nothing is updated. `grads` is not modified.
    pub fn step(
        &mut self,
        be: &B,
        params: &mut [f32],
        grads: &[f32],
        optimizer: &mut Optimizer,
        lr: f64,
        max_grad_norm: f64,
    ) -> Result<f64> {
        let n = self.n;
        if params.len() != n || grads.len() != n {
            bail!(
                "device optimizer: {} parameters and {} gradients for buffers of {n}",
                params.len(),
                grads.len()
            );
        }
        optimizer.check_len(n)?;
        be.write("gradient", grads, &mut self.grad)?;
        be.sum_squares(n, &self.grad, &mut self.norm)?;
        let sq = be.read("gradient norm", &self.norm, 0..1)?[0];
        let norm = (sq as f64).sqrt();
        if !norm.is_finite() {
            return Ok(norm);
        }
        // clip_grad_norm_'s factor, applied by the kernel as grad * grad_scale.
        let coef = if max_grad_norm > 0.0 {
            (max_grad_norm / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        let grad_scale = if coef < 1.0 { coef as f32 } else { 1.0 };
        if self.host_param.as_slice() != &*params {
            be.write("trainable parameters", params, &mut self.param)?;
        }
        match optimizer {
            Optimizer::AdamW(o) => {
                sync(be, &o.m, &mut self.host_s1, &mut self.s1, n)?;
                sync(be, &o.v, &mut self.host_s2, &mut self.s2, n)?;
                o.step += 1;
                be.adamw_step(
                    &o.config,
                    o.step,
                    lr,
                    grad_scale,
                    n,
                    &mut self.param,
                    &self.grad,
                    &mut self.s1,
                    &mut self.s2,
                )?;
                o.m = be.read("AdamW first moment", &self.s1, 0..n)?;
                o.v = be.read("AdamW second moment", &self.s2, 0..n)?;
                self.host_s1.clone_from(&o.m);
                self.host_s2.clone_from(&o.v);
            }
            Optimizer::Sgd(o) => {
                let momentum = o.config.momentum != 0.0;
                let first = o.buf.is_empty();
                if momentum && !first {
                    sync(be, &o.buf, &mut self.host_s1, &mut self.s1, n)?;
                }
                o.step += 1;
                // The kernels tell the first momentum step by its number.
                let kernel_step = if first { 1 } else { o.step.max(2) };
                be.sgd_step(
                    &o.config,
                    kernel_step,
                    lr,
                    grad_scale,
                    n,
                    &mut self.param,
                    &self.grad,
                    momentum.then_some(&mut self.s1),
                )?;
                if momentum {
                    o.buf = be.read("SGD momentum", &self.s1, 0..n)?;
                    self.host_s1.clone_from(&o.buf);
                }
            }
        }
        let updated = be.read("trainable parameters", &self.param, 0..n)?;
        params.copy_from_slice(&updated);
        self.host_param = updated;
        Ok(norm)
    }
}

/// Uploads `host` unless the device already holds it.
fn sync<B: Backend>(
    be: &B,
    host: &[f32],
    mirror: &mut Vec<f32>,
    dev: &mut B::Buf<f32>,
    n: usize,
) -> Result<()> {
    if host.len() != n {
        bail!(
            "device optimizer: state of {} elements for {n} parameters",
            host.len()
        );
    }
    if mirror.as_slice() != host {
        be.write("optimizer state", host, dev)?;
        mirror.clear();
        mirror.extend_from_slice(host);
    }
    Ok(())
}

/// A model engine whose [`Engine::apply_update`] runs on its device ([`DeviceOptimizer`]);
/// every other call goes to the engine unchanged.
pub struct DeviceOptimEngine<B: OptimOps> {
    pub engine: ModelEngine<B>,
    optim: Option<DeviceOptimizer<B>>,
}

impl<B: OptimOps> DeviceOptimEngine<B> {
    pub fn new(engine: ModelEngine<B>) -> Self {
        DeviceOptimEngine {
            engine,
            optim: None,
        }
    }
}

impl<B: OptimOps + ReparamOps + 'static> Engine for DeviceOptimEngine<B>
where
    ModelEngine<B>: Engine,
{
    fn config(&self) -> &ModelConfig {
        self.engine.config()
    }

    fn describe(&self) -> String {
        format!(
            "{}; optimizer kernels on the device",
            self.engine.describe()
        )
    }

    fn loss(
        &mut self,
        prefix: Option<&PrefixBank<f32>>,
        batch: &Batch,
        opts: &RunOptions,
    ) -> Result<LossOutput<f32>> {
        self.engine.loss(prefix, batch, opts)
    }

    fn loss_and_grad(
        &mut self,
        prefix: &PrefixBank<f32>,
        batch: &Batch,
        opts: &RunOptions,
    ) -> Result<(LossOutput<f32>, PrefixBank<f32>)> {
        self.engine.loss_and_grad(prefix, batch, opts)
    }

    fn begin_decode(
        &mut self,
        prefix: Option<&PrefixBank<f32>>,
        prefix_index: &[Option<usize>],
        opts: &RunOptions,
    ) -> Result<Box<dyn DecodeCache>> {
        self.engine.begin_decode(prefix, prefix_index, opts)
    }

    fn decode(&mut self, cache: &mut dyn DecodeCache, tokens: &[Vec<u32>]) -> Result<Vec<f32>> {
        self.engine.decode(cache, tokens)
    }

    fn loss_scale(&self) -> Option<f32> {
        Some(self.engine.loss_scale())
    }

    fn set_loss_scale(&mut self, scale: f32) {
        self.engine.set_loss_scale(scale);
    }

    fn apply_update(
        &mut self,
        params: &mut [f32],
        grads: &mut [f32],
        optimizer: &mut Optimizer,
        lr: f64,
        max_grad_norm: f64,
    ) -> Result<f64> {
        let be = self.engine.backend_mut();
        if !matches!(&self.optim, Some(o) if o.len() == params.len()) {
            self.optim = None;
            self.optim = Some(DeviceOptimizer::new(be, params.len())?);
        }
        let optim = self.optim.as_mut().expect("allocated above");
        optim.step(be, params, grads, optimizer, lr, max_grad_norm)
    }

    fn reparam_forward(&mut self, r: &Reparam<f32>) -> Result<(Vec<f32>, ReparamCache<f32>)> {
        crate::cuda::reparam::forward(self.engine.backend_mut(), r)
    }

    fn reparam_backward(
        &mut self,
        r: &Reparam<f32>,
        cache: &ReparamCache<f32>,
        d_peft: &[f32],
    ) -> Result<ReparamGrads<f32>> {
        crate::cuda::reparam::backward(self.engine.backend_mut(), r, cache, d_peft)
    }

    /// A prefix bank trains with its state on the device ([`DeviceTraining`]); a
    /// reparameterization on the host ([`HostTraining`], its MLP on the device).
    fn begin_training(
        &mut self,
        trainable: Trainable,
        optimizer: Optimizer,
    ) -> Result<Box<dyn TrainingState>> {
        match trainable {
            Trainable::Bank(bank) if bank.len > 0 => Ok(Box::new(DeviceTraining::new(
                &mut self.engine,
                bank,
                optimizer,
            )?)),
            t => Ok(Box::new(HostTraining::new(self, t, optimizer)?)),
        }
    }

    fn train_step(
        &mut self,
        state: &mut dyn TrainingState,
        req: &StepRequest<'_>,
    ) -> Result<StepOutcome> {
        if let Some(d) = state.as_any_mut().downcast_mut::<DeviceTraining<B>>() {
            return d.step(&mut self.engine, req);
        }
        host_train_step(self, HostTraining::of(state)?, req)
    }

    fn training_snapshot(
        &mut self,
        state: &mut dyn TrainingState,
    ) -> Result<(Trainable, Optimizer)> {
        if let Some(d) = state.as_any_mut().downcast_mut::<DeviceTraining<B>>() {
            return d.snapshot(&mut self.engine);
        }
        let h = HostTraining::of(state)?;
        Ok((h.trainable.clone(), h.optimizer.clone()))
    }

    fn training_prefix(&mut self, state: &mut dyn TrainingState) -> Result<PrefixBank<f32>> {
        if let Some(d) = state.as_any_mut().downcast_mut::<DeviceTraining<B>>() {
            return d.prefix(&mut self.engine);
        }
        Ok(HostTraining::of(state)?.prefix.clone())
    }
}
