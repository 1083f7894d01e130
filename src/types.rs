//! The device-neutral types every engine shares: the shape of a prefix-attention call, a batch
//! of token sequences with targets, how a run places its positions, a batch's loss, and the
//! RoPE tables. The CPU
//! reference (`reference/`) and the GPU engine (`cuda/`) both use them and never import each
//! other (`tests/layering.rs` holds that). `reference::attention` and `reference::model`
//! re-export them under their old paths.

use anyhow::{bail, ensure, Result};

use crate::model::config::{Arch, ModelConfig};
use crate::real::Real;

/// Sizes of one prefix-attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Batch size (sequences).
    pub batch: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads; divides `q_heads`.
    pub kv_heads: usize,
    /// Sequence length (padded).
    pub seq: usize,
    /// Prefix length P (may be 0).
    pub prefix: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Number of prefixes in the bank.
    pub n_prefixes: usize,
}

impl AttnShape {
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }
    /// Elements of Q or O: `B·Hq·T·D`.
    pub fn q_len(&self) -> usize {
        self.batch * self.q_heads * self.seq * self.head_dim
    }
    /// Elements of sequence K or V: `B·Hkv·T·D`.
    pub fn kv_len(&self) -> usize {
        self.batch * self.kv_heads * self.seq * self.head_dim
    }
    /// Elements of the prefix bank for K or V: `n_prefixes·Hkv·P·D`.
    pub fn bank_len(&self) -> usize {
        self.n_prefixes * self.kv_heads * self.prefix * self.head_dim
    }
    /// Elements of the LSE: `B·Hq·T`.
    pub fn lse_len(&self) -> usize {
        self.batch * self.q_heads * self.seq
    }
}

/// Where the real tokens' positions start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Positions {
    /// Real tokens at `P, P+1, …` after a prefix of length P (HF + PEFT).
    #[default]
    AfterPrefix,
    /// Real tokens at `0, 1, …` whatever the prefix length.
    FromZero,
}

/// A right-padded batch of token sequences with their targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub batch: usize,
    /// Padded length T.
    pub seq: usize,
    /// `[B, T]`, padded.
    pub tokens: Vec<u32>,
    /// `[B, T]`: `labels[b, t]` is the token to predict from position `t`; `None`: not a target.
    pub labels: Vec<Option<u32>>,
    /// `[B]`, each ≤ T.
    pub valid_len: Vec<usize>,
    /// `[B]`: which prefix of the bank each sequence uses.
    pub prefix_index: Vec<usize>,
}

impl Batch {
    /// Builds a batch from `(input, target)` token pairs: each sequence is
    /// `input ++ target (++ eos)`, right-padded with `pad_id`; the positions that predict a target
    /// token (or the eos) carry labels, the input's do not (with an empty input the first target
    /// token has no position before it and is not predicted). All sequences use prefix 0.
    pub fn from_pairs<I: AsRef<[u32]>, O: AsRef<[u32]>>(
        pairs: &[(I, O)],
        eos: Option<u32>,
        pad_id: u32,
    ) -> Batch {
        let seqs: Vec<(Vec<u32>, usize)> = pairs
            .iter()
            .map(|(i, o)| {
                let (i, o) = (i.as_ref(), o.as_ref());
                let mut s = Vec::with_capacity(i.len() + o.len() + 1);
                s.extend_from_slice(i);
                s.extend_from_slice(o);
                s.extend(eos);
                (s, i.len())
            })
            .collect();
        let batch = seqs.len();
        let seq = seqs.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
        let mut tokens = vec![pad_id; batch * seq];
        let mut labels = vec![None; batch * seq];
        let mut valid_len = Vec::with_capacity(batch);
        for (b, (s, n_in)) in seqs.iter().enumerate() {
            tokens[b * seq..b * seq + s.len()].copy_from_slice(s);
            // Position t predicts token t+1: a label wherever token t+1 belongs to the target.
            for t in n_in.saturating_sub(1)..s.len().saturating_sub(1) {
                if t + 1 >= *n_in {
                    labels[b * seq + t] = Some(s[t + 1]);
                }
            }
            valid_len.push(s.len());
        }
        Batch {
            batch,
            seq,
            tokens,
            labels,
            valid_len,
            prefix_index: vec![0; batch],
        }
    }

    /// The same batch with the given prefix per sequence.
    pub fn with_prefix_index(mut self, prefix_index: Vec<usize>) -> Batch {
        self.prefix_index = prefix_index;
        self
    }

    /// Token rows B·T.
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }

    /// Whether row `r` (= b·T + t) is a real token (t < valid_len[b]).
    pub fn is_valid_row(&self, r: usize) -> bool {
        r % self.seq < self.valid_len[r / self.seq]
    }

    /// Target tokens per sequence (labels on valid rows only).
    pub fn n_targets(&self) -> Vec<usize> {
        (0..self.batch)
            .map(|b| {
                self.labels[b * self.seq..b * self.seq + self.valid_len[b]]
                    .iter()
                    .filter(|l| l.is_some())
                    .count()
            })
            .collect()
    }

    /// Checks the sizes and ids against a model and a bank of `n_prefixes` prefixes.
    pub fn check(&self, cfg: &ModelConfig, n_prefixes: usize) -> Result<()> {
        let rows = self.batch * self.seq;
        ensure!(
            self.tokens.len() == rows,
            "batch: {} tokens, expected B·T = {rows}",
            self.tokens.len()
        );
        ensure!(
            self.labels.len() == rows,
            "batch: {} labels, expected B·T = {rows}",
            self.labels.len()
        );
        ensure!(
            self.valid_len.len() == self.batch,
            "batch: {} valid lengths for {} sequences",
            self.valid_len.len(),
            self.batch
        );
        ensure!(
            self.prefix_index.len() == self.batch,
            "batch: {} prefix indices for {} sequences",
            self.prefix_index.len(),
            self.batch
        );
        for b in 0..self.batch {
            ensure!(
                self.valid_len[b] <= self.seq,
                "batch: sequence {b} has valid length {} > T = {}",
                self.valid_len[b],
                self.seq
            );
            ensure!(
                n_prefixes == 0 || self.prefix_index[b] < n_prefixes,
                "batch: sequence {b} uses prefix {} but the bank has {n_prefixes}",
                self.prefix_index[b]
            );
        }
        if let Some(t) = self.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            bail!(
                "batch: token id {t} is outside the vocabulary of {}",
                cfg.vocab_size
            );
        }
        if let Some(t) = self
            .labels
            .iter()
            .flatten()
            .find(|&&t| t as usize >= cfg.vocab_size)
        {
            bail!(
                "batch: label {t} is outside the vocabulary of {}",
                cfg.vocab_size
            );
        }
        Ok(())
    }
}

/// How a run places the real tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunOptions {
    pub positions: Positions,
}

/// Loss of a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct LossOutput<T> {
    /// `[B]`: summed cross-entropy over each sequence's targets.
    pub loss_sum: Vec<T>,
    /// `[B]`: target tokens per sequence.
    pub n_targets: Vec<usize>,
    /// `Σ loss_sum / Σ n_targets` (HF's convention); 0 when the batch has no target.
    pub mean_loss: T,
}

/// Position of the first real token.
pub fn position_offset(prefix_len: usize, positions: Positions) -> usize {
    match positions {
        Positions::AfterPrefix => prefix_len,
        Positions::FromZero => 0,
    }
}

/// Checks that every position of a `seq`-token sequence after a prefix of `prefix_len` fits the
/// model (GPT-2's learned table has `max_positions` entries; RoPE has no table).
pub fn check_positions(
    cfg: &ModelConfig,
    seq: usize,
    prefix_len: usize,
    positions: Positions,
) -> Result<()> {
    let needed = position_offset(prefix_len, positions) + seq;
    if cfg.arch == Arch::Gpt2 && needed > cfg.max_positions {
        bail!(
            "GPT-2 has {} learned positions, but {seq} tokens placed after a prefix of {prefix_len} \
             ({positions:?}) need {needed}",
            cfg.max_positions
        );
    }
    Ok(())
}

/// Cosines and sines of RoPE for a list of token positions (HF "rotate_half" convention):
/// entry `r` holds `cos/sin(pos[r]·θ^(−2i/D))` for `i < D/2`. Angles are computed in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope<T> {
    pub head_dim: usize,
    /// `[positions, D/2]`.
    pub cos: Vec<T>,
    /// `[positions, D/2]`.
    pub sin: Vec<T>,
}

impl<T: Real> Rope<T> {
    /// Tables for the given positions (one entry per token row of the batch, `[B·T]`).
    pub fn new(head_dim: usize, theta: f64, positions: &[usize]) -> Self {
        assert!(
            head_dim % 2 == 0,
            "RoPE needs an even head dimension, got {head_dim}"
        );
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &inv_freq {
                let angle = p as f64 * f;
                cos.push(T::of(angle.cos()));
                sin.push(T::of(angle.sin()));
            }
        }
        Rope { head_dim, cos, sin }
    }
}
