//! The whole frozen model on the CPU: forward (loss, logits, per-layer K/V) and the prefix-only
//! backward (the gradient of the mean loss with respect to every layer's prefix keys and values).
//!
//! Conventions:
//! - a [`Batch`] is right-padded `[B, T]`; `labels[b, t]` is the token to predict *from* position
//!   `t` (already shifted); rows at or past `valid_len[b]` are padding and never give loss;
//! - prefixes are past keys/values (HF + PEFT): the keys are used as given (post-RoPE), and real
//!   tokens sit at positions `P, P+1, …` ([`Positions::AfterPrefix`], the default) or `0, 1, …`
//!   ([`Positions::FromZero`]);
//! - the loss is HF's: the sum of token cross-entropies over the batch divided by the number of
//!   target tokens; the gradient is that mean's.
//!
//! The LM head and the cross-entropy run over target rows only, in chunks, so a `[tokens, vocab]`
//! logits matrix is never resident when only the loss or its gradient is wanted.

use anyhow::{ensure, Result};

use super::layers::{
    attention_block_backward, attention_block_forward, cross_entropy_in_place, embedding_forward,
    linear_backward, mlp_block_backward, mlp_block_forward, norm_backward, norm_forward,
    AttnBlockCache, BlockCtx, LayerPrefix, MlpCache, NormStats, Rope,
};
use super::real::{matmul, Real, Trans};
use crate::model::config::{Arch, ModelConfig, ModelWeights};
use crate::prefix::PrefixBank;

use crate::types::position_offset;
pub use crate::types::{check_positions, Batch, LossOutput, Positions, RunOptions};

/// The prefix length P of an optional bank.
fn prefix_len<T>(prefix: Option<&PrefixBank<T>>) -> usize {
    prefix.map_or(0, |p| p.len)
}

/// Checks a batch, a bank and the positions against a model: the errors the reference code
/// would otherwise panic with (engines call it first to return them as errors).
pub fn check_run<T: Real>(
    cfg: &ModelConfig,
    prefix: Option<&PrefixBank<T>>,
    batch: &Batch,
    opts: &RunOptions,
) -> Result<()> {
    let n_prefixes = match prefix {
        Some(p) if p.len > 0 => {
            ensure!(
                p.n_layers == cfg.n_layers
                    && p.kv_heads == cfg.n_kv_heads
                    && p.head_dim == cfg.head_dim,
                "the prefix is {} layers × {} kv heads × head dim {}, the model {} × {} × {}",
                p.n_layers,
                p.kv_heads,
                p.head_dim,
                cfg.n_layers,
                cfg.n_kv_heads,
                cfg.head_dim
            );
            ensure!(
                p.k.len() == p.n_layers
                    && p.v.len() == p.n_layers
                    && p.k.iter().chain(&p.v).all(|x| x.len() == p.layer_len()),
                "prefix bank: layer buffers have the wrong size"
            );
            p.n_prefixes
        }
        _ => 0,
    };
    batch.check(cfg, n_prefixes)?;
    check_positions(cfg, batch.seq, prefix_len(prefix), opts.positions)
}

/// Panics with a clear message when the batch, the bank or the positions do not fit the model.
fn validate<T: Real>(
    m: &ModelWeights<T>,
    prefix: Option<&PrefixBank<T>>,
    batch: &Batch,
    opts: &RunOptions,
) {
    if let Err(e) = check_run(&m.config, prefix, batch, opts) {
        panic!("{e:#}");
    }
}

fn layer_prefix<T>(prefix: Option<&PrefixBank<T>>, l: usize) -> LayerPrefix<'_, T> {
    match prefix {
        Some(p) if p.len > 0 => LayerPrefix {
            k: &p.k[l],
            v: &p.v[l],
            n_prefixes: p.n_prefixes,
            len: p.len,
        },
        _ => LayerPrefix::empty(),
    }
}

/// What a forward pass keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keep {
    /// Only the final hidden states.
    Nothing,
    /// Also every layer's sequence K (post-RoPE) and V.
    Kv,
    /// Everything the backward needs.
    Everything,
}

/// The forward's results and cache.
struct ForwardPass<T> {
    /// Final-norm output `[rows, d]`.
    hidden: Vec<T>,
    /// Input of the final norm and its statistics (backward only).
    final_x: Vec<T>,
    final_norm: Option<NormStats<T>>,
    /// Per layer (backward only).
    blocks: Vec<(AttnBlockCache<T>, MlpCache<T>)>,
    /// Per layer K, V `[B, Hkv, T, D]` (Keep::Kv only).
    kv: Vec<(Vec<T>, Vec<T>)>,
    /// RoPE tables of the batch (Llama).
    rope: Option<Rope<T>>,
}

fn forward_pass<T: Real>(
    m: &ModelWeights<T>,
    prefix: Option<&PrefixBank<T>>,
    batch: &Batch,
    opts: &RunOptions,
    keep: Keep,
) -> ForwardPass<T> {
    validate(m, prefix, batch, opts);
    let cfg = &m.config;
    let d = cfg.d_model;
    let offset = position_offset(prefix_len(prefix), opts.positions);
    let positions: Vec<usize> = (0..batch.rows())
        .map(|r| offset + r % batch.seq.max(1))
        .collect();
    let mut x = match (cfg.arch, m.pos_emb.as_deref()) {
        (Arch::Gpt2, Some(pe)) => {
            embedding_forward(&batch.tokens, &m.tok_emb, d, Some((pe, &positions)))
        }
        (Arch::Gpt2, None) => panic!("GPT-2 model without position embeddings"),
        (Arch::Llama, _) => embedding_forward(&batch.tokens, &m.tok_emb, d, None),
    };
    let rope =
        (cfg.arch == Arch::Llama).then(|| Rope::new(cfg.head_dim, cfg.rope_theta, &positions));
    let ctx = BlockCtx {
        cfg,
        batch: batch.batch,
        seq: batch.seq,
        valid_len: &batch.valid_len,
        prefix_index: &batch.prefix_index,
        rope: rope.as_ref(),
    };
    let mut blocks = Vec::new();
    let mut kv = Vec::new();
    for (l, lw) in m.layers.iter().enumerate() {
        if batch.rows() == 0 {
            // An empty batch: nothing to compute (and no targets, so no backward).
            if keep == Keep::Kv {
                kv.push((Vec::new(), Vec::new()));
            }
            continue;
        }
        let (y, attn_cache) = attention_block_forward(&ctx, lw, &layer_prefix(prefix, l), &x);
        let (y, mlp_cache) = mlp_block_forward(cfg, lw, &y);
        x = y;
        match keep {
            Keep::Nothing => {}
            Keep::Kv => kv.push((attn_cache.k, attn_cache.v)),
            Keep::Everything => blocks.push((attn_cache, mlp_cache)),
        }
    }
    let (hidden, final_norm) = norm_forward(
        cfg.arch,
        &x,
        &m.final_norm_w,
        m.final_norm_b.as_deref(),
        d,
        cfg.norm_eps,
    );
    let keep_all = keep == Keep::Everything;
    ForwardPass {
        hidden,
        final_x: if keep_all { x } else { Vec::new() },
        final_norm: keep_all.then_some(final_norm),
        blocks,
        kv,
        rope,
    }
}

/// Elements of one chunk of head logits (`rows × vocab`), so the full logits are never resident.
const HEAD_CHUNK_ELEMS: usize = 1 << 23;

/// LM head and cross-entropy over the target rows, in chunks. Returns the per-sequence loss
/// sums (in f64) and, when `grad_scale` is given, the gradient of `grad_scale · Σ loss` with
/// respect to the hidden states `[rows, d]` (zero on rows without a target).
fn head_loss<T: Real>(
    m: &ModelWeights<T>,
    hidden: &[T],
    batch: &Batch,
    grad_scale: Option<T>,
) -> (Vec<f64>, Option<Vec<T>>) {
    let (d, vocab) = (m.config.d_model, m.config.vocab_size);
    let head = m.head();
    let targets: Vec<(usize, u32)> = (0..batch.rows())
        .filter(|&r| batch.is_valid_row(r))
        .filter_map(|r| batch.labels[r].map(|t| (r, t)))
        .collect();
    let mut loss_sum = vec![0.0f64; batch.batch];
    let mut dh = grad_scale.map(|_| vec![T::zero(); hidden.len()]);
    let chunk = (HEAD_CHUNK_ELEMS / vocab.max(1)).max(1);
    let mut h = Vec::with_capacity(chunk.min(targets.len()) * d);
    let mut logits = Vec::with_capacity(chunk.min(targets.len()) * vocab);
    for group in targets.chunks(chunk) {
        let c = group.len();
        h.clear();
        for &(r, _) in group {
            h.extend_from_slice(&hidden[r * d..(r + 1) * d]);
        }
        logits.clear();
        logits.resize(c * vocab, T::zero());
        matmul(
            c,
            vocab,
            d,
            &h,
            Trans::No,
            head,
            Trans::Yes,
            &mut logits,
            false,
        );
        let labels: Vec<Option<u32>> = group.iter().map(|&(_, t)| Some(t)).collect();
        let losses = cross_entropy_in_place(&mut logits, &labels, vocab, grad_scale);
        for (&(r, _), l) in group.iter().zip(&losses) {
            loss_sum[r / batch.seq] += l.f64();
        }
        if let Some(dh) = dh.as_mut() {
            let dh_chunk = linear_backward(&logits, head, d, vocab);
            for (i, &(r, _)) in group.iter().enumerate() {
                dh[r * d..(r + 1) * d].copy_from_slice(&dh_chunk[i * d..(i + 1) * d]);
            }
        }
    }
    (loss_sum, dh)
}

fn loss_output<T: Real>(loss_sum: Vec<f64>, batch: &Batch) -> LossOutput<T> {
    let n_targets = batch.n_targets();
    let total: usize = n_targets.iter().sum();
    let mean = if total == 0 {
        0.0
    } else {
        loss_sum.iter().sum::<f64>() / total as f64
    };
    LossOutput {
        loss_sum: loss_sum.into_iter().map(T::of).collect(),
        n_targets,
        mean_loss: T::of(mean),
    }
}

/// The batch's loss. `prefix: None` (or a bank of length 0) runs without a prefix.
pub fn loss<T: Real>(
    m: &ModelWeights<T>,
    prefix: Option<&PrefixBank<T>>,
    batch: &Batch,
    opts: &RunOptions,
) -> LossOutput<T> {
    let fwd = forward_pass(m, prefix, batch, opts, Keep::Nothing);
    let (loss_sum, _) = head_loss(m, &fwd.hidden, batch, None);
    loss_output(loss_sum, batch)
}

/// The batch's loss and the gradient of its mean with respect to every layer's prefix keys and
/// values (same shape as `prefix`; summed over the sequences that use each prefix).
pub fn loss_and_grad<T: Real>(
    m: &ModelWeights<T>,
    prefix: &PrefixBank<T>,
    batch: &Batch,
    opts: &RunOptions,
) -> (LossOutput<T>, PrefixBank<T>) {
    let cfg = &m.config;
    let mut fwd = forward_pass(m, Some(prefix), batch, opts, Keep::Everything);
    let total: usize = batch.n_targets().iter().sum();
    let mut grad = prefix.zeros_like();
    if total == 0 {
        let (loss_sum, _) = head_loss(m, &fwd.hidden, batch, None);
        return (loss_output(loss_sum, batch), grad);
    }
    let scale = T::of(1.0 / total as f64);
    let (loss_sum, dh) = head_loss(m, &fwd.hidden, batch, Some(scale));
    let out = loss_output(loss_sum, batch);
    fwd.hidden = Vec::new();
    let dh = dh.expect("head gradient");
    let final_norm = fwd.final_norm.take().expect("final norm statistics");
    let mut dx = norm_backward(
        cfg.arch,
        &dh,
        &fwd.final_x,
        &m.final_norm_w,
        &final_norm,
        cfg.d_model,
    );
    drop(dh);
    fwd.final_x = Vec::new();
    let ctx = BlockCtx {
        cfg,
        batch: batch.batch,
        seq: batch.seq,
        valid_len: &batch.valid_len,
        prefix_index: &batch.prefix_index,
        rope: fwd.rope.as_ref(),
    };
    for l in (0..cfg.n_layers).rev() {
        let (attn_cache, mlp_cache) = fwd.blocks.pop().expect("one cache per layer");
        let lw = &m.layers[l];
        dx = mlp_block_backward(cfg, lw, &mlp_cache, &dx);
        drop(mlp_cache);
        let g = attention_block_backward(
            &ctx,
            lw,
            &layer_prefix(Some(prefix), l),
            &attn_cache,
            &dx,
            l > 0,
        );
        if prefix.len > 0 {
            grad.k[l] = g.d_prefix_k;
            grad.v[l] = g.d_prefix_v;
        }
        if let Some(next) = g.dx {
            dx = next;
        }
    }
    (out, grad)
}

/// Logits `[B, T, V]` of every row (rows past a sequence's valid length are computed from
/// padding and carry no meaning).
pub fn logits<T: Real>(
    m: &ModelWeights<T>,
    prefix: Option<&PrefixBank<T>>,
    batch: &Batch,
    opts: &RunOptions,
) -> Vec<T> {
    let fwd = forward_pass(m, prefix, batch, opts, Keep::Nothing);
    let (rows, d, vocab) = (batch.rows(), m.config.d_model, m.config.vocab_size);
    let mut out = vec![T::zero(); rows * vocab];
    matmul(
        rows,
        vocab,
        d,
        &fwd.hidden,
        Trans::No,
        m.head(),
        Trans::Yes,
        &mut out,
        false,
    );
    out
}

/// Per layer, the sequence's keys (after RoPE) and values `[B, Hkv, T, D]` — what a prefix made
/// from real words would hold (Li & Liang §7.4).
pub fn layer_kv<T: Real>(
    m: &ModelWeights<T>,
    prefix: Option<&PrefixBank<T>>,
    batch: &Batch,
    opts: &RunOptions,
) -> Vec<(Vec<T>, Vec<T>)> {
    forward_pass(m, prefix, batch, opts, Keep::Kv).kv
}
