//! KV-cache decoding on the CPU: prefill and one-token steps for a batch of sequences, each with
//! its own key/value cache, built from the layer functions of [`super::layers`].
//!
//! Cache layout, per sequence and per layer: the keys (after RoPE) and values `[Hkv, len, D]` the
//! sequence attends to are its prefix's `P` entries (an entry of a prefix bank, or nothing) then
//! the real tokens seen so far. The prefix is not copied into the sequence: every sequence using
//! it holds the same [`SharedPrefix`] (an `Arc` of the bank), so a prefix is held once however
//! many sequences use it; a sequence owns only its tokens' keys and values. A step appends new
//! tokens to each sequence (any number, at least one: a whole prompt or a chunk of one for the
//! prefill, one token when decoding) and returns the logits of each sequence's last new token.
//! Positions follow [`Positions`], per sequence: the `i`-th real token sits at `P + i`
//! (after-prefix) or `i` (from-zero).
//!
//! Sequences can join a running cache ([`KvCache::append`]) and leave it ([`KvCache::reorder`])
//! between steps: the continuous batching of `prefix-tune serve`.
//!
//! The token-wise work (norms, projections, MLP, head) runs on all sequences' new tokens at once;
//! attention runs per sequence, with the cache playing the part of the always-visible prefix in
//! [`attention::forward`] and the new tokens causal among themselves, so the math is exactly the
//! full-sequence forward's.

use std::sync::Arc;

use anyhow::{bail, ensure, Result};

use super::attention::{self, AttnInputs, AttnShape};
use super::layers::{
    embedding_forward, heads_to_rows, linear_forward, mlp_block_forward, norm_forward,
    rope_forward, rows_to_heads, Rope,
};
use super::model::Positions;
use super::real::{matmul, Real, Trans};
use crate::model::config::{Arch, ModelConfig, ModelWeights};
use crate::prefix::{check_bank, check_decode_request, PrefixBank};

/// One entry of a prefix bank, shared (not copied) by every sequence that uses it.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedPrefix<T> {
    pub bank: Arc<PrefixBank<T>>,
    /// Which prefix of the bank.
    pub index: usize,
}

impl<T: Real> SharedPrefix<T> {
    /// Layer `l`'s keys of this prefix, `[Hkv, P, D]`.
    fn k(&self, l: usize) -> &[T] {
        let per = self.bank.prefix_len_elems();
        &self.bank.k[l][self.index * per..(self.index + 1) * per]
    }

    /// Layer `l`'s values of this prefix, `[Hkv, P, D]`.
    fn v(&self, l: usize) -> &[T] {
        let per = self.bank.prefix_len_elems();
        &self.bank.v[l][self.index * per..(self.index + 1) * per]
    }

    /// Whether `other` is the same entry of the same bank (the same memory).
    pub fn same_as(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.bank, &other.bank) && self.index == other.index
    }
}

/// One sequence's cache.
#[derive(Clone, Debug, PartialEq)]
struct SeqCache<T> {
    /// The prefix in front of the tokens (shared with every sequence using it).
    prefix: Option<SharedPrefix<T>>,
    /// Prefix entries in front of the tokens (P, or 0 without a prefix).
    prefix_len: usize,
    positions: Positions,
    /// Real tokens cached so far.
    tokens: usize,
    /// Per layer, the real tokens' keys `[Hkv, tokens, D]` (after RoPE).
    k: Vec<Vec<T>>,
    /// Per layer, the real tokens' values `[Hkv, tokens, D]`.
    v: Vec<Vec<T>>,
}

impl<T: Real> SeqCache<T> {
    fn new(n_layers: usize, prefix: Option<SharedPrefix<T>>, positions: Positions) -> Self {
        SeqCache {
            prefix_len: prefix.as_ref().map_or(0, |p| p.bank.len),
            prefix,
            positions,
            tokens: 0,
            k: vec![Vec::new(); n_layers],
            v: vec![Vec::new(); n_layers],
        }
    }

    fn len(&self) -> usize {
        self.prefix_len + self.tokens
    }
}

/// How the sequences of a cache hold their prefixes (see [`KvCache::sharing`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixSharing {
    /// Sequences with a prefix.
    pub sequences_with_prefix: usize,
    /// Distinct prefixes in memory among them (one per prefix used when shared, one per
    /// sequence when copied).
    pub prefixes_held: usize,
    /// Bytes of those prefixes' keys and values.
    pub prefix_bytes: usize,
    /// Bytes of the sequences' own (token) keys and values.
    pub token_bytes: usize,
}

/// Key/value caches of a batch of sequences being decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct KvCache<T> {
    n_layers: usize,
    kv_heads: usize,
    head_dim: usize,
    seqs: Vec<SeqCache<T>>,
}

impl<T: Real> KvCache<T> {
    /// Empty caches for `prefix_index.len()` sequences: sequence `b` starts with prefix
    /// `prefix_index[b]` of `bank` (`None`: no prefix); the bank is held once for all of them.
    /// Errors when the bank does not fit the model or an index is out of range.
    pub fn new(
        cfg: &ModelConfig,
        bank: Option<&PrefixBank<T>>,
        prefix_index: &[Option<usize>],
        positions: Positions,
    ) -> Result<Self> {
        check_decode_request(cfg, bank, prefix_index)?;
        let shared = bank
            .filter(|_| prefix_index.iter().any(Option::is_some))
            .map(|b| Arc::new(b.clone()));
        let mut seqs = Vec::with_capacity(prefix_index.len());
        for (b, idx) in prefix_index.iter().enumerate() {
            let prefix = match (*idx, &shared) {
                (None, _) => None,
                (Some(i), None) => {
                    bail!("sequence {b} asks for prefix {i} but no prefix was given")
                }
                (Some(i), Some(bank)) => Some(SharedPrefix {
                    bank: bank.clone(),
                    index: i,
                }),
            };
            seqs.push(SeqCache::new(cfg.n_layers, prefix, positions));
        }
        Ok(Self::from_seqs(cfg, seqs))
    }

    /// Empty caches for sequences each with its own prefix (or none) and position convention:
    /// sequences naming the same [`SharedPrefix`] share its memory.
    pub fn with_prefixes(
        cfg: &ModelConfig,
        seqs: &[(Option<SharedPrefix<T>>, Positions)],
    ) -> Result<Self> {
        let mut out = Vec::with_capacity(seqs.len());
        for (b, (prefix, positions)) in seqs.iter().enumerate() {
            if let Some(p) = prefix {
                check_bank(cfg, &p.bank, Some(p.index), b)?;
            }
            out.push(SeqCache::new(cfg.n_layers, prefix.clone(), *positions));
        }
        Ok(Self::from_seqs(cfg, out))
    }

    fn from_seqs(cfg: &ModelConfig, seqs: Vec<SeqCache<T>>) -> Self {
        KvCache {
            n_layers: cfg.n_layers,
            kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            seqs,
        }
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.seqs.len()
    }

    /// Real tokens cached for sequence `b`.
    pub fn tokens(&self, b: usize) -> usize {
        self.seqs[b].tokens
    }

    /// Prefix entries at the front of sequence `b`'s cache.
    pub fn prefix_len(&self, b: usize) -> usize {
        self.seqs[b].prefix_len
    }

    /// The prefix sequence `b` attends to.
    pub fn prefix(&self, b: usize) -> Option<&SharedPrefix<T>> {
        self.seqs[b].prefix.as_ref()
    }

    /// Appends the sequences of `other` (made for the same model, any of them part-way through
    /// their tokens) after this cache's: sequences join a running batch.
    pub fn append(&mut self, other: KvCache<T>) -> Result<()> {
        ensure!(
            (other.n_layers, other.kv_heads, other.head_dim)
                == (self.n_layers, self.kv_heads, self.head_dim),
            "append: the caches were made for different model shapes"
        );
        self.seqs.extend(other.seqs);
        Ok(())
    }

    /// How the sequences hold their prefixes: distinct prefixes in memory (by identity, not by
    /// value) and the bytes of prefixes and of the sequences' own keys and values.
    pub fn sharing(&self) -> PrefixSharing {
        let mut held: Vec<&SharedPrefix<T>> = Vec::new();
        let mut out = PrefixSharing::default();
        let elem = std::mem::size_of::<T>();
        for s in &self.seqs {
            out.token_bytes += s.k.iter().chain(&s.v).map(Vec::len).sum::<usize>() * elem;
            if let Some(p) = &s.prefix {
                out.sequences_with_prefix += 1;
                if !held.iter().any(|h| h.same_as(p)) {
                    held.push(p);
                    out.prefix_bytes += 2 * self.n_layers * p.bank.prefix_len_elems() * elem;
                }
            }
        }
        out.prefixes_held = held.len();
        out
    }

    /// Keeps, in order, the sequences `rows` name (repeats copy a sequence's tokens, sharing its
    /// prefix: beam search's reordering; a shorter list drops finished sequences).
    pub fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        if let Some(&r) = rows.iter().find(|&&r| r >= self.seqs.len()) {
            bail!(
                "reorder: row {r} of a cache of {} sequences",
                self.seqs.len()
            );
        }
        // Move each sequence into its last use and copy it for the earlier ones.
        let mut last_use = vec![usize::MAX; self.seqs.len()];
        for (i, &r) in rows.iter().enumerate() {
            last_use[r] = i;
        }
        let mut old: Vec<Option<SeqCache<T>>> = self.seqs.drain(..).map(Some).collect();
        let mut seqs = Vec::with_capacity(rows.len());
        for (i, &r) in rows.iter().enumerate() {
            let s = if last_use[r] == i {
                old[r].take()
            } else {
                old[r].clone()
            };
            seqs.push(s.expect("a sequence is moved out only at its last use"));
        }
        self.seqs = seqs;
        Ok(())
    }

    /// Position of the next real token of sequence `b`.
    fn next_position(&self, b: usize) -> usize {
        let s = &self.seqs[b];
        match s.positions {
            Positions::AfterPrefix => s.prefix_len + s.tokens,
            Positions::FromZero => s.tokens,
        }
    }
}

/// `[Hkv, a, D] ++ [Hkv, n, D]` along the token axis.
fn append_tokens<T: Real>(old: &[T], new: &[T], heads: usize, hd: usize) -> Vec<T> {
    let (a, n) = (
        old.len() / (heads * hd).max(1),
        new.len() / (heads * hd).max(1),
    );
    let mut out = Vec::with_capacity(old.len() + new.len());
    for h in 0..heads {
        out.extend_from_slice(&old[h * a * hd..(h + 1) * a * hd]);
        out.extend_from_slice(&new[h * n * hd..(h + 1) * n * hd]);
    }
    out
}

/// Appends `tokens[b]` to every sequence `b` of the cache and returns the logits `[B, V]` of
/// each sequence's last new token.
pub fn decode_step<T: Real>(
    m: &ModelWeights<T>,
    cache: &mut KvCache<T>,
    tokens: &[Vec<u32>],
) -> Result<Vec<T>> {
    let cfg = &m.config;
    let (d, hd, hq, hkv) = (cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads);
    ensure!(
        (cache.n_layers, cache.kv_heads, cache.head_dim) == (cfg.n_layers, hkv, hd),
        "decode: the cache was made for another model shape"
    );
    ensure!(
        tokens.len() == cache.batch(),
        "decode: {} token lists for {} sequences",
        tokens.len(),
        cache.batch()
    );
    let mut positions = Vec::new();
    let mut starts = Vec::with_capacity(tokens.len() + 1);
    for (b, t) in tokens.iter().enumerate() {
        ensure!(!t.is_empty(), "decode: sequence {b} has no new token");
        if let Some(&bad) = t.iter().find(|&&x| x as usize >= cfg.vocab_size) {
            bail!(
                "decode: token id {bad} is outside the vocabulary of {}",
                cfg.vocab_size
            );
        }
        let p0 = cache.next_position(b);
        if cfg.arch == Arch::Gpt2 && p0 + t.len() > cfg.max_positions {
            bail!(
                "GPT-2 has {} learned positions; sequence {b} would need {} \
                 (prefix {}, {} tokens so far, {} new)",
                cfg.max_positions,
                p0 + t.len(),
                cache.seqs[b].prefix_len,
                cache.seqs[b].tokens,
                t.len()
            );
        }
        starts.push(positions.len());
        positions.extend(p0..p0 + t.len());
    }
    starts.push(positions.len());
    let all: Vec<u32> = tokens.iter().flatten().copied().collect();
    let rows = all.len();

    let mut x = match (cfg.arch, m.pos_emb.as_deref()) {
        (Arch::Gpt2, Some(pe)) => embedding_forward(&all, &m.tok_emb, d, Some((pe, &positions))),
        (Arch::Gpt2, None) => bail!("GPT-2 model without position embeddings"),
        (Arch::Llama, _) => embedding_forward(&all, &m.tok_emb, d, None),
    };
    let ropes: Vec<Option<Rope<T>>> = (0..tokens.len())
        .map(|b| {
            (cfg.arch == Arch::Llama)
                .then(|| Rope::new(hd, cfg.rope_theta, &positions[starts[b]..starts[b + 1]]))
        })
        .collect();
    let scale = T::of(1.0 / (hd as f64).sqrt());

    for (l, lw) in m.layers.iter().enumerate() {
        let (h, _) = norm_forward(
            cfg.arch,
            &x,
            &lw.attn_norm_w,
            lw.attn_norm_b.as_deref(),
            d,
            cfg.norm_eps,
        );
        let q = linear_forward(&h, &lw.wq, lw.bq.as_deref(), d, cfg.q_dim());
        let k = linear_forward(&h, &lw.wk, lw.bk.as_deref(), d, cfg.kv_dim());
        let v = linear_forward(&h, &lw.wv, lw.bv.as_deref(), d, cfg.kv_dim());
        drop(h);
        let mut o_rows = vec![T::zero(); rows * cfg.q_dim()];
        for (b, seq) in cache.seqs.iter_mut().enumerate() {
            let (r0, n) = (starts[b], starts[b + 1] - starts[b]);
            let rows_of = |a: &[T], w: usize| a[r0 * w..(r0 + n) * w].to_vec();
            let mut qb = rows_to_heads(&rows_of(&q, cfg.q_dim()), 1, n, hq, hd);
            let mut kb = rows_to_heads(&rows_of(&k, cfg.kv_dim()), 1, n, hkv, hd);
            let vb = rows_to_heads(&rows_of(&v, cfg.kv_dim()), 1, n, hkv, hd);
            if let Some(rope) = &ropes[b] {
                rope_forward(&mut qb, hq, n, rope);
                rope_forward(&mut kb, hkv, n, rope);
            }
            let past = seq.len();
            // The keys/values attended to: the shared prefix's, then the sequence's own (a
            // working copy for this call; the cache keeps the prefix once).
            let (past_k, past_v) = match &seq.prefix {
                Some(p) => (
                    std::borrow::Cow::Owned(append_tokens(p.k(l), &seq.k[l], hkv, hd)),
                    std::borrow::Cow::Owned(append_tokens(p.v(l), &seq.v[l], hkv, hd)),
                ),
                None => (
                    std::borrow::Cow::Borrowed(&seq.k[l][..]),
                    std::borrow::Cow::Borrowed(&seq.v[l][..]),
                ),
            };
            let shape = AttnShape {
                batch: 1,
                q_heads: hq,
                kv_heads: hkv,
                seq: n,
                prefix: past,
                head_dim: hd,
                n_prefixes: 1,
            };
            let inputs = AttnInputs {
                q: &qb,
                k: &kb,
                v: &vb,
                prefix_k: &past_k,
                prefix_v: &past_v,
                prefix_index: &[0],
                valid_len: &[n],
                scale,
            };
            let (o, _lse) = attention::forward(&shape, &inputs);
            o_rows[r0 * cfg.q_dim()..(r0 + n) * cfg.q_dim()]
                .copy_from_slice(&heads_to_rows(&o, 1, n, hq, hd));
            seq.k[l] = append_tokens(&seq.k[l], &kb, hkv, hd);
            seq.v[l] = append_tokens(&seq.v[l], &vb, hkv, hd);
        }
        let mut y = linear_forward(&o_rows, &lw.wo, lw.bo.as_deref(), cfg.q_dim(), d);
        y.iter_mut().zip(&x).for_each(|(y, &x)| *y += x);
        x = mlp_block_forward(cfg, lw, &y).0;
    }
    for (b, seq) in cache.seqs.iter_mut().enumerate() {
        seq.tokens += starts[b + 1] - starts[b];
    }

    // Final norm and head on each sequence's last new token only.
    let last: Vec<T> = (0..tokens.len())
        .flat_map(|b| {
            let r = starts[b + 1] - 1;
            x[r * d..(r + 1) * d].to_vec()
        })
        .collect();
    let (h, _) = norm_forward(
        cfg.arch,
        &last,
        &m.final_norm_w,
        m.final_norm_b.as_deref(),
        d,
        cfg.norm_eps,
    );
    let vocab = cfg.vocab_size;
    let mut logits = vec![T::zero(); tokens.len() * vocab];
    matmul(
        tokens.len(),
        vocab,
        d,
        &h,
        Trans::No,
        m.head(),
        Trans::Yes,
        &mut logits,
        false,
    );
    Ok(logits)
}
