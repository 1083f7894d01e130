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

// ---------------------------------------------------------------------------------------------
// Weights on the device.

struct DevLayer<B: Backend> {
    attn_norm_w: B::Buf<f16>,
    attn_norm_b: Option<B::Buf<f16>>,
    /// `[q_dim + 2·kv_dim, d]`, and the q, k, v biases.
    wqkv: B::Buf<f16>,
    bqkv: Option<[B::Buf<f16>; 3]>,
    /// `[d, q_dim]`.
    wo: B::Buf<f16>,
    bo: Option<B::Buf<f16>>,
    mlp_norm_w: B::Buf<f16>,
    mlp_norm_b: Option<B::Buf<f16>>,
    /// GPT-2 `[f, d]` (+ bias); Llama `[2f, d]` = `[W_gate; W_up]`.
    w_in: B::Buf<f16>,
    b_in: Option<B::Buf<f16>>,
    /// `[d, f]`.
    w_out: B::Buf<f16>,
    b_out: Option<B::Buf<f16>>,
}

struct DevModel<B: Backend> {
    tok_emb: B::Buf<f16>,
    pos_emb: Option<B::Buf<f16>>,
    layers: Vec<DevLayer<B>>,
    final_norm_w: B::Buf<f16>,
    final_norm_b: Option<B::Buf<f16>>,
    /// Untied head `[vocab, d]` (`None`: the token embedding).
    lm_head: Option<B::Buf<f16>>,
    bytes: usize,
}

impl<B: Backend> DevModel<B> {
    fn upload(be: &B, m: &ModelWeights<f32>) -> Result<Self> {
        let mut bytes = 0usize;
        let mut up = |what: &str, x: &[f32]| -> Result<B::Buf<f16>> {
            bytes += 2 * x.len();
            upload(be, what, &to_f16(x))
        };
        let tok_emb = up("token embedding", &m.tok_emb)?;
        let pos_emb = m
            .pos_emb
            .as_deref()
            .map(|p| up("position embedding", p))
            .transpose()?;
        let mut layers = Vec::with_capacity(m.layers.len());
        for (l, lw) in m.layers.iter().enumerate() {
            let name = |s: &str| format!("layer {l} {s}");
            let cat = |parts: &[&[f32]]| parts.concat();
            let bqkv = match (&lw.bq, &lw.bk, &lw.bv) {
                (Some(q), Some(k), Some(v)) => Some([
                    up(&name("q bias"), q)?,
                    up(&name("k bias"), k)?,
                    up(&name("v bias"), v)?,
                ]),
                (None, None, None) => None,
                _ => bail!("layer {l}: q/k/v biases must be all present or all absent"),
            };
            let w_in = match &lw.w_up {
                Some(up_w) => cat(&[&lw.w_in, up_w]),
                None => lw.w_in.clone(),
            };
            layers.push(DevLayer {
                attn_norm_w: up(&name("attention norm"), &lw.attn_norm_w)?,
                attn_norm_b: lw
                    .attn_norm_b
                    .as_deref()
                    .map(|b| up(&name("attention norm bias"), b))
                    .transpose()?,
                wqkv: up(&name("qkv projection"), &cat(&[&lw.wq, &lw.wk, &lw.wv]))?,
                bqkv,
                wo: up(&name("output projection"), &lw.wo)?,
                bo: lw
                    .bo
                    .as_deref()
                    .map(|b| up(&name("output bias"), b))
                    .transpose()?,
                mlp_norm_w: up(&name("MLP norm"), &lw.mlp_norm_w)?,
                mlp_norm_b: lw
                    .mlp_norm_b
                    .as_deref()
                    .map(|b| up(&name("MLP norm bias"), b))
                    .transpose()?,
                w_in: up(&name("MLP input projection"), &w_in)?,
                b_in: lw
                    .b_in
                    .as_deref()
                    .map(|b| up(&name("MLP input bias"), b))
                    .transpose()?,
                w_out: up(&name("MLP output projection"), &lw.w_out)?,
                b_out: lw
                    .b_out
                    .as_deref()
                    .map(|b| up(&name("MLP output bias"), b))
                    .transpose()?,
            });
        }
        let final_norm_w = up("final norm", &m.final_norm_w)?;
        let final_norm_b = m
            .final_norm_b
            .as_deref()
            .map(|b| up("final norm bias", b))
            .transpose()?;
        let lm_head = m.lm_head.as_deref().map(|h| up("LM head", h)).transpose()?;
        Ok(DevModel {
            tok_emb,
            pos_emb,
            layers,
            final_norm_w,
            final_norm_b,
            lm_head,
            bytes,
        })
    }

    fn head(&self) -> &B::Buf<f16> {
        self.lm_head.as_ref().unwrap_or(&self.tok_emb)
    }
}

// ---------------------------------------------------------------------------------------------
// Workspaces.

/// The capacity a workspace was sized for: every call with smaller or equal dimensions fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Capacity {
    batch: usize,
    seq: usize,
    prefix: usize,
    n_prefixes: usize,
    /// Per-layer activations kept for a backward (else one layer's, reused).
    train: bool,
    /// With `train`: keep only each layer's input and recompute the rest in the backward.
    recompute: bool,
}

impl Capacity {
    fn covers(&self, other: &Capacity) -> bool {
        self.batch >= other.batch
            && self.seq >= other.seq
            && self.prefix >= other.prefix
            && self.n_prefixes >= other.n_prefixes
            && (self.train || !other.train)
            && self.recompute == other.recompute
    }

    fn max(&self, o: &Capacity) -> Capacity {
        Capacity {
            batch: self.batch.max(o.batch),
            seq: self.seq.max(o.seq),
            prefix: self.prefix.max(o.prefix),
            n_prefixes: self.n_prefixes.max(o.n_prefixes),
            train: self.train || o.train,
            recompute: o.recompute,
        }
    }

    fn attn_shape(&self, cfg: &ModelConfig) -> AttnShape {
        AttnShape {
            batch: self.batch,
            q_heads: cfg.n_heads,
            kv_heads: cfg.n_kv_heads,
            seq: self.seq,
            prefix: self.prefix,
            head_dim: cfg.head_dim,
            n_prefixes: self.n_prefixes,
        }
    }
}

/// What one layer's forward keeps for the backward.
struct LayerSaved<B: Backend> {
    /// Attention block input (fp16 copy of the residual) and its norm statistics.
    attn_x: B::Buf<f16>,
    attn_mean: B::Buf<f32>,
    attn_rstd: B::Buf<f32>,
    /// `[B, H, T, D]` after bias and RoPE; the attention output and its LSE.
    q: B::Buf<f16>,
    k: B::Buf<f16>,
    v: B::Buf<f16>,
    o: B::Buf<f16>,
    lse: B::Buf<f32>,
    /// MLP block input and its norm statistics.
    mlp_x: B::Buf<f16>,
    mlp_mean: B::Buf<f32>,
    mlp_rstd: B::Buf<f32>,
    /// GPT-2: the biased pre-activation `[rows, f]`; Llama: `[gate | up]` `[rows, 2f]`.
    a: B::Buf<f16>,
}

struct Workspace<B: Backend> {
    cap: Capacity,
    saved: Vec<LayerSaved<B>>,
    tokens: B::Buf<i32>,
    pos_offset: B::Buf<i32>,
    prefix_index: B::Buf<i32>,
    valid_len: B::Buf<i32>,
    /// Decoding: where each new key/value row goes in the cache `[B, Hkv, T]` (taken out while
    /// the layers borrow the workspace).
    append_idx: Option<B::Buf<i32>>,
    /// Per layer, the prefix bank's keys and values in fp16.
    bank: Vec<(B::Buf<f16>, B::Buf<f16>)>,
    /// Residual stream `[rows, d]` fp32, the norm output `[rows, d]` (after the last layer: the
    /// final hidden states), and the final norm's input and statistics.
    x: B::Buf<f32>,
    h: B::Buf<f16>,
    /// Recomputation: each layer's block input (fp32 residual after the add).
    layer_inputs: Vec<B::Buf<f32>>,
    final_x: B::Buf<f16>,
    final_mean: B::Buf<f32>,
    final_rstd: B::Buf<f32>,
    /// `[rows, q + 2kv]`: the fused projection (forward) / its gradient (backward).
    qkv: B::Buf<f16>,
    /// `[rows, q_dim]`: the attention output as rows / the output projection's input gradient.
    o_rows: B::Buf<f16>,
    /// `[B, Hq, T, D]`: dO.
    d_o: B::Buf<f16>,
    /// `[rows, d]`: branch outputs (forward), norm input gradients (backward).
    y: B::Buf<f16>,
    /// `[rows, f]`: the activation output / its gradient.
    act: B::Buf<f16>,
    /// `[rows, f or 2f]`: the pre-activation gradient.
    d_a: B::Buf<f16>,
    /// Residual gradient, fp32 and its fp16 copy.
    dx: B::Buf<f32>,
    dx16: B::Buf<f16>,
    /// Head chunk: rows, logits, row gradient, indices, labels, losses.
    chunk: usize,
    head_h: B::Buf<f16>,
    logits: B::Buf<f16>,
    head_dh: B::Buf<f16>,
    head_idx: B::Buf<i32>,
    head_labels: B::Buf<i32>,
    head_loss: B::Buf<f32>,
    chunk_loss: B::Buf<f32>,
    /// Attention backward scratch and gradients (reused per layer).
    attn: B::AttnScratch,
    /// Per layer `[k | v]` prefix gradients (fp16, loss-scaled), copied out of `attn_grads`.
    prefix_grads: B::Buf<f32>,
    bytes: usize,
}

impl<B: Backend> Workspace<B> {
    fn new(be: &B, cfg: &ModelConfig, cap: Capacity, head_chunk_elems: usize) -> Result<Self> {
        let (b, t) = (cap.batch, cap.seq);
        let rows = b * t;
        let (d, hd) = (cfg.d_model, cfg.head_dim);
        let q_dim = cfg.q_dim();
        let kv_dim = cfg.kv_dim();
        let f_in = match cfg.arch {
            Arch::Gpt2 => cfg.d_ff,
            Arch::Llama => 2 * cfg.d_ff,
        };
        let bank = cap.n_prefixes * cfg.n_kv_heads * cap.prefix * hd;
        let chunk = (head_chunk_elems / cfg.vocab_size.max(1)).clamp(1, rows.max(1));
        let mut bytes = 0usize;
        let mut h16 = |what: &str, n: usize| {
            bytes += 2 * n;
            be.alloc::<f16>(what, n)
        };
        let n_saved = if cap.train && !cap.recompute {
            cfg.n_layers
        } else {
            1
        };
        let mut layer_inputs = Vec::new();
        if cap.train && cap.recompute {
            for l in 0..cfg.n_layers {
                layer_inputs
                    .push(be.alloc::<f32>(&format!("layer {l} input (recomputation)"), rows * d)?);
            }
        }
        let mut saved = Vec::with_capacity(n_saved);
        let mut f32s = Vec::new();
        for l in 0..n_saved {
            let w = |s: &str| format!("layer {l} {s} ({b} sequences × {t} tokens)");
            saved.push(LayerSaved {
                attn_x: h16(&w("attention input"), rows * d)?,
                attn_mean: be.alloc("norm statistics", rows)?,
                attn_rstd: be.alloc("norm statistics", rows)?,
                q: h16(&w("queries"), rows * q_dim)?,
                k: h16(&w("keys"), rows * kv_dim)?,
                v: h16(&w("values"), rows * kv_dim)?,
                o: h16(&w("attention output"), rows * q_dim)?,
                lse: be.alloc("attention LSE", b * cfg.n_heads * t)?,
                mlp_x: h16(&w("MLP input"), rows * d)?,
                mlp_mean: be.alloc("norm statistics", rows)?,
                mlp_rstd: be.alloc("norm statistics", rows)?,
                a: h16(&w("MLP pre-activation"), rows * f_in)?,
            });
            f32s.push(4 * (5 * rows + b * cfg.n_heads * t));
        }
        let mut bank_bufs = Vec::with_capacity(cfg.n_layers);
        for _ in 0..cfg.n_layers {
            bank_bufs.push((h16("prefix keys", bank)?, h16("prefix values", bank)?));
        }
        let ws = Workspace {
            cap,
            tokens: be.alloc("token ids", rows)?,
            pos_offset: be.alloc("position offsets", b)?,
            prefix_index: be.alloc("prefix indices", b)?,
            valid_len: be.alloc("valid lengths", b)?,
            append_idx: Some(be.alloc("cache slots", rows * cfg.n_kv_heads)?),
            bank: bank_bufs,
            x: be.alloc("residual stream", rows * d)?,
            h: h16("norm output", rows * d)?,
            final_x: h16("final norm input", rows * d)?,
            final_mean: be.alloc("norm statistics", rows)?,
            final_rstd: be.alloc("norm statistics", rows)?,
            qkv: h16("qkv projection", rows * (q_dim + 2 * kv_dim))?,
            o_rows: h16("attention output rows", rows * q_dim)?,
            d_o: h16("attention output gradient", rows * q_dim)?,
            y: h16("branch output", rows * d)?,
            act: h16("MLP activation", rows * cfg.d_ff)?,
            d_a: h16("MLP pre-activation gradient", rows * f_in)?,
            dx: be.alloc("residual gradient", rows * d)?,
            dx16: h16("residual gradient (fp16)", rows * d)?,
            chunk,
            head_h: h16("head chunk rows", chunk * d)?,
            logits: h16(
                &format!(
                    "head logits chunk ({chunk} rows × {} vocab)",
                    cfg.vocab_size
                ),
                chunk * cfg.vocab_size,
            )?,
            head_dh: h16("head chunk gradient", chunk * d)?,
            head_idx: be.alloc("head row indices", chunk)?,
            head_labels: be.alloc("head labels", chunk)?,
            head_loss: be.alloc("head losses", rows)?,
            chunk_loss: be.alloc("head chunk losses", chunk)?,
            attn: be
                .attn_scratch(&cap.attn_shape(cfg))
                .context("allocating the attention backward workspace")?,
            prefix_grads: be.alloc("prefix gradients", cfg.n_layers * 2 * bank)?,
            saved,
            bytes: 0,
            layer_inputs,
        };
        let extra: usize = f32s.iter().sum::<usize>()
            + 4 * rows * (2 * d + 3 + 1)
            + 4 * rows * d * ws.layer_inputs.len();
        Ok(Workspace {
            bytes: bytes + extra,
            ..ws
        })
    }
}

/// RoPE cos/sin tables `[n_positions, D/2]` in fp32 (angles computed in f64 on the host).
struct RopeTables<B: Backend> {
    n_positions: usize,
    cos: B::Buf<f32>,
    sin: B::Buf<f32>,
}

impl<B: Backend> RopeTables<B> {
    fn new(be: &B, cfg: &ModelConfig, n_positions: usize) -> Result<Self> {
        let positions: Vec<usize> = (0..n_positions).collect();
        let r = Rope::<f64>::new(cfg.head_dim, cfg.rope_theta, &positions);
        let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        Ok(RopeTables {
            n_positions,
            cos: upload(be, "RoPE cosines", &f(&r.cos))?,
            sin: upload(be, "RoPE sines", &f(&r.sin))?,
        })
    }
}

/// Dynamic loss scale.
#[derive(Clone, Copy, Debug)]
struct LossScaler {
    scale: f32,
    good_steps: u32,
}

/// Where a call's prefix bank comes from.
pub(crate) enum BankSource<'a, B: Backend> {
    /// No prefix (the base model).
    None,
    /// A host bank, uploaded in fp16 (the engine's calls from the [`Engine`] interface).
    Host(&'a PrefixBank<f32>),
    /// A device-resident fp32 master bank in [`PrefixBank::to_flat`]'s order
    /// (`[L][K|V][n, Hkv, P, D]`), rounded to fp16 into the workspace by kernels (training with
    /// the state on the device: nothing crosses the bus).
    Device {
        master: &'a B::Buf<f32>,
        n_prefixes: usize,
        len: usize,
    },
}

impl<B: Backend> BankSource<'_, B> {
    /// (prefix length, number of prefixes); (0, 0) without a prefix.
    fn dims(&self) -> (usize, usize) {
        match self {
            BankSource::Host(p) if p.len > 0 => (p.len, p.n_prefixes),
            BankSource::Device {
                n_prefixes, len, ..
            } if *len > 0 => (*len, *n_prefixes),
            _ => (0, 0),
        }
    }
}

/// Where the head's per-target losses go.
enum LossSink<'a, B: Backend> {
    /// Read back: `head` returns the loss sum of each sequence.
    Host,
    /// Left on the device from element `at` of `buf`, in target order (read later, with the
    /// rest of a training step's results, in one transfer).
    Device { buf: &'a mut B::Buf<f32>, at: usize },
}

/// Where the backward's per-layer prefix gradients (loss-scaled, fp32, flat in
/// [`PrefixBank::to_flat`]'s order) go.
enum GradSink<'a, B: Backend> {
    /// The workspace, for [`ModelEngine::download_prefix_grads`].
    Workspace,
    /// A device buffer: written (`accumulate` false) or added to (gradient accumulation over a
    /// step's micro-batches).
    Device {
        grad: &'a mut B::Buf<f32>,
        accumulate: bool,
    },
}

/// Sizes of one call.
#[derive(Clone, Copy, Debug)]
struct CallShape {
    batch: usize,
    seq: usize,
    prefix: usize,
    n_prefixes: usize,
}

impl CallShape {
    fn rows(&self) -> usize {
        self.batch * self.seq
    }
}

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

    /// Makes sure the workspace and RoPE tables fit `shape` (grow only).
    fn prepare(&mut self, shape: &CallShape, train: bool, max_position: usize) -> Result<()> {
        let want = Capacity {
            batch: shape.batch,
            seq: shape.seq,
            prefix: shape.prefix,
            n_prefixes: shape.n_prefixes,
            train,
            recompute: self.recompute,
        };
        let fits = self.ws.as_ref().is_some_and(|w| w.cap.covers(&want));
        if !fits {
            let cap = self.ws.as_ref().map_or(want, |w| w.cap.max(&want));
            self.ws = None; // free the old one first
            self.ws = Some(Workspace::new(
                &self.be,
                &self.cfg,
                cap,
                self.head_chunk_elems,
            )?);
        }
        if self.cfg.arch == Arch::Llama
            && self
                .rope
                .as_ref()
                .map_or(true, |r| r.n_positions < max_position)
        {
            let n = max_position.max(self.cfg.max_positions.min(1 << 16));
            self.rope = Some(RopeTables::new(&self.be, &self.cfg, n)?);
        }
        Ok(())
    }

    /// The loss scaler after a backward at the current scale (torch's `GradScaler.update`):
    /// `finite` counts a clean step (the scale doubles after `GROWTH_INTERVAL` of them);
    /// otherwise the scale is halved and returned (the step is to be skipped), or an error
    /// when it is already as low as it goes.
    pub(crate) fn after_backward(&mut self, finite: bool) -> Result<Option<f32>> {
        let s = self.scaler.scale;
        if finite {
            self.scaler.good_steps += 1;
            if self.scaler.good_steps >= GROWTH_INTERVAL && s < MAX_SCALE {
                self.scaler.scale = s * 2.0;
                self.scaler.good_steps = 0;
            }
            return Ok(None);
        }
        self.scaler.good_steps = 0;
        let new_scale = s / 2.0;
        if new_scale < MIN_SCALE {
            bail!(
                "the prefix gradient is not finite even at loss scale {s}: the fp16 backward \
                 overflowed (use --device cpu)"
            );
        }
        self.scaler.scale = new_scale;
        self.overflow_skips += 1;
        Ok(Some(new_scale))
    }

    /// One micro-batch of a training step whose state stays on the device: the forward from
    /// the fp32 master bank `master` (`n_prefixes` prefixes of length `len`, flat in
    /// [`PrefixBank::to_flat`]'s order), the head with its per-target losses copied to
    /// `losses[at..]` (unscaled, in target order), and the backward of
    /// `loss_scale · Σ loss / step_targets` with the prefix gradient written to `grad`, or added
    /// to it with `accumulate`. Nothing is read back and nothing waits for the device. Returns
    /// the micro-batch's target count. `check` is a bank of the master's shape (for the input
    /// checks only).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn train_micro(
        &mut self,
        master: &B::Buf<f32>,
        check: &PrefixBank<f32>,
        batch: &Batch,
        opts: &RunOptions,
        step_targets: usize,
        losses: &mut B::Buf<f32>,
        at: usize,
        grad: &mut B::Buf<f32>,
        accumulate: bool,
    ) -> Result<usize> {
        check_run(&self.cfg, Some(check), batch, opts)?;
        let n: usize = batch.n_targets().iter().sum();
        ensure!(
            n > 0 && step_targets >= n,
            "a training micro-batch needs target tokens ({n} of {step_targets})"
        );
        ensure!(
            B::len(master) == check.n_params() && B::len(grad) >= check.n_params(),
            "device training state: {} master / {} gradient elements for a bank of {}",
            B::len(master),
            B::len(grad),
            check.n_params()
        );
        let source = BankSource::Device {
            master,
            n_prefixes: check.n_prefixes,
            len: check.len,
        };
        let shape = self.forward(source, batch, opts, true)?;
        let s = self.scaler.scale;
        let sink = LossSink::Device { buf: losses, at };
        self.head(&shape, batch, Some(s / step_targets as f32), sink)?;
        self.backward(&shape, GradSink::Device { grad, accumulate })?;
        self.note_memory();
        Ok(n)
    }

    /// Uploads the batch and the bank, runs the forward to the final hidden states (in
    /// `ws.h`), keeping per-layer activations when `train`.
    fn forward(
        &mut self,
        prefix: BankSource<'_, B>,
        batch: &Batch,
        opts: &RunOptions,
        train: bool,
    ) -> Result<CallShape> {
        let cfg = self.cfg.clone();
        let (p_len, n_prefixes) = prefix.dims();
        let shape = CallShape {
            batch: batch.batch,
            seq: batch.seq,
            prefix: p_len,
            n_prefixes,
        };
        let offset = match opts.positions {
            Positions::AfterPrefix => p_len,
            Positions::FromZero => 0,
        };
        self.prepare(&shape, train, offset + batch.seq)?;
        let Self {
            be,
            model,
            ws,
            rope,
            ..
        } = self;
        let ws = ws.as_mut().expect("prepared workspace");
        let (b, t, rows) = (shape.batch, shape.seq, shape.rows());
        let hd = cfg.head_dim;

        // Inputs.
        let tokens: Vec<i32> = batch.tokens.iter().map(|&t| t as i32).collect();
        be.write("uploading token ids", &tokens, &mut ws.tokens)?;
        be.write(
            "uploading position offsets",
            &vec![offset as i32; b],
            &mut ws.pos_offset,
        )?;
        let s_attn = AttnShape {
            batch: b,
            q_heads: cfg.n_heads,
            kv_heads: cfg.n_kv_heads,
            seq: t,
            prefix: p_len,
            head_dim: hd,
            n_prefixes,
        };
        let (pi, vl) = attn::index_arrays(&s_attn, &batch.prefix_index, &batch.valid_len)?;
        be.write("uploading prefix indices", &pi, &mut ws.prefix_index)?;
        be.write("uploading valid lengths", &vl, &mut ws.valid_len)?;
        let bank_len = s_attn.bank_len();
        match prefix {
            _ if bank_len == 0 => {}
            BankSource::None => {}
            BankSource::Host(p) => {
                for l in 0..cfg.n_layers {
                    let (bk, bv) = &mut ws.bank[l];
                    be.write("uploading prefix keys", &to_f16(&p.k[l]), bk)?;
                    be.write("uploading prefix values", &to_f16(&p.v[l]), bv)?;
                }
            }
            BankSource::Device { master, .. } => {
                for l in 0..cfg.n_layers {
                    let (bk, bv) = &mut ws.bank[l];
                    let base = 2 * l * bank_len;
                    be.to_f16(master, base..base + bank_len, bk, 0)?;
                    be.to_f16(master, base + bank_len..base + 2 * bank_len, bv, 0)?;
                }
            }
        }

        embed(be, &cfg, model, b, t, ws)?;

        // The branch output still to be added to the residual, with its bias.
        let mut pending: Option<Option<&B::Buf<f16>>> = None;
        let n_saved = ws.saved.len();
        for (l, lw) in model.layers.iter().enumerate() {
            let keep_input = !ws.layer_inputs.is_empty();
            layer_forward(
                be,
                &cfg,
                lw,
                ws,
                rope.as_ref(),
                Attend::Batch(&s_attn),
                l,
                l % n_saved,
                pending,
                keep_input,
            )?;
            pending = Some(lw.b_out.as_ref());
        }
        final_norm(be, &cfg, model, ws, rows, pending)?;
        Ok(shape)
    }

    /// The head and cross-entropy over the target rows, in chunks. Returns the loss sum per
    /// sequence; with `grad_scale`, leaves the gradient of `grad_scale·Σ loss` with respect to
    /// the hidden states in `ws.y` (zero on other rows).
    fn head(
        &mut self,
        shape: &CallShape,
        batch: &Batch,
        grad_scale: Option<f32>,
        mut sink: LossSink<'_, B>,
    ) -> Result<Vec<f64>> {
        let Self {
            be, model, ws, cfg, ..
        } = self;
        let ws = ws.as_mut().expect("workspace");
        let (d, vocab) = (cfg.d_model, cfg.vocab_size);
        let rows = shape.rows();
        let targets: Vec<(usize, u32)> = (0..rows)
            .filter(|&r| batch.is_valid_row(r))
            .filter_map(|r| batch.labels[r].map(|t| (r, t)))
            .collect();
        if grad_scale.is_some() {
            be.zero("zeroing the hidden-state gradient", &mut ws.y)?;
        }
        let head = model.head();
        let mut offset = 0;
        for group in targets.chunks(ws.chunk) {
            let c = group.len();
            let idx: Vec<i32> = group.iter().map(|&(r, _)| r as i32).collect();
            let labels: Vec<i32> = group.iter().map(|&(_, t)| t as i32).collect();
            be.write("uploading head rows", &idx, &mut ws.head_idx)?;
            be.write("uploading labels", &labels, &mut ws.head_labels)?;
            let rp = ops::rows_params(c, d)?;
            be.gather_rows(&rp, rows, &ws.h, &ws.head_idx, &mut ws.head_h)?;
            be.gemm_a_bt(c, vocab, d, &ws.head_h, head, &mut ws.logits)?;
            let cp = ops::ce_params(c, vocab, grad_scale)?;
            be.cross_entropy(&cp, &mut ws.logits, &ws.head_labels, &mut ws.chunk_loss)?;
            let (dst, at) = match &mut sink {
                LossSink::Host => (&mut ws.head_loss, offset),
                LossSink::Device { buf, at } => (&mut **buf, *at + offset),
            };
            be.copy("collecting losses", &ws.chunk_loss, 0..c, dst, at)?;
            if grad_scale.is_some() {
                be.gemm_a_b(c, d, vocab, &ws.logits, head, &mut ws.head_dh)?;
                be.scatter_rows(&rp, rows, &ws.head_dh, &ws.head_idx, &mut ws.y)?;
            }
            offset += c;
        }
        let mut loss_sum = vec![0.0f64; shape.batch];
        if offset > 0 && matches!(sink, LossSink::Host) {
            let losses = be.read("downloading losses", &ws.head_loss, 0..offset)?;
            for (&(r, _), &l) in targets.iter().zip(&losses) {
                loss_sum[r / shape.seq] += l as f64;
            }
        }
        Ok(loss_sum)
    }

    /// Full-vocabulary logits `[rows.len(), V]` of the given rows of the last forward's hidden
    /// states (`n_rows` rows in all), in chunks of the head workspace.
    fn row_logits(&mut self, rows: &[usize], n_rows: usize) -> Result<Vec<f32>> {
        let Self {
            be, model, ws, cfg, ..
        } = self;
        let ws = ws.as_mut().expect("workspace");
        let (d, vocab) = (cfg.d_model, cfg.vocab_size);
        let mut out = Vec::with_capacity(rows.len() * vocab);
        for group in rows.chunks(ws.chunk) {
            let c = group.len();
            let idx: Vec<i32> = group.iter().map(|&r| r as i32).collect();
            be.write("uploading logit rows", &idx, &mut ws.head_idx)?;
            let rp = ops::rows_params(c, d)?;
            be.gather_rows(&rp, n_rows, &ws.h, &ws.head_idx, &mut ws.head_h)?;
            be.gemm_a_bt(c, vocab, d, &ws.head_h, model.head(), &mut ws.logits)?;
            let l = be.read("downloading logits", &ws.logits, 0..c * vocab)?;
            out.extend(l.iter().map(|x| x.to_f32()));
        }
        Ok(out)
    }

    /// The prefix-only backward from the hidden-state gradient in `ws.y`, the (loss-scaled)
    /// prefix gradient into `sink`.
    fn backward(&mut self, shape: &CallShape, mut sink: GradSink<'_, B>) -> Result<()> {
        let cfg = self.cfg.clone();
        let deterministic = self.deterministic;
        let Self {
            be,
            model,
            ws,
            rope,
            ..
        } = self;
        let ws = ws.as_mut().expect("workspace");
        let (b, t, rows) = (shape.batch, shape.seq, shape.rows());
        let (d, hd) = (cfg.d_model, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.q_dim(), cfg.kv_dim());
        let qkv_w = q_dim + 2 * kv_dim;
        let kind = norm_kind(&cfg);
        let use_rope = cfg.arch == Arch::Llama;
        let n_pos = rope.as_ref().map_or(0, |r| r.n_positions);
        let s_attn = AttnShape {
            batch: b,
            q_heads: cfg.n_heads,
            kv_heads: cfg.n_kv_heads,
            seq: t,
            prefix: shape.prefix,
            head_dim: hd,
            n_prefixes: shape.n_prefixes,
        };
        let bank_len = s_attn.bank_len();

        // Final norm: dx = norm'(dh).
        let p0 = ops::norm_params(rows, d, cfg.norm_eps, kind, false)?;
        be.norm_bwd(
            &p0,
            &ws.y,
            &ws.final_x,
            &model.final_norm_w,
            Some(&ws.final_mean),
            &ws.final_rstd,
            &mut ws.dx,
            Some(&mut ws.dx16),
        )?;
        let pacc = ops::norm_params(rows, d, cfg.norm_eps, kind, true)?;
        let act_p = ops::act_params(rows, cfg.d_ff)?;
        let n_saved = ws.saved.len();
        for l in (0..cfg.n_layers).rev() {
            let lw = &model.layers[l];
            if !ws.layer_inputs.is_empty() {
                // Recomputation: rerun this layer's forward from its kept input into slot 0.
                let rd = rows * d;
                let (x, inputs) = (&mut ws.x, &ws.layer_inputs);
                be.copy("restoring a layer input", &inputs[l], 0..rd, x, 0)?;
                let attend = Attend::Batch(&s_attn);
                layer_forward(be, &cfg, lw, ws, rope.as_ref(), attend, l, 0, None, false)?;
            }
            let sv = &ws.saved[l % n_saved];
            // MLP block: d_act = dx·W_out, through the activation, dh = d_a·W_in, norm'.
            be.gemm_a_b(rows, cfg.d_ff, d, &ws.dx16, &lw.w_out, &mut ws.act)?;
            let f_in = match cfg.arch {
                Arch::Gpt2 => {
                    be.gelu_bwd(&act_p, &ws.act, &sv.a, &mut ws.d_a)?;
                    cfg.d_ff
                }
                Arch::Llama => {
                    be.swiglu_bwd(&act_p, &ws.act, &sv.a, &mut ws.d_a)?;
                    2 * cfg.d_ff
                }
            };
            be.gemm_a_b(rows, d, f_in, &ws.d_a, &lw.w_in, &mut ws.y)?;
            be.norm_bwd(
                &pacc,
                &ws.y,
                &sv.mlp_x,
                &lw.mlp_norm_w,
                Some(&sv.mlp_mean),
                &sv.mlp_rstd,
                &mut ws.dx,
                Some(&mut ws.dx16),
            )?;

            // Attention block: dO = dx·W_o in heads, the attention backward, then (below layer
            // 0 only) back through RoPE, the QKV projection and the norm.
            be.gemm_a_b(rows, q_dim, d, &ws.dx16, &lw.wo, &mut ws.o_rows)?;
            let op = ops::heads_params(b, t, cfg.n_heads, hd, q_dim, 0, false, 0)?;
            be.rows_to_heads(&op, &ws.o_rows, None, None, &mut ws.d_o)?;
            let (bk, bv) = &ws.bank[l];
            let inputs = AttnBufs {
                q: &sv.q,
                k: &sv.k,
                v: &sv.v,
                prefix_k: bk,
                prefix_v: bv,
                prefix_index: &ws.prefix_index,
                valid_len: &ws.valid_len,
            };
            be.attn_bwd(
                &s_attn,
                attn_scale(&cfg),
                deterministic,
                inputs,
                &sv.o,
                &sv.lse,
                &ws.d_o,
                &mut ws.attn,
            )?;
            let grads = B::attn_grads(&ws.attn);
            if bank_len > 0 {
                let base = l * 2 * bank_len;
                let parts = [
                    (grads.d_prefix_k, base),
                    (grads.d_prefix_v, base + bank_len),
                ];
                for (src, at) in parts {
                    match &mut sink {
                        GradSink::Workspace => be.copy(
                            "collecting prefix gradients",
                            src,
                            0..bank_len,
                            &mut ws.prefix_grads,
                            at,
                        )?,
                        GradSink::Device {
                            grad,
                            accumulate: false,
                        } => be.copy("collecting prefix gradients", src, 0..bank_len, grad, at)?,
                        GradSink::Device {
                            grad,
                            accumulate: true,
                        } => be.accumulate(src, 0..bank_len, grad, at)?,
                    }
                }
            }
            if l == 0 {
                break;
            }
            let parts = [
                (grads.dq, 0, cfg.n_heads, use_rope),
                (grads.dk, q_dim, cfg.n_kv_heads, use_rope),
                (grads.dv, q_dim + kv_dim, cfg.n_kv_heads, false),
            ];
            for (src, col, heads, rot) in parts {
                let hp = ops::heads_params(b, t, heads, hd, qkv_w, col, rot, n_pos)?;
                let rope_bufs = rot.then(|| {
                    let r = rope.as_ref().expect("RoPE tables");
                    RopeBufs {
                        pos_offset: &ws.pos_offset,
                        cos: &r.cos,
                        sin: &r.sin,
                    }
                });
                be.heads_to_rows(&hp, src, rope_bufs, &mut ws.qkv)?;
            }
            be.gemm_a_b(rows, d, qkv_w, &ws.qkv, &lw.wqkv, &mut ws.y)?;
            be.norm_bwd(
                &pacc,
                &ws.y,
                &sv.attn_x,
                &lw.attn_norm_w,
                Some(&sv.attn_mean),
                &sv.attn_rstd,
                &mut ws.dx,
                Some(&mut ws.dx16),
            )?;
        }

        Ok(())
    }

    /// The prefix gradient [`ModelEngine::backward`] left in the workspace, times `unscale`, on
    /// the host; `None` when it is not finite (fp16 overflow).
    fn download_prefix_grads(
        &mut self,
        shape: &CallShape,
        unscale: f32,
    ) -> Result<Option<PrefixBank<f32>>> {
        let cfg = &self.cfg;
        let (be, ws) = (&self.be, self.ws.as_ref().expect("workspace"));
        let hd = cfg.head_dim;
        let bank_len = shape.n_prefixes * cfg.n_kv_heads * shape.prefix * hd;
        let mut grad = PrefixBank::<f32>::zeros(
            shape.n_prefixes,
            cfg.n_layers,
            cfg.n_kv_heads,
            shape.prefix,
            hd,
        );
        if bank_len > 0 {
            let all = be.read(
                "downloading prefix gradients",
                &ws.prefix_grads,
                0..cfg.n_layers * 2 * bank_len,
            )?;
            let widen = |x: &[f32]| -> Vec<f32> { x.iter().map(|v| v * unscale).collect() };
            for l in 0..cfg.n_layers {
                let base = l * 2 * bank_len;
                grad.k[l] = widen(&all[base..base + bank_len]);
                grad.v[l] = widen(&all[base + bank_len..base + 2 * bank_len]);
            }
        } else {
            // Wait for the device like the other branch does.
            be.read("synchronizing", &ws.head_loss, 0..1)?;
        }
        Ok(grad.all_finite().then_some(grad))
    }
}

/// The error of a non-finite loss on the GPU engine.
pub(crate) fn non_finite_loss(loss: f64) -> String {
    format!(
        "the GPU forward gave a non-finite loss ({loss}): the fp16 activations overflowed (use \
         --device cpu for this model or data)"
    )
}

/// The softmax scale of the attention: 1/sqrt(head_dim).
/// The model's norm: LayerNorm for GPT-2, RMSNorm for Llama.
fn norm_kind(cfg: &ModelConfig) -> NormKind {
    match cfg.arch {
        Arch::Gpt2 => NormKind::Layer,
        Arch::Llama => NormKind::Rms,
    }
}

/// Embeds the `[b, t]` tokens of `ws.tokens` (positions from `ws.pos_offset`) into the residual
/// stream `ws.x`.
fn embed<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    model: &DevModel<B>,
    b: usize,
    t: usize,
    ws: &mut Workspace<B>,
) -> Result<()> {
    let p = ops::embedding_params(
        b,
        t,
        cfg.d_model,
        cfg.vocab_size,
        model.pos_emb.as_ref().map_or(0, |_| cfg.max_positions),
    )?;
    be.embedding(
        &p,
        &ws.tokens,
        &ws.pos_offset,
        &model.tok_emb,
        model.pos_emb.as_ref(),
        &mut ws.x,
    )
}

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

/// The last residual add (the pending branch output with its bias) and the final norm into
/// `ws.h`, keeping its input and statistics for the backward.
fn final_norm<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    model: &DevModel<B>,
    ws: &mut Workspace<B>,
    rows: usize,
    pending: Option<Option<&B::Buf<f16>>>,
) -> Result<()> {
    let norm_p = ops::norm_params(rows, cfg.d_model, cfg.norm_eps, norm_kind(cfg), false)?;
    be.add_norm(
        &norm_p,
        NormBufs {
            x: &mut ws.x,
            y: pending.map(|_| &ws.y),
            y_bias: pending.flatten(),
            w: &model.final_norm_w,
            b: model.final_norm_b.as_ref(),
            x_save: Some(&mut ws.final_x),
            h: &mut ws.h,
            mean: Some(&mut ws.final_mean),
            rstd: &mut ws.final_rstd,
        },
    )
}

/// Where a layer's attention reads its keys and values.
enum Attend<'a, B: Backend> {
    /// The fused prefix attention (`kernels/prefix_attention.cu`) over the layer's prefix bank
    /// in `ws.bank` and the batch's own keys: training and the loss.
    Batch(&'a AttnShape),
    /// A decode step over the layer's KV cache.
    Cache(CacheStep<'a, B>),
}

/// One layer's part of a decode step: the prefill runs the fused kernel (`prefill`: the bank is
/// in `ws.bank`, `ws.prefix_index` is negative for requests without a prefix, `ws.valid_len`
/// holds the prompt lengths), later steps the decode kernel (`ws.prefix_index` = cached entries,
/// `ws.valid_len` = new tokens); then the new keys and values are appended to the cache.
struct CacheStep<'a, B: Backend> {
    shape: &'a DecodeShape,
    prefill: Option<&'a AttnShape>,
    k: &'a mut B::Buf<f16>,
    v: &'a mut B::Buf<f16>,
    /// Cache row (`[B·Hkv·capacity]` rows of D) of each new key/value row.
    append_idx: &'a B::Buf<i32>,
}

impl<B: Backend> Attend<'_, B> {
    fn batch_seq(&self) -> (usize, usize) {
        match self {
            Attend::Batch(s) => (s.batch, s.seq),
            Attend::Cache(c) => (c.shape.batch, c.shape.n_new),
        }
    }
}

/// One layer's forward from the residual stream `ws.x` (first adding the pending branch output
/// `ws.y` with its bias, when `pending`), keeping its activations in saved slot `slot` (the
/// block inputs only for [`Attend::Batch`], which a backward may follow) and, with
/// `keep_input`, the block input in `ws.layer_inputs[l]` (for recomputation). Leaves the MLP's
/// output (bias not added) in `ws.y`.
#[allow(clippy::too_many_arguments)]
fn layer_forward<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    lw: &DevLayer<B>,
    ws: &mut Workspace<B>,
    rope: Option<&RopeTables<B>>,
    attend: Attend<'_, B>,
    layer: usize,
    slot: usize,
    pending: Option<Option<&B::Buf<f16>>>,
    keep_input: bool,
) -> Result<()> {
    let (b, t) = attend.batch_seq();
    let keep_x = matches!(attend, Attend::Batch(_));
    let rows = b * t;
    let (d, hd) = (cfg.d_model, cfg.head_dim);
    let (q_dim, kv_dim) = (cfg.q_dim(), cfg.kv_dim());
    let qkv_w = q_dim + 2 * kv_dim;
    let kind = norm_kind(cfg);
    let norm_p = ops::norm_params(rows, d, cfg.norm_eps, kind, false)?;
    let use_rope = cfg.arch == Arch::Llama;
    let n_pos = rope.map_or(0, |r| r.n_positions);
    let sv = &mut ws.saved[slot];
    // Attention block.
    be.add_norm(
        &norm_p,
        NormBufs {
            x: &mut ws.x,
            y: pending.map(|_| &ws.y),
            y_bias: pending.flatten(),
            w: &lw.attn_norm_w,
            b: lw.attn_norm_b.as_ref(),
            x_save: keep_x.then_some(&mut sv.attn_x),
            h: &mut ws.h,
            mean: Some(&mut sv.attn_mean),
            rstd: &mut sv.attn_rstd,
        },
    )?;
    if keep_input {
        // Recomputation: the block input (after the add) is all this layer keeps.
        be.copy(
            "keeping a layer input",
            &ws.x,
            0..rows * d,
            &mut ws.layer_inputs[layer],
            0,
        )?;
    }
    be.gemm_a_bt(rows, qkv_w, d, &ws.h, &lw.wqkv, &mut ws.qkv)?;
    let parts: [(usize, usize, bool, &mut B::Buf<f16>); 3] = [
        (0, cfg.n_heads, use_rope, &mut sv.q),
        (q_dim, cfg.n_kv_heads, use_rope, &mut sv.k),
        (q_dim + kv_dim, cfg.n_kv_heads, false, &mut sv.v),
    ];
    for (i, (col, heads, rot, dst)) in parts.into_iter().enumerate() {
        let hp = ops::heads_params(b, t, heads, hd, qkv_w, col, rot, n_pos)?;
        let bias = lw.bqkv.as_ref().map(|bs| &bs[i]);
        let rope_bufs = rot.then(|| {
            let r = rope.expect("RoPE tables");
            RopeBufs {
                pos_offset: &ws.pos_offset,
                cos: &r.cos,
                sin: &r.sin,
            }
        });
        be.rows_to_heads(&hp, &ws.qkv, bias, rope_bufs, dst)?;
    }
    let (bk, bv) = &ws.bank[layer];
    let fused = |s: &AttnShape, o: &mut B::Buf<f16>, lse: &mut B::Buf<f32>| {
        let inputs = AttnBufs {
            q: &sv.q,
            k: &sv.k,
            v: &sv.v,
            prefix_k: bk,
            prefix_v: bv,
            prefix_index: &ws.prefix_index,
            valid_len: &ws.valid_len,
        };
        be.attn_fwd(s, attn_scale(cfg), inputs, o, lse)
    };
    match attend {
        Attend::Batch(s) => fused(s, &mut sv.o, &mut sv.lse)?,
        Attend::Cache(c) => {
            match c.prefill {
                Some(s) => fused(s, &mut sv.o, &mut sv.lse)?,
                None => be.decode_attn(
                    c.shape,
                    attn_scale(cfg),
                    DecodeBufs {
                        q: &sv.q,
                        k_new: &sv.k,
                        v_new: &sv.v,
                        cache_k: c.k,
                        cache_v: c.v,
                    },
                    &ws.prefix_index,
                    &ws.valid_len,
                    &mut sv.o,
                )?,
            }
            let ap = ops::rows_params(b * c.shape.kv_heads * t, hd)?;
            let cache_rows = b * c.shape.kv_heads * c.shape.capacity;
            be.scatter_rows(&ap, cache_rows, &sv.k, c.append_idx, c.k)?;
            be.scatter_rows(&ap, cache_rows, &sv.v, c.append_idx, c.v)?;
        }
    }
    let op = ops::heads_params(b, t, cfg.n_heads, hd, q_dim, 0, false, 0)?;
    be.heads_to_rows(&op, &sv.o, None, &mut ws.o_rows)?;
    be.gemm_a_bt(rows, d, q_dim, &ws.o_rows, &lw.wo, &mut ws.y)?;

    // MLP block.
    be.add_norm(
        &norm_p,
        NormBufs {
            x: &mut ws.x,
            y: Some(&ws.y),
            y_bias: lw.bo.as_ref(),
            w: &lw.mlp_norm_w,
            b: lw.mlp_norm_b.as_ref(),
            x_save: keep_x.then_some(&mut sv.mlp_x),
            h: &mut ws.h,
            mean: Some(&mut sv.mlp_mean),
            rstd: &mut sv.mlp_rstd,
        },
    )?;
    let act_p = ops::act_params(rows, cfg.d_ff)?;
    match cfg.arch {
        Arch::Gpt2 => {
            be.gemm_a_bt(rows, cfg.d_ff, d, &ws.h, &lw.w_in, &mut sv.a)?;
            be.gelu_fwd(&act_p, &mut sv.a, lw.b_in.as_ref(), &mut ws.act)?;
        }
        Arch::Llama => {
            be.gemm_a_bt(rows, 2 * cfg.d_ff, d, &ws.h, &lw.w_in, &mut sv.a)?;
            be.swiglu_fwd(&act_p, &sv.a, &mut ws.act)?;
        }
    }
    be.gemm_a_bt(rows, d, cfg.d_ff, &ws.act, &lw.w_out, &mut ws.y)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// KV-cache decoding.

/// Cache entries allocated after the prefill for the tokens still to come (per sequence), unless
/// [`ModelEngine::set_decode_headroom`] says otherwise; the cache grows past it when needed.
const DECODE_HEADROOM: usize = 256;

/// Decoding state of [`ModelEngine`]: per layer, the device-side keys (after RoPE) and values
/// `[B, Hkv, capacity, D]`, whose first entries of each sequence are its prefix, then its tokens
/// so far. Allocated at the first [`Engine::decode`] call (the prefill), for the longest prefix
/// and prompt plus the engine's headroom. [`DecodeCache::reorder`] is recorded on the host and
/// applied on the device (a row gather) at the next decode call.
struct KvDecodeCache<B: Backend> {
    /// The bank until the prefill copies each sequence's prefix into the cache.
    bank: Option<PrefixBank<f32>>,
    /// Per sequence: its prefix (meaningful until the prefill), prefix entries, tokens so far.
    index: Vec<Option<usize>>,
    prefix_len: Vec<usize>,
    tokens: Vec<usize>,
    /// Per sequence, the position convention.
    positions: Vec<Positions>,
    /// Allocated at the prefill: entries per (sequence, kv head).
    capacity: usize,
    k: Vec<B::Buf<f16>>,
    v: Vec<B::Buf<f16>>,
    /// Device rows of the current sequences (a reorder not yet applied), `None` when in order.
    pending: Option<Vec<usize>>,
    /// Sequences in the device buffers (before `pending`).
    dev_batch: usize,
}

impl<B: Backend> KvDecodeCache<B> {
    fn allocated(&self) -> bool {
        !self.k.is_empty()
    }
}

impl<B: Backend + 'static> DecodeCache for KvDecodeCache<B>
where
    B::Buf<f16>: Send,
{
    fn batch(&self) -> usize {
        self.tokens.len()
    }

    fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        let n = self.tokens.len();
        if let Some(&r) = rows.iter().find(|&&r| r >= n) {
            bail!("reorder: row {r} of a cache of {n} sequences");
        }
        let pick = |v: &Vec<usize>| rows.iter().map(|&r| v[r]).collect::<Vec<_>>();
        self.prefix_len = pick(&self.prefix_len);
        self.tokens = pick(&self.tokens);
        self.positions = rows.iter().map(|&r| self.positions[r]).collect();
        self.index = rows.iter().map(|&r| self.index[r]).collect();
        if self.allocated() {
            let cur: Vec<usize> = self
                .pending
                .take()
                .unwrap_or_else(|| (0..self.dev_batch).collect());
            self.pending = Some(rows.iter().map(|&r| cur[r]).collect());
        }
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl<B: Backend> ModelEngine<B> {
    /// Cache entries (per sequence) allocated after the prefill of a decode session for the
    /// tokens to come; a session that outgrows them doubles the cache.
    pub fn set_decode_headroom(&mut self, tokens: usize) {
        self.decode_headroom = tokens;
    }

    /// Allocates the cache for the prefill `n_new` and copies each sequence's prefix into it.
    fn alloc_kv_cache(&mut self, cache: &mut KvDecodeCache<B>, n_new: &[usize]) -> Result<()> {
        let cfg = &self.cfg;
        let (hkv, hd) = (cfg.n_kv_heads, cfg.head_dim);
        let b = cache.tokens.len();
        let t_max = n_new.iter().copied().max().unwrap_or(0);
        let p_max = cache.prefix_len.iter().copied().max().unwrap_or(0);
        let mut cap = p_max + t_max + self.decode_headroom;
        if cfg.arch == Arch::Gpt2 {
            // No sequence can outgrow the learned positions (plus a prefix from zero).
            cap = cap.min(p_max + cfg.max_positions + t_max);
        }
        let layer = b * hkv * cap * hd;
        let mut k = Vec::with_capacity(cfg.n_layers);
        let mut v = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let what = |kv: &str| {
                format!("layer {l} KV cache {kv} ({b} sequences × {cap} entries; fewer sequences or a smaller headroom need less)")
            };
            let mut kb = self.be.alloc::<f16>(&what("keys"), layer)?;
            let mut vb = self.be.alloc::<f16>(&what("values"), layer)?;
            if let Some(bank) = cache.bank.as_ref().filter(|p| p.len > 0) {
                let per = bank.prefix_len_elems();
                let p = bank.len;
                let mut hk = vec![f16::ZERO; layer];
                let mut hv = vec![f16::ZERO; layer];
                for (s, idx) in cache.index.iter().enumerate() {
                    let Some(i) = *idx else { continue };
                    for h in 0..hkv {
                        let src = i * per + h * p * hd;
                        let dst = (s * hkv + h) * cap * hd;
                        for e in 0..p * hd {
                            hk[dst + e] = f16::from_f32(bank.k[l][src + e]);
                            hv[dst + e] = f16::from_f32(bank.v[l][src + e]);
                        }
                    }
                }
                self.be
                    .write("uploading prefix keys into the KV cache", &hk, &mut kb)?;
                self.be
                    .write("uploading prefix values into the KV cache", &hv, &mut vb)?;
            }
            k.push(kb);
            v.push(vb);
        }
        cache.k = k;
        cache.v = v;
        cache.capacity = cap;
        cache.dev_batch = b;
        cache.bank = None;
        Ok(())
    }

    /// Applies a pending reorder: gathers the cache rows on the device.
    fn apply_reorder(&mut self, cache: &mut KvDecodeCache<B>) -> Result<()> {
        let Some(rows) = cache.pending.take() else {
            return Ok(());
        };
        let cfg = &self.cfg;
        let row = cfg.n_kv_heads * cache.capacity * cfg.head_dim;
        let n = rows.len();
        let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let dev_idx = upload(&self.be, "uploading reorder rows", &idx)?;
        let rp = ops::rows_params(n, row)?;
        for l in 0..cfg.n_layers {
            for buf in [&mut cache.k[l], &mut cache.v[l]] {
                let mut dst = self
                    .be
                    .alloc::<f16>("KV cache (reordered)", n.max(1) * row)?;
                self.be
                    .gather_rows(&rp, cache.dev_batch, buf, &dev_idx, &mut dst)?;
                *buf = dst;
            }
        }
        cache.dev_batch = n;
        Ok(())
    }

    /// Grows the cache to `new_cap` entries per (sequence, kv head), keeping its content (one
    /// row gather per buffer; the entries past the old capacity are left undefined).
    fn grow_kv_cache(&mut self, cache: &mut KvDecodeCache<B>, new_cap: usize) -> Result<()> {
        let cfg = &self.cfg;
        let (old, n_seq) = (cache.capacity, cache.dev_batch * cfg.n_kv_heads);
        let idx: Vec<i32> = (0..n_seq * new_cap)
            .map(|r| {
                let (sh, i) = (r / new_cap, r % new_cap);
                (sh * old + i.min(old - 1)) as i32
            })
            .collect();
        let dev_idx = upload(&self.be, "uploading KV-cache growth rows", &idx)?;
        let rp = ops::rows_params(n_seq * new_cap, cfg.head_dim)?;
        for l in 0..cfg.n_layers {
            for buf in [&mut cache.k[l], &mut cache.v[l]] {
                let what = format!(
                    "layer {l} KV cache grown to {new_cap} entries for {} sequences (fewer \
                     sequences or fewer new tokens need less)",
                    cache.dev_batch
                );
                let mut dst = self
                    .be
                    .alloc::<f16>(&what, n_seq * new_cap * cfg.head_dim)?;
                self.be
                    .gather_rows(&rp, n_seq * old, buf, &dev_idx, &mut dst)?;
                *buf = dst;
            }
        }
        cache.capacity = new_cap;
        Ok(())
    }

    /// One decode step with the KV cache (see [`KvDecodeCache`]).
    fn kv_decode(&mut self, cache: &mut KvDecodeCache<B>, tokens: &[Vec<u32>]) -> Result<Vec<f32>> {
        let cfg = self.cfg.clone();
        let (hd, hkv) = (cfg.head_dim, cfg.n_kv_heads);
        let b = cache.tokens.len();
        ensure!(
            tokens.len() == b,
            "decode: {} token lists for {b} sequences",
            tokens.len()
        );
        if b == 0 {
            return Ok(Vec::new());
        }
        let n_new: Vec<usize> = tokens.iter().map(Vec::len).collect();
        let next_pos: Vec<usize> = (0..b)
            .map(|s| match cache.positions[s] {
                Positions::AfterPrefix => cache.prefix_len[s] + cache.tokens[s],
                Positions::FromZero => cache.tokens[s],
            })
            .collect();
        let mut max_pos = 0;
        for (s, t) in tokens.iter().enumerate() {
            ensure!(!t.is_empty(), "decode: sequence {s} has no new token");
            if let Some(&bad) = t.iter().find(|&&x| x as usize >= cfg.vocab_size) {
                bail!(
                    "decode: token id {bad} is outside the vocabulary of {}",
                    cfg.vocab_size
                );
            }
            let needed = next_pos[s] + t.len();
            if cfg.arch == Arch::Gpt2 && needed > cfg.max_positions {
                bail!(
                    "GPT-2 has {} learned positions; sequence {s} would need {needed}",
                    cfg.max_positions
                );
            }
            max_pos = max_pos.max(needed);
        }
        // The prefill (the first call) runs the fused kernel over the bank, which the cache's
        // allocation then drops (each sequence's prefix is copied into its cache).
        let prefill_bank = if cache.allocated() {
            None
        } else {
            let bank = cache.bank.clone();
            self.alloc_kv_cache(cache, &n_new)?;
            Some(bank)
        };
        self.apply_reorder(cache)?;
        let t = n_new.iter().copied().max().unwrap_or(1);
        let past: Vec<usize> = (0..b)
            .map(|s| cache.prefix_len[s] + cache.tokens[s])
            .collect();
        let needed = (0..b).map(|s| past[s] + t).max().unwrap_or(0);
        if needed > cache.capacity {
            let grown = needed.max(2 * cache.capacity);
            self.grow_kv_cache(cache, grown)?;
        }
        let cap = cache.capacity;
        let prefill_shape = prefill_bank.as_ref().map(|bank| {
            let (p, n) = bank.as_ref().map_or((0, 0), |k| (k.len, k.n_prefixes));
            AttnShape {
                batch: b,
                q_heads: cfg.n_heads,
                kv_heads: hkv,
                seq: t,
                prefix: p,
                head_dim: hd,
                n_prefixes: n,
            }
        });
        let shape = CallShape {
            batch: b,
            seq: t,
            prefix: prefill_shape.map_or(0, |s| s.prefix),
            n_prefixes: prefill_shape.map_or(0, |s| s.n_prefixes),
        };
        self.prepare(&shape, false, max_pos)?;
        let Self {
            be,
            model,
            ws,
            rope,
            ..
        } = self;
        let ws = ws.as_mut().expect("prepared workspace");
        let rows = b * t;
        let mut toks = vec![0i32; rows];
        for (s, tk) in tokens.iter().enumerate() {
            for (i, &x) in tk.iter().enumerate() {
                toks[s * t + i] = x as i32;
            }
        }
        let offsets: Vec<i32> = next_pos.iter().map(|&p| p as i32).collect();
        let past_i: Vec<i32> = past.iter().map(|&x| x as i32).collect();
        let new_i: Vec<i32> = n_new.iter().map(|&x| x as i32).collect();
        be.write("uploading token ids", &toks, &mut ws.tokens)?;
        be.write("uploading position offsets", &offsets, &mut ws.pos_offset)?;
        be.write("uploading new-token counts", &new_i, &mut ws.valid_len)?;
        match (
            &prefill_shape,
            prefill_bank.as_ref().and_then(Option::as_ref),
        ) {
            (Some(s), Some(bank)) if s.prefix > 0 => {
                // The fused kernel: each sequence's prefix index, -1 for none.
                let index: Vec<usize> = cache
                    .index
                    .iter()
                    .map(|i| i.unwrap_or(attn::NO_PREFIX))
                    .collect();
                let (pi, _) = attn::index_arrays(s, &index, &n_new)?;
                be.write("uploading prefix indices", &pi, &mut ws.prefix_index)?;
                for l in 0..cfg.n_layers {
                    let (bk, bv) = &mut ws.bank[l];
                    be.write("uploading prefix keys", &to_f16(&bank.k[l]), bk)?;
                    be.write("uploading prefix values", &to_f16(&bank.v[l]), bv)?;
                }
            }
            (Some(_), _) => be.write(
                "uploading prefix indices",
                &vec![0; b],
                &mut ws.prefix_index,
            )?,
            (None, _) => be.write("uploading cache lengths", &past_i, &mut ws.prefix_index)?,
        }
        // Where each new key/value row goes in the cache (padding rows land past the sequence's
        // length, where they are never read and later overwritten).
        let mut append = Vec::with_capacity(b * hkv * t);
        for (s, &p) in past.iter().enumerate() {
            for h in 0..hkv {
                for i in 0..t {
                    append.push(((s * hkv + h) * cap + p + i) as i32);
                }
            }
        }
        // (After an error inside the layers the buffer is not put back: allocated again.)
        let mut append_idx = match ws.append_idx.take() {
            Some(buf) => buf,
            None => be.alloc("cache slots", append.len())?,
        };
        be.write("uploading cache slots", &append, &mut append_idx)?;
        let dshape = DecodeShape {
            batch: b,
            q_heads: cfg.n_heads,
            kv_heads: hkv,
            head_dim: hd,
            n_new: t,
            capacity: cap,
        };
        crate::cuda::decode::check_lengths(&dshape, &past_i, &new_i)?;

        embed(be, &cfg, model, b, t, ws)?;
        let mut pending: Option<Option<&B::Buf<f16>>> = None;
        for (l, lw) in model.layers.iter().enumerate() {
            let attend = Attend::Cache(CacheStep {
                shape: &dshape,
                prefill: prefill_shape.as_ref(),
                k: &mut cache.k[l],
                v: &mut cache.v[l],
                append_idx: &append_idx,
            });
            layer_forward(
                be,
                &cfg,
                lw,
                ws,
                rope.as_ref(),
                attend,
                l,
                0,
                pending,
                false,
            )?;
            pending = Some(lw.b_out.as_ref());
        }
        ws.append_idx = Some(append_idx);
        final_norm(be, &cfg, model, ws, rows, pending)?;
        for (s, &n) in n_new.iter().enumerate() {
            cache.tokens[s] += n;
        }
        let last: Vec<usize> = (0..b).map(|s| s * t + n_new[s] - 1).collect();
        let logits = self.row_logits(&last, rows)?;
        self.note_memory();
        Ok(logits)
    }
}

impl<B: Backend + 'static> ModelEngine<B> {
    /// Continuous batching: appends the sequences of `other` (a decode cache of this engine,
    /// past its prefill) after those of `cache` (likewise). The joined buffers have the larger
    /// capacity of the two; each source is scattered into them on the device.
    pub fn join_decode(
        &mut self,
        cache: &mut dyn DecodeCache,
        mut other: Box<dyn DecodeCache>,
    ) -> Result<()> {
        let Some(b) = other.as_any_mut().downcast_mut::<KvDecodeCache<B>>() else {
            bail!("join_decode: the cache to join was made by another engine");
        };
        let Some(a) = cache.as_any_mut().downcast_mut::<KvDecodeCache<B>>() else {
            bail!("join_decode: this cache was made by another engine");
        };
        ensure!(
            a.allocated() && b.allocated(),
            "join_decode: both caches must be past their prefill (a first decode call)"
        );
        self.apply_reorder(a)?;
        self.apply_reorder(b)?;
        let cfg = &self.cfg;
        let (hkv, hd) = (cfg.n_kv_heads, cfg.head_dim);
        let cap = a.capacity.max(b.capacity);
        let n = a.dev_batch + b.dev_batch;
        // Destination row of every source row (sequence s, kv head h, entry i), sequences of
        // `b` after those of `a`.
        let dest = |c: &KvDecodeCache<B>, first_seq: usize| -> Vec<i32> {
            (0..c.dev_batch * hkv)
                .flat_map(|sh| (0..c.capacity).map(move |i| (first_seq * hkv + sh) * cap + i))
                .map(|r| r as i32)
                .collect()
        };
        let ia = upload(&self.be, "uploading KV-cache join rows", &dest(a, 0))?;
        let ib = upload(
            &self.be,
            "uploading KV-cache join rows",
            &dest(b, a.dev_batch),
        )?;
        let pa = ops::rows_params(a.dev_batch * hkv * a.capacity, hd)?;
        let pb = ops::rows_params(b.dev_batch * hkv * b.capacity, hd)?;
        let dst_rows = n * hkv * cap;
        for l in 0..cfg.n_layers {
            for (dst_buf, src_b) in [(&mut a.k[l], &b.k[l]), (&mut a.v[l], &b.v[l])] {
                let what = format!(
                    "layer {l} KV cache joined to {n} sequences × {cap} entries (a smaller \
                     --max-batch or context needs less)"
                );
                let mut dst = self.be.alloc::<f16>(&what, dst_rows * hd)?;
                self.be
                    .scatter_rows(&pa, dst_rows, dst_buf, &ia, &mut dst)?;
                self.be.scatter_rows(&pb, dst_rows, src_b, &ib, &mut dst)?;
                *dst_buf = dst;
            }
        }
        a.capacity = cap;
        a.dev_batch = n;
        a.index.extend(b.index.iter().copied());
        a.prefix_len.extend(b.prefix_len.iter().copied());
        a.tokens.extend(b.tokens.iter().copied());
        a.positions.extend(b.positions.iter().copied());
        self.note_memory();
        Ok(())
    }

    /// Sequences of a decode cache of this engine that hold a prefix (each a copy of it in its
    /// own cache rows); `None` when the cache is another engine's.
    pub fn decode_prefix_copies(cache: &mut dyn DecodeCache) -> Option<(usize, usize)> {
        let c = cache.as_any_mut().downcast_mut::<KvDecodeCache<B>>()?;
        let with = c.prefix_len.iter().filter(|&&p| p > 0).count();
        Some((with, c.prefix_len.iter().sum()))
    }
}
