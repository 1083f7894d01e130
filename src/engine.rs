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
use crate::prefix::{PrefixBank, Reparam, ReparamCache, ReparamGrads};
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
