//! The GPU engine: the frozen model in fp16 on one CUDA device, behind the same [`Engine`]
//! interface as the CPU reference.
//!
//! The engine code is written over a [`Backend`] (buffers, GEMMs, one method per kernel):
//! [`CudaEngine`] runs it on the GPU ([`GpuBackend`]) — a real card, or the simulated CUDA device
//! (sim/), which is how CI checks this file against the reference without a GPU
//! (`tests/gpu_engine.rs`, `tests/gpu_engine_tiny.rs`, `tests/gpu_smollm2.rs`).
//!
//! - The weights are uploaded once, in fp16, with the projections that read the same input fused
//!   (`[Wq; Wk; Wv]`, and Llama's `[W_gate; W_up]`), so each is one cuBLAS GEMM.
//! - Forward per layer: residual add + norm (one kernel, the fp32 residual stream updated in
//!   place), the fused QKV GEMM, bias + RoPE into `[B, H, T, D]`, the fused prefix attention
//!   (`kernels/prefix_attention.cu`), the output GEMM, then the same for the MLP with GELU-tanh
//!   or SwiGLU. Biases of the output projections are folded into the next residual add.
//! - The LM head and the cross-entropy run on the target rows only, in chunks of rows, so a
//!   `[tokens × vocab]` logits matrix is never resident.
//! - The prefix-only backward: activation gradients only (no weight gradients), down to every
//!   layer's prefix keys/values, which the attention backward sums over the sequences using each
//!   prefix. fp16 activations and GEMMs with fp32 accumulation, the residual gradient in fp32,
//!   dynamic loss scaling as torch's `GradScaler`: on an inf/NaN in the prefix gradient the
//!   scale is halved and `loss_and_grad` returns [`crate::engine::GradOverflow`] (with the
//!   loss), so the trainer skips that step; the count is in [`ModelEngine::overflow_skips`].
//! - Optional activation recomputation ([`ModelEngine::set_recompute`], or
//!   `PREFIX_TUNE_RECOMPUTE=1` for the CLI): the forward keeps only each layer's input and the
//!   backward reruns the layer before its backward.
//! - Workspaces are allocated once and grown only when a larger batch arrives; an allocation
//!   failure says how much was asked, how much is free, and what to reduce.
//! - Decoding (generation) runs on the device with a per-layer KV cache `[B, Hkv, capacity, D]`
//!   whose first entries of each sequence are its prefix (mixed prefixes, or none, per request).
//!   A step runs the new tokens through the same layer code as training ([`layer_forward`])
//!   and appends their keys/values to the cache (a row scatter). The prefill (whole prompts of
//!   uneven lengths) attends with the fused prefix-attention kernel over the bank, a request
//!   without a prefix getting the kernels' negative prefix index; later steps (one token per
//!   sequence) with `kernels/decode_attention.cu`, which reads the cache then the new keys
//!   causally. Beam reordering gathers cache rows on the device. The cache is allocated at the
//!   prefill for the longest prefix + prompt + a headroom ([`ModelEngine::set_decode_headroom`])
//!   and doubles (one row gather) when a sequence outgrows it. Prefilled caches can be joined
//!   into a running one ([`ModelEngine::join_decode`], two row scatters per buffer) and shrunk
//!   by a reorder: the continuous batching of `prefix-tune serve`. Each sequence's prefix is
//!   copied into its own cache rows (the decode kernel reads one contiguous cache per sequence).
//!
//! Where the prefix bank comes from and where its gradient goes is the caller's choice
//! (`BankSource`, `GradSink`, `LossSink`): the [`Engine`] calls take a host bank and
//! return a host gradient (the reference's interface, one upload and one download per call);
//! the device-resident training step (`cuda::training`) hands in its fp32 master on the device
//! (rounded to fp16 there), accumulates the gradient into its own buffer and keeps the losses
//! on the device until its one read per step.
//!
//! The files, one job each: this one holds [`ModelEngine`] (construction, settings, the
//! [`Engine`] interface); `weights` the fp16 weights on the device; `workspace` the activation
//! workspace and RoPE tables; `step` a training call (forward, loss head, backward, loss
//! scaling); `layer` the layer code training and decoding share; `decoding` the KV cache and
//! continuous batching. The training state between steps lives in `cuda::training`.

use std::any::Any;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use half::f16;

use super::attention as attn;
use super::backend::{AttnBufs, Backend, Elem, GpuBackend, NormBufs, RopeBufs};
use super::decode::{DecodeBufs, DecodeShape};
use super::model_ops::{self as ops, NormKind};
use crate::engine::{check_run, DecodeCache, Engine};
use crate::model::config::{Arch, ModelConfig, ModelWeights};
use crate::prefix::PrefixBank;
use crate::types::AttnShape;
use crate::types::Rope;
use crate::types::{Batch, LossOutput, Positions, RunOptions};

/// Elements of one chunk of head logits (rows × vocab): 64 MiB of fp16.
const HEAD_CHUNK_ELEMS: usize = 1 << 25;

/// Dynamic loss scaling (as torch's GradScaler): start high, halve on overflow (that step is
/// skipped), double after `GROWTH_INTERVAL` clean steps in a row; below `MIN_SCALE` an overflow
/// is an error.
const INITIAL_SCALE: f32 = 65536.0;
const GROWTH_INTERVAL: u32 = 1000;
const MAX_SCALE: f32 = 16_777_216.0;
const MIN_SCALE: f32 = 1.0 / 1024.0;

fn to_f16(x: &[f32]) -> Vec<f16> {
    x.iter().map(|&v| f16::from_f32(v)).collect()
}

/// `x` in a new device buffer.
fn upload<B: Backend, T: Elem>(be: &B, what: &str, x: &[T]) -> Result<B::Buf<T>> {
    let mut buf = be.alloc::<T>(what, x.len())?;
    be.write(what, x, &mut buf)?;
    Ok(buf)
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

mod decoding;
mod layer;
mod step;
mod weights;
mod workspace;

use self::decoding::*;
use self::layer::*;
use self::step::*;
pub(crate) use self::step::{non_finite_loss, BankSource};
use self::weights::*;
use self::workspace::*;

// ---------------------------------------------------------------------------------------------

/// The frozen model on a device `B` (see the module documentation): [`CudaEngine`] on a GPU,
/// (the GPU backend, on a card or the simulated device).
pub struct ModelEngine<B: Backend> {
    be: B,
    model: DevModel<B>,
    cfg: ModelConfig,
    ws: Option<Workspace<B>>,
    rope: Option<RopeTables<B>>,
    scaler: LossScaler,
    overflow_skips: u64,
    peak_used: usize,
    /// Elements of one chunk of head logits (rows × vocab).
    head_chunk_elems: usize,
    /// Recompute each layer's activations in the backward instead of keeping them.
    recompute: bool,
    /// dQ without float atomics in the attention backward (bitwise reproducible).
    pub deterministic: bool,
    /// KV-cache entries per sequence kept free after a prefill ([`ModelEngine::set_decode_headroom`]).
    decode_headroom: usize,
}

/// The GPU engine.
pub type CudaEngine = ModelEngine<GpuBackend>;

impl CudaEngine {
    /// Opens GPU 0, checks that the model fits the kernels and uploads its weights in fp16.
    pub fn new(weights: Arc<ModelWeights<f32>>) -> Result<Self> {
        check_model(&weights.config)?;
        let be = GpuBackend::new()?;
        let mut e =
            ModelEngine::with_backend(be, weights).context("uploading the model to the GPU")?;
        // `--recompute` (EngineOptions) sets this too; PREFIX_TUNE_RECOMPUTE=1 turns it on from the environment.
        if std::env::var("PREFIX_TUNE_RECOMPUTE").is_ok_and(|v| v == "1") {
            e.set_recompute(true);
        }
        Ok(e)
    }
}

/// Whether the kernels can run a model of this configuration.
pub fn check_model(cfg: &ModelConfig) -> Result<()> {
    if !attn::SUPPORTED_HEAD_DIMS.contains(&cfg.head_dim) {
        bail!(
            "the GPU engine's fused attention kernels support head dims {:?}; this model has \
             head dim {} (use --device cpu)",
            attn::SUPPORTED_HEAD_DIMS,
            cfg.head_dim
        );
    }
    if cfg.n_kv_heads == 0 || cfg.n_heads % cfg.n_kv_heads != 0 {
        bail!(
            "{} query heads are not a multiple of {} kv heads",
            cfg.n_heads,
            cfg.n_kv_heads
        );
    }
    Ok(())
}

impl<B: Backend> ModelEngine<B> {
    /// The engine on an opened device: uploads the weights in fp16.
    pub fn with_backend(be: B, weights: Arc<ModelWeights<f32>>) -> Result<Self> {
        check_model(&weights.config)?;
        let model = DevModel::upload(&be, &weights)?;
        let mut e = ModelEngine {
            be,
            model,
            cfg: weights.config.clone(),
            ws: None,
            rope: None,
            scaler: LossScaler {
                scale: INITIAL_SCALE,
                good_steps: 0,
            },
            overflow_skips: 0,
            peak_used: 0,
            head_chunk_elems: HEAD_CHUNK_ELEMS,
            recompute: false,
            deterministic: false,
            decode_headroom: DECODE_HEADROOM,
        };
        e.note_memory();
        Ok(e)
    }

    /// Steps whose gradient overflowed (`loss_and_grad` returned
    /// [`crate::engine::GradOverflow`] and the step was skipped), so far.
    pub fn overflow_skips(&self) -> u64 {
        self.overflow_skips
    }

    /// The current loss scale.
    pub fn loss_scale(&self) -> f32 {
        self.scaler.scale
    }

    /// Sets the loss scale (a checkpoint's on resume; tests use it to provoke overflows),
    /// clamped to `[MIN_SCALE, MAX_SCALE]`; a non-finite or non-positive value is ignored.
    pub fn set_loss_scale(&mut self, scale: f32) {
        if scale.is_finite() && scale > 0.0 {
            self.scaler.scale = scale.clamp(MIN_SCALE, MAX_SCALE);
            self.scaler.good_steps = 0;
        }
    }

    /// Sets the size of the LM head's logits chunks (elements, rows × vocab; at least one row).
    /// Smaller chunks need less memory; tests use tiny ones to exercise the chunking.
    pub fn set_head_chunk_elems(&mut self, elems: usize) {
        self.head_chunk_elems = elems;
        self.ws = None; // reallocated with the new chunk on the next call
    }

    /// Activation recomputation: the forward keeps only each layer's input (fp32 residual) and
    /// the backward reruns the layer's forward before its backward — about one more forward per
    /// step for a fraction of the activation memory (HF PEFT cannot checkpoint with prefix
    /// tuning).
    pub fn set_recompute(&mut self, on: bool) {
        if self.recompute != on {
            self.recompute = on;
            self.ws = None;
        }
    }

    /// Peak device memory in use (bytes, all of the device as the driver reports it) seen at the
    /// end of each call so far.
    pub fn peak_device_memory(&self) -> usize {
        self.peak_used
    }

    /// Bytes of the current workspace (activations kept for the backward and scratch).
    pub fn workspace_bytes(&self) -> usize {
        self.ws.as_ref().map_or(0, |w| w.bytes)
    }

    /// Bytes this engine allocated on the device: the fp16 weights and the workspace (the
    /// counterpart of torch's `max_memory_allocated`; cuBLAS and the context come on top).
    pub fn allocated_bytes(&self) -> usize {
        self.model.bytes + self.workspace_bytes()
    }

    /// The device backend (e.g. to enable profiling on the GPU).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.be
    }

    /// The device, as the backend describes it.
    pub fn device_description(&self) -> String {
        self.be.describe()
    }

    fn note_memory(&mut self) {
        if let Some(used) = self.be.memory_in_use() {
            self.peak_used = self.peak_used.max(used);
        }
    }
}

/// The model's norm: LayerNorm for GPT-2, RMSNorm for Llama.
fn norm_kind(cfg: &ModelConfig) -> NormKind {
    match cfg.arch {
        Arch::Gpt2 => NormKind::Layer,
        Arch::Llama => NormKind::Rms,
    }
}

/// The softmax scale of the attention: 1/sqrt(head_dim).
fn attn_scale(cfg: &ModelConfig) -> f32 {
    (1.0 / (cfg.head_dim as f64).sqrt()) as f32
}

fn loss_output(loss_sum: Vec<f64>, batch: &Batch) -> LossOutput<f32> {
    let n_targets = batch.n_targets();
    let total: usize = n_targets.iter().sum();
    let mean = if total == 0 {
        0.0
    } else {
        loss_sum.iter().sum::<f64>() / total as f64
    };
    LossOutput {
        loss_sum: loss_sum.iter().map(|&x| x as f32).collect(),
        n_targets,
        mean_loss: mean as f32,
    }
}

impl<B: Backend + 'static> Engine for ModelEngine<B>
where
    B::Buf<f16>: Send,
{
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn describe(&self) -> String {
        format!(
            "prefix-tune kernels on {}: fp16 weights ({:.1} MiB), fused prefix attention{}; \
             KV-cache decoding",
            self.be.describe(),
            mib(self.model.bytes),
            if self.recompute {
                ", activation recomputation"
            } else {
                ""
            }
        )
    }

    fn loss(
        &mut self,
        prefix: Option<&PrefixBank<f32>>,
        batch: &Batch,
        opts: &RunOptions,
    ) -> Result<LossOutput<f32>> {
        check_run(&self.cfg, prefix, batch, opts)?;
        if batch.rows() == 0 {
            return Ok(loss_output(vec![0.0; batch.batch], batch));
        }
        let source = prefix.map_or(BankSource::None, BankSource::Host);
        let shape = self.forward(source, batch, opts, false)?;
        let sums = self.head(&shape, batch, None, LossSink::Host)?;
        self.note_memory();
        Ok(loss_output(sums, batch))
    }

    fn loss_and_grad(
        &mut self,
        prefix: &PrefixBank<f32>,
        batch: &Batch,
        opts: &RunOptions,
    ) -> Result<(LossOutput<f32>, PrefixBank<f32>)> {
        check_run(&self.cfg, Some(prefix), batch, opts)?;
        let total: usize = batch.n_targets().iter().sum();
        if batch.rows() == 0 || total == 0 {
            let out = self.loss(Some(prefix), batch, opts)?;
            return Ok((out, prefix.zeros_like()));
        }
        let shape = self.forward(BankSource::Host(prefix), batch, opts, true)?;
        let s = self.scaler.scale;
        let sums = self.head(&shape, batch, Some(s / total as f32), LossSink::Host)?;
        let out = loss_output(sums, batch);
        if !out.mean_loss.is_finite() {
            bail!("{}", non_finite_loss(out.mean_loss as f64));
        }
        self.backward(&shape, GradSink::Workspace)?;
        let grad = self.download_prefix_grads(&shape, 1.0 / s)?;
        self.note_memory();
        match self.after_backward(grad.is_some())? {
            None => {
                let mut grad = grad.expect("finite");
                if prefix.len == 0 {
                    grad = prefix.zeros_like();
                }
                Ok((out, grad))
            }
            Some(new_scale) => Err(crate::engine::GradOverflow {
                loss: out,
                scale: s,
                new_scale,
            }
            .into()),
        }
    }

    fn loss_scale(&self) -> Option<f32> {
        Some(ModelEngine::loss_scale(self))
    }

    fn set_loss_scale(&mut self, scale: f32) {
        ModelEngine::set_loss_scale(self, scale);
    }

    fn begin_decode(
        &mut self,
        prefix: Option<&PrefixBank<f32>>,
        prefix_index: &[Option<usize>],
        opts: &RunOptions,
    ) -> Result<Box<dyn DecodeCache>> {
        // The reference cache's checks (bank shape, indices), so both engines refuse alike.
        crate::prefix::check_decode_request(&self.cfg, prefix, prefix_index)?;
        let bank = prefix.filter(|p| p.len > 0).cloned();
        let index: Vec<Option<usize>> = prefix_index
            .iter()
            .map(|i| i.filter(|_| bank.is_some()))
            .collect();
        let p_len = bank.as_ref().map_or(0, |p| p.len);
        Ok(Box::new(KvDecodeCache::<B> {
            prefix_len: index
                .iter()
                .map(|i| if i.is_some() { p_len } else { 0 })
                .collect(),
            tokens: vec![0; index.len()],
            positions: vec![opts.positions; index.len()],
            index,
            bank,
            capacity: 0,
            k: Vec::new(),
            v: Vec::new(),
            pending: None,
            dev_batch: 0,
        }))
    }

    fn decode(&mut self, cache: &mut dyn DecodeCache, tokens: &[Vec<u32>]) -> Result<Vec<f32>> {
        let Some(cache) = cache.as_any_mut().downcast_mut::<KvDecodeCache<B>>() else {
            bail!("decode: this cache was made by another engine");
        };
        self.kv_decode(cache, tokens)
    }
}
