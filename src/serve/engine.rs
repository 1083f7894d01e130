//! The engine interface the scheduler drives: start (prefill) new sequences, step the running
//! batch, join the new sequences into it and retire finished ones. Two implementations:
//!
//! - [`CpuBatchEngine`]: the CPU reference decoding ([`crate::reference::decode`]); every
//!   sequence using a prefix holds the same [`SharedPrefix`] (one copy of the prefix however
//!   many sequences use it), and one step may mix prefill chunks and single tokens without
//!   padding;
//! - the GPU engine ([`ModelEngine`], on a card or the simulated device in tests): its KV-cache
//!   decoding, the prefill per group of sequences sharing a prefix (its fused prefix-attention
//!   kernel reads one bank), joined on the device with [`ModelEngine::join_decode`]. Its cache
//!   copies the prefix into each sequence's rows, and a step pads every sequence to the longest
//!   token list of the step.

use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use half::f16;

use crate::cuda::backend::Backend;
use crate::cuda::engine::ModelEngine;
use crate::engine::{DecodeCache, Engine};
use crate::model::config::{ModelConfig, ModelWeights};
use crate::reference::decode::{decode_step, KvCache, PrefixSharing, SharedPrefix};
use crate::reference::model::{Positions, RunOptions};

/// A sequence to start: its prefix (or none), position convention and first tokens (a prompt,
/// or the first chunk of one).
#[derive(Clone, Debug)]
pub struct NewSeq<'a> {
    pub prefix: Option<SharedPrefix<f32>>,
    pub positions: Positions,
    pub tokens: &'a [u32],
}

/// What the continuous-batching scheduler needs from an engine.
pub trait BatchEngine {
    fn config(&self) -> &ModelConfig;
    /// One line saying what runs where.
    fn describe(&self) -> String;
    /// Starts `seqs` in a new cache (rows in the order given) and returns it with the logits
    /// `[seqs.len(), V]` of each sequence's last token.
    fn start(&mut self, seqs: &[NewSeq<'_>]) -> Result<(Box<dyn DecodeCache>, Vec<f32>)>;
    /// Feeds `tokens[b]` (at least one) to row `b` and returns the logits of each row's last
    /// new token.
    fn step(&mut self, cache: &mut dyn DecodeCache, tokens: &[Vec<u32>]) -> Result<Vec<f32>>;
    /// Appends the rows of `other` (from [`BatchEngine::start`]) after those of `cache`.
    fn join(&mut self, cache: &mut dyn DecodeCache, other: Box<dyn DecodeCache>) -> Result<()>;
    /// Keeps the rows `rows` (in that order): finished sequences leave.
    fn retain(&mut self, cache: &mut dyn DecodeCache, rows: &[usize]) -> Result<()> {
        cache.reorder(rows)
    }
    /// How the cache's sequences hold their prefixes.
    fn sharing(&self, cache: &mut dyn DecodeCache) -> PrefixSharing;
}

/// The CPU reference decoding with shared prefixes.
pub struct CpuBatchEngine {
    weights: Arc<ModelWeights<f32>>,
}

impl CpuBatchEngine {
    pub fn new(weights: Arc<ModelWeights<f32>>) -> Self {
        CpuBatchEngine { weights }
    }
}

/// [`CpuBatchEngine`]'s cache.
struct CpuSlots(KvCache<f32>);

impl DecodeCache for CpuSlots {
    fn batch(&self) -> usize {
        self.0.batch()
    }
    fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        self.0.reorder(rows)
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

fn cpu_slots(cache: &mut dyn DecodeCache) -> Result<&mut CpuSlots> {
    match cache.as_any_mut().downcast_mut::<CpuSlots>() {
        Some(c) => Ok(c),
        None => bail!("this decode cache was made by another engine"),
    }
}

impl BatchEngine for CpuBatchEngine {
    fn config(&self) -> &ModelConfig {
        &self.weights.config
    }

    fn describe(&self) -> String {
        format!(
            "CPU reference engine (f32, {} threads), prefixes shared across sequences",
            rayon::current_num_threads()
        )
    }

    fn start(&mut self, seqs: &[NewSeq<'_>]) -> Result<(Box<dyn DecodeCache>, Vec<f32>)> {
        let spec: Vec<_> = seqs
            .iter()
            .map(|s| (s.prefix.clone(), s.positions))
            .collect();
        let mut cache = KvCache::with_prefixes(&self.weights.config, &spec)?;
        let tokens: Vec<Vec<u32>> = seqs.iter().map(|s| s.tokens.to_vec()).collect();
        let logits = decode_step(&self.weights, &mut cache, &tokens)?;
        Ok((Box::new(CpuSlots(cache)), logits))
    }

    fn step(&mut self, cache: &mut dyn DecodeCache, tokens: &[Vec<u32>]) -> Result<Vec<f32>> {
        decode_step(&self.weights, &mut cpu_slots(cache)?.0, tokens)
    }

    fn join(&mut self, cache: &mut dyn DecodeCache, mut other: Box<dyn DecodeCache>) -> Result<()> {
        let other = std::mem::replace(
            &mut cpu_slots(other.as_mut())?.0,
            KvCache::with_prefixes(&self.weights.config, &[])?,
        );
        cpu_slots(cache)?.0.append(other)
    }

    fn sharing(&self, cache: &mut dyn DecodeCache) -> PrefixSharing {
        cpu_slots(cache).map(|c| c.0.sharing()).unwrap_or_default()
    }
}

impl<B: Backend + 'static> BatchEngine for ModelEngine<B>
where
    B::Buf<f16>: Send,
{
    fn config(&self) -> &ModelConfig {
        Engine::config(self)
    }

    fn describe(&self) -> String {
        Engine::describe(self)
    }

    fn start(&mut self, seqs: &[NewSeq<'_>]) -> Result<(Box<dyn DecodeCache>, Vec<f32>)> {
        ensure!(!seqs.is_empty(), "start: no sequences");
        let vocab = Engine::config(self).vocab_size;
        // Groups of sequences with the same prefix (by identity) and convention, in order of
        // first appearance; the fused prefill reads one bank per call.
        let mut groups: Vec<(Option<SharedPrefix<f32>>, Positions, Vec<usize>)> = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            let same = |g: &(Option<SharedPrefix<f32>>, Positions, Vec<usize>)| {
                g.1 == s.positions
                    && match (&g.0, &s.prefix) {
                        (None, None) => true,
                        (Some(a), Some(b)) => Arc::ptr_eq(&a.bank, &b.bank),
                        _ => false,
                    }
            };
            match groups.iter_mut().find(|g| same(g)) {
                Some(g) => g.2.push(i),
                None => groups.push((s.prefix.clone(), s.positions, vec![i])),
            }
        }
        let mut joined: Option<Box<dyn DecodeCache>> = None;
        let mut order = Vec::with_capacity(seqs.len());
        let mut group_logits = Vec::with_capacity(seqs.len() * vocab);
        for (prefix, positions, members) in &groups {
            let bank = prefix.as_ref().map(|p| &*p.bank);
            let index: Vec<Option<usize>> = members
                .iter()
                .map(|&i| seqs[i].prefix.as_ref().map(|p| p.index))
                .collect();
            let run = RunOptions {
                positions: *positions,
            };
            let mut cache = Engine::begin_decode(self, bank, &index, &run)?;
            let tokens: Vec<Vec<u32>> = members.iter().map(|&i| seqs[i].tokens.to_vec()).collect();
            group_logits.extend(Engine::decode(self, cache.as_mut(), &tokens)?);
            order.extend(members.iter().copied());
            match joined.as_mut() {
                None => joined = Some(cache),
                Some(j) => self.join_decode(j.as_mut(), cache)?,
            }
        }
        let mut cache = joined.expect("at least one group");
        // Back to the order asked for: row `i` of the result is sequence `i`.
        let mut row_of = vec![0; seqs.len()];
        for (row, &i) in order.iter().enumerate() {
            row_of[i] = row;
        }
        if order.iter().enumerate().any(|(row, &i)| row != i) {
            cache.reorder(&row_of)?;
        }
        let mut logits = Vec::with_capacity(seqs.len() * vocab);
        for &row in &row_of {
            logits.extend_from_slice(&group_logits[row * vocab..(row + 1) * vocab]);
        }
        Ok((cache, logits))
    }

    fn step(&mut self, cache: &mut dyn DecodeCache, tokens: &[Vec<u32>]) -> Result<Vec<f32>> {
        Engine::decode(self, cache, tokens)
    }

    fn join(&mut self, cache: &mut dyn DecodeCache, other: Box<dyn DecodeCache>) -> Result<()> {
        self.join_decode(cache, other)
    }

    fn sharing(&self, cache: &mut dyn DecodeCache) -> PrefixSharing {
        // Each sequence holds its own copy of its prefix in the device cache.
        let cfg = Engine::config(self);
        match ModelEngine::<B>::decode_prefix_copies(cache) {
            Some((with, entries)) => PrefixSharing {
                sequences_with_prefix: with,
                prefixes_held: with,
                prefix_bytes: 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * entries * 2,
                token_bytes: 0,
            },
            None => PrefixSharing::default(),
        }
    }
}
