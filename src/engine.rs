//! One interface for "run the frozen model with these prefixes": the loss, the prefix-only
//! gradient and KV-cache decoding. Training and generation hold a `Box<dyn Engine>` and never
//! ask which device runs it; `crate::devices::open_engine` picks the implementation from a
//! [`Device`].
//!
//! Two implementations: [`CpuEngine`] (the reference code in f32, here) and the GPU engine
//! (`cuda::engine::CudaEngine`, which implements this trait; this module does not import it).
//!
//! Every method checks its inputs against the model and returns an error (the reference code
//! panics on a malformed batch, which is a programming error there but bad input here).

use std::any::Any;
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::model::config::{ModelConfig, ModelWeights};
use crate::optim::{clip_grad_norm, Optimizer};
use crate::prefix::peft::{from_peft, to_peft};
use crate::prefix::{PrefixBank, Reparam, ReparamCache, ReparamGrads, Trainable};
use crate::reference::decode::{decode_step, KvCache};
use crate::reference::model::{self, Batch, LossOutput, RunOptions};

/// Where the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// The GPU when its engine is available, else the CPU.
    #[default]
    Auto,
    /// The CPU reference engine.
    Cpu,
    /// The GPU engine (CUDA).
    Cuda,
}

/// Decoding state of a batch of sequences, owned by the engine that made it (each engine
/// downcasts its own kind).
pub trait DecodeCache: Send {
    /// Number of sequences.
    fn batch(&self) -> usize;
    /// Keeps, in order, the sequences `rows` names; repeats copy a sequence (beam search),
    /// omissions drop one (finished requests).
    fn reorder(&mut self, rows: &[usize]) -> Result<()>;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// The frozen model with prefixes, on some device.
pub trait Engine {
    fn config(&self) -> &ModelConfig;
    /// One line saying what runs where (for logs).
    fn describe(&self) -> String;
    /// The batch's loss; `prefix: None` runs the base model.
    fn loss(
        &mut self,
        prefix: Option<&PrefixBank<f32>>,
        batch: &Batch,
        opts: &RunOptions,
    ) -> Result<LossOutput<f32>>;
    /// The batch's loss and the gradient of its mean with respect to the prefix bank.
    ///
    /// A mixed-precision engine (the GPU engine, fp16 activations with dynamic loss scaling)
    /// may return an error that downcasts (through `anyhow`) to [`GradOverflow`]: the loss is
    /// fine but the scaled gradient overflowed fp16. Nothing is wrong with the input; the
    /// engine has lowered its loss scale, and the caller skips this step (as torch's
    /// `GradScaler` does).
    fn loss_and_grad(
        &mut self,
        prefix: &PrefixBank<f32>,
        batch: &Batch,
        opts: &RunOptions,
    ) -> Result<(LossOutput<f32>, PrefixBank<f32>)>;
    /// Starts decoding `prefix_index.len()` sequences; sequence `b` uses prefix
    /// `prefix_index[b]` of `prefix` (`None`: the base model). The caches' first entries are
    /// the prefixes.
    fn begin_decode(
        &mut self,
        prefix: Option<&PrefixBank<f32>>,
        prefix_index: &[Option<usize>],
        opts: &RunOptions,
    ) -> Result<Box<dyn DecodeCache>>;
    /// Feeds `tokens[b]` (at least one token: a prompt for the prefill, then one token per step)
    /// to sequence `b` and returns the logits `[B, V]` of each sequence's last new token.
    fn decode(&mut self, cache: &mut dyn DecodeCache, tokens: &[Vec<u32>]) -> Result<Vec<f32>>;
    /// The dynamic loss scale of a mixed-precision engine; `None` for engines without one.
    fn loss_scale(&self) -> Option<f32> {
        None
    }
    /// Sets the dynamic loss scale (a checkpoint's, on resume); no effect on engines without
    /// one.
    fn set_loss_scale(&mut self, _scale: f32) {}
    /// One optimizer update of the flat trainable parameters `params` (optimizer order) from
    /// their gradient `grads`: clips the global gradient norm to `max_grad_norm` (0: off) like
    /// `torch.nn.utils.clip_grad_norm_`, then steps `optimizer` with learning rate `lr`. Returns
    /// the norm before clipping; when it is not finite nothing is updated. `grads` may be
    /// scaled in place. The default runs [`cpu_update`] on the host; the GPU engine runs the
    /// optimizer kernels on fp32 master weights kept on the device.
    fn apply_update(
        &mut self,
        params: &mut [f32],
        grads: &mut [f32],
        optimizer: &mut Optimizer,
        lr: f64,
        max_grad_norm: f64,
    ) -> Result<f64> {
        Ok(cpu_update(params, grads, optimizer, lr, max_grad_norm))
    }

    /// Li & Liang's reparameterization MLP forward: the PEFT tensor `[P, 2·L·kv_dim]` and the
    /// cache for [`Engine::reparam_backward`]. The default is [`Reparam::forward`] on the host;
    /// the GPU engine runs the fp32 kernels of `kernels/reparam.cu`.
    fn reparam_forward(&mut self, r: &Reparam<f32>) -> Result<(Vec<f32>, ReparamCache<f32>)> {
        Ok(r.forward())
    }

    /// The gradients of every reparameterization parameter from `d_peft` = dLoss/d(output).
    /// The default is [`Reparam::backward`] on the host.
    fn reparam_backward(
        &mut self,
        r: &Reparam<f32>,
        cache: &ReparamCache<f32>,
        d_peft: &[f32],
    ) -> Result<ReparamGrads<f32>> {
        Ok(r.backward(cache, d_peft))
    }

    /// Takes over the training state of a run: what is trained and its optimizer (fresh, or a
    /// checkpoint's). The engine keeps it where it trains (the GPU engine: on the device, for a
    /// prefix bank) and hands it back through [`Engine::training_snapshot`]. The default keeps
    /// it on the host ([`HostTraining`]).
    fn begin_training(
        &mut self,
        trainable: Trainable,
        optimizer: Optimizer,
    ) -> Result<Box<dyn TrainingState>> {
        Ok(Box::new(HostTraining::new(self, trainable, optimizer)?))
    }

    /// One optimizer step of `state` over the step's micro-batches (see [`StepRequest`]). The
    /// default is [`host_train_step`]: `loss_and_grad` per micro-batch, the gradients weighted
    /// on the host, then [`Engine::apply_update`].
    fn train_step(
        &mut self,
        state: &mut dyn TrainingState,
        req: &StepRequest<'_>,
    ) -> Result<StepOutcome> {
        host_train_step(self, HostTraining::of(state)?, req)
    }

    /// The trained parameters and the optimizer as of the last step, on the host (for a
    /// checkpoint).
    fn training_snapshot(
        &mut self,
        state: &mut dyn TrainingState,
    ) -> Result<(Trainable, Optimizer)> {
        let h = HostTraining::of(state)?;
        Ok((h.trainable.clone(), h.optimizer.clone()))
    }

    /// The prefix the model sees as of the last step, on the host (evaluation, the best and
    /// final prefix files).
    fn training_prefix(&mut self, state: &mut dyn TrainingState) -> Result<PrefixBank<f32>> {
        Ok(HostTraining::of(state)?.prefix.clone())
    }
}

/// One training step as the trainer asks for it.
pub struct StepRequest<'a> {
    /// The step's micro-batches (gradient accumulation), each with at least one target token.
    pub micro: &'a [Batch],
    /// Target tokens over all of them: the step minimises the mean loss per target token.
    pub n_targets: usize,
    pub opts: &'a RunOptions,
    pub lr: f64,
    /// Global gradient-norm clipping (`clip_grad_norm_`); 0: off.
    pub max_grad_norm: f64,
}

/// What a training step did.
#[derive(Clone, Debug, PartialEq)]
pub enum StepOutcome {
    /// The parameters were updated. `loss_sum` is over the step's `n_targets` target tokens;
    /// `grad_norm` is the global gradient norm before clipping.
    Updated {
        loss_sum: f64,
        n_targets: usize,
        grad_norm: f64,
    },
    /// Nothing was updated: the fp16 gradient overflowed at the engine's loss scale, which is
    /// now `new_scale` (torch's `GradScaler` skips such steps). `loss_sum` / `n_targets` cover
    /// the micro-batches that ran: the first `micro_batches_run` of the request.
    Skipped {
        loss_sum: f64,
        n_targets: usize,
        micro_batches_run: usize,
        new_scale: f32,
    },
    /// Nothing was updated: the loss or the gradient norm is not finite.
    NotFinite { loss_sum: f64, grad_norm: f64 },
    /// The update made a parameter non-finite (the learning rate is too large).
    DivergedUpdate,
}

/// A run's training state, owned by the engine that trains it (each engine downcasts its own
/// kind).
pub trait TrainingState {
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// The training state on the host: what is trained, its optimizer, and the prefix the model
/// sees (rebuilt after each update).
pub struct HostTraining {
    pub trainable: Trainable,
    pub optimizer: Optimizer,
    pub prefix: PrefixBank<f32>,
}

impl TrainingState for HostTraining {
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl HostTraining {
    pub fn new<E: Engine + ?Sized>(
        engine: &mut E,
        trainable: Trainable,
        optimizer: Optimizer,
    ) -> Result<Self> {
        optimizer.check_len(trainable.n_params())?;
        let prefix = prefix_of(engine, &trainable)?;
        Ok(HostTraining {
            trainable,
            optimizer,
            prefix,
        })
    }

    /// `state` as a [`HostTraining`], or an error naming the mix-up.
    pub fn of(state: &mut dyn TrainingState) -> Result<&mut HostTraining> {
        state
            .as_any_mut()
            .downcast_mut::<HostTraining>()
            .ok_or_else(|| anyhow::anyhow!("training state: made by another engine"))
    }
}

/// The prefix `t` gives, with the reparameterization run on `engine`'s device.
pub fn prefix_of<E: Engine + ?Sized>(engine: &mut E, t: &Trainable) -> Result<PrefixBank<f32>> {
    match t {
        Trainable::Bank(b) => Ok(b.clone()),
        Trainable::Reparam(r) => {
            let (peft, _) = engine.reparam_forward(r)?;
            Ok(from_peft(&peft, r.n_layers, r.kv_heads, r.head_dim))
        }
    }
}

/// [`Engine::train_step`] with the state on the host: per micro-batch `loss_and_grad` (an fp16
/// overflow, [`GradOverflow`], skips the rest of the step), the gradient with respect to the
/// trained parameters (through the reparameterization's backward when it is on), weighted by
/// each micro-batch's share of the target tokens, then [`Engine::apply_update`].
pub fn host_train_step<E: Engine + ?Sized>(
    engine: &mut E,
    st: &mut HostTraining,
    req: &StepRequest<'_>,
) -> Result<StepOutcome> {
    let mut loss_sum = 0.0f64;
    let mut n_targets = 0usize;
    let mut micro: Vec<(Vec<f32>, usize)> = Vec::with_capacity(req.micro.len());
    for (i, batch) in req.micro.iter().enumerate() {
        let n: usize = batch.n_targets().iter().sum();
        match engine.loss_and_grad(&st.prefix, batch, req.opts) {
            Ok((out, grad)) => {
                loss_sum += out.loss_sum.iter().map(|&x| x as f64).sum::<f64>();
                n_targets += n;
                micro.push((grad_to_params(engine, &st.trainable, &grad)?, n));
            }
            Err(e) => match e.downcast::<GradOverflow>() {
                Ok(o) => {
                    loss_sum += o.loss.loss_sum.iter().map(|&x| x as f64).sum::<f64>();
                    n_targets += n;
                    let loss = loss_sum / n_targets as f64;
                    if loss.is_finite() {
                        return Ok(StepOutcome::Skipped {
                            loss_sum,
                            n_targets,
                            micro_batches_run: i + 1,
                            new_scale: o.new_scale,
                        });
                    }
                    return Ok(StepOutcome::NotFinite {
                        loss_sum,
                        grad_norm: f64::NAN,
                    });
                }
                Err(e) => return Err(e),
            },
        }
    }
    if !(loss_sum / n_targets as f64).is_finite() {
        return Ok(StepOutcome::NotFinite {
            loss_sum,
            grad_norm: f64::NAN,
        });
    }
    let mut params = st.trainable.to_flat();
    let mut grad = accumulate(micro, n_targets);
    let norm = engine.apply_update(
        &mut params,
        &mut grad,
        &mut st.optimizer,
        req.lr,
        req.max_grad_norm,
    )?;
    if !norm.is_finite() {
        return Ok(StepOutcome::NotFinite {
            loss_sum,
            grad_norm: norm,
        });
    }
    if params.iter().any(|x| !x.is_finite()) {
        return Ok(StepOutcome::DivergedUpdate);
    }
    st.trainable.copy_from_flat(&params);
    st.prefix = prefix_of(engine, &st.trainable)?;
    Ok(StepOutcome::Updated {
        loss_sum,
        n_targets,
        grad_norm: norm,
    })
}

/// A step's gradient from its micro-batches' (each of its own mean, with its target count):
/// weighted by their shares of the `n_targets` target tokens.
fn accumulate(mut micro: Vec<(Vec<f32>, usize)>, n_targets: usize) -> Vec<f32> {
    if micro.len() == 1 {
        return micro.pop().expect("one micro-batch").0;
    }
    let mut acc: Option<Vec<f32>> = None;
    for (g, n) in micro {
        let w = n as f32 / n_targets as f32;
        match &mut acc {
            None => acc = Some(g.iter().map(|x| x * w).collect()),
            Some(acc) => acc.iter_mut().zip(&g).for_each(|(a, x)| *a += x * w),
        }
    }
    acc.expect("at least one micro-batch")
}

/// The gradient with respect to the trainable parameters, flat (the reparameterization's
/// backward on `engine`'s device).
fn grad_to_params<E: Engine + ?Sized>(
    engine: &mut E,
    t: &Trainable,
    grad_bank: &PrefixBank<f32>,
) -> Result<Vec<f32>> {
    match t {
        Trainable::Bank(_) => Ok(grad_bank.to_flat()),
        Trainable::Reparam(r) => {
            let (_, cache) = engine.reparam_forward(r)?;
            let d_peft = to_peft(grad_bank, 0);
            Ok(engine.reparam_backward(r, &cache, &d_peft)?.to_flat())
        }
    }
}

/// [`Engine::loss_and_grad`]'s error when a mixed-precision engine's prefix gradient overflowed
/// at its loss scale: the step is to be skipped (no update) and the engine has already lowered
/// the scale to `new_scale` for the next call. Reach it with
/// `err.downcast_ref::<GradOverflow>()`.
#[derive(Clone, Debug, thiserror::Error)]
#[error(
    "the fp16 prefix gradient overflowed at loss scale {scale}; the step is skipped and the \
     scale lowered to {new_scale}"
)]
pub struct GradOverflow {
    /// The batch's loss (finite: only the gradient overflowed).
    pub loss: LossOutput<f32>,
    /// The loss scale the backward ran at.
    pub scale: f32,
    /// The scale the engine uses from the next call on.
    pub new_scale: f32,
}

/// [`Engine::apply_update`] on the host: [`clip_grad_norm`] then [`Optimizer::step`] (nothing
/// when the norm is not finite).
pub fn cpu_update(
    params: &mut [f32],
    grads: &mut [f32],
    optimizer: &mut Optimizer,
    lr: f64,
    max_grad_norm: f64,
) -> f64 {
    let norm = clip_grad_norm(&mut [grads], max_grad_norm);
    if norm.is_finite() {
        optimizer.step(params, grads, lr);
    }
    norm
}

pub use crate::reference::model::check_run;

/// The reference implementation in f32 on the CPU (rayon threads).
pub struct CpuEngine {
    weights: Arc<ModelWeights<f32>>,
}

impl CpuEngine {
    pub fn new(weights: Arc<ModelWeights<f32>>) -> Self {
        CpuEngine { weights }
    }
}

/// [`CpuEngine`]'s decoding state.
struct CpuDecodeCache(KvCache<f32>);

impl DecodeCache for CpuDecodeCache {
    fn batch(&self) -> usize {
        self.0.batch()
    }
    fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        self.0.reorder(rows)
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl Engine for CpuEngine {
    fn config(&self) -> &ModelConfig {
        &self.weights.config
    }

    fn describe(&self) -> String {
        format!(
            "CPU reference engine (f32, {} threads)",
            rayon::current_num_threads()
        )
    }

    fn loss(
        &mut self,
        prefix: Option<&PrefixBank<f32>>,
        batch: &Batch,
        opts: &RunOptions,
    ) -> Result<LossOutput<f32>> {
        check_run(self.config(), prefix, batch, opts)?;
        Ok(model::loss(&self.weights, prefix, batch, opts))
    }

    fn loss_and_grad(
        &mut self,
        prefix: &PrefixBank<f32>,
        batch: &Batch,
        opts: &RunOptions,
    ) -> Result<(LossOutput<f32>, PrefixBank<f32>)> {
        check_run(self.config(), Some(prefix), batch, opts)?;
        Ok(model::loss_and_grad(&self.weights, prefix, batch, opts))
    }

    fn begin_decode(
        &mut self,
        prefix: Option<&PrefixBank<f32>>,
        prefix_index: &[Option<usize>],
        opts: &RunOptions,
    ) -> Result<Box<dyn DecodeCache>> {
        let cache = KvCache::new(self.config(), prefix, prefix_index, opts.positions)?;
        Ok(Box::new(CpuDecodeCache(cache)))
    }

    fn decode(&mut self, cache: &mut dyn DecodeCache, tokens: &[Vec<u32>]) -> Result<Vec<f32>> {
        let Some(cache) = cache.as_any_mut().downcast_mut::<CpuDecodeCache>() else {
            bail!("decode: this cache was made by another engine");
        };
        decode_step(&self.weights, &mut cache.0, tokens)
    }
}

/// How an engine runs, beyond its device (the CLI's `--recompute`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineOptions {
    /// Per-layer activation recomputation on the GPU engine: the forward keeps only each
    /// layer's input and the backward reruns the layer (less memory, about one more forward
    /// per step). The CPU engine has no such mode: there it has no effect (a note says so).
    pub recompute: bool,
}
