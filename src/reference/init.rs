//! Initialising a prefix from real words (Li & Liang §7.4): the frozen model's per-layer keys
//! and values of a text (keys after RoPE, as a cache holds them) become the prefix, so
//! P = the number of text tokens.
//!
//! The text is run alone from position 0, so its keys carry RoPE angles 0..P−1; used as a prefix
//! with real tokens at P, P+1, … (the after-prefix convention) the relative positions are those
//! the model saw when the text preceded the input.

use anyhow::{ensure, Context, Result};

use super::model::{check_positions, layer_kv, Batch, Positions, RunOptions};
use crate::model::ModelWeights;
use crate::prefix::PrefixBank;
use crate::real::Real;

/// A one-prefix bank holding the frozen model's keys (post-RoPE) and values of `tokens`
/// (e.g. the tokenized "summarize:" or "table-to-text:"); P = `tokens.len()`.
pub fn init_from_text<T: Real>(model: &ModelWeights<T>, tokens: &[u32]) -> Result<PrefixBank<T>> {
    let cfg = &model.config;
    ensure!(
        !tokens.is_empty(),
        "initializing a prefix from text needs at least one token"
    );
    let n = tokens.len();
    let batch = Batch {
        batch: 1,
        seq: n,
        tokens: tokens.to_vec(),
        labels: vec![None; n],
        valid_len: vec![n],
        prefix_index: vec![0],
    };
    batch
        .check(cfg, 0)
        .context("initializing a prefix from text")?;
    check_positions(cfg, n, 0, Positions::FromZero).context("initializing a prefix from text")?;
    let kv = layer_kv(model, None, &batch, &RunOptions::default());
    Ok(bank_from_kv(&kv, 0, n, n, cfg.n_kv_heads, cfg.head_dim))
}

/// A one-prefix bank from per-layer `(K, V)`, each `[B, kv_heads, seq_len, head_dim]`, taking the
/// first `n_used` positions of sequence `batch_index`.
pub fn bank_from_kv<T: Real>(
    kv: &[(Vec<T>, Vec<T>)],
    batch_index: usize,
    seq_len: usize,
    n_used: usize,
    kv_heads: usize,
    head_dim: usize,
) -> PrefixBank<T> {
    assert!(
        n_used >= 1 && n_used <= seq_len,
        "bank_from_kv: using {n_used} of {seq_len} positions"
    );
    let mut bank = PrefixBank::zeros(1, kv.len(), kv_heads, n_used, head_dim);
    let per_seq = kv_heads * seq_len * head_dim;
    for (l, (k, v)) in kv.iter().enumerate() {
        for (src, dst) in [(k, &mut bank.k[l]), (v, &mut bank.v[l])] {
            assert!(
                src.len() % per_seq == 0 && (batch_index + 1) * per_seq <= src.len(),
                "bank_from_kv: layer {l} has {} elements, not [B > {batch_index}, {kv_heads}, \
                 {seq_len}, {head_dim}]",
                src.len()
            );
            for h in 0..kv_heads {
                let from = ((batch_index * kv_heads + h) * seq_len) * head_dim;
                let to = h * n_used * head_dim;
                let n = n_used * head_dim;
                dst[to..to + n].copy_from_slice(&src[from..from + n]);
            }
        }
    }
    bank
}
