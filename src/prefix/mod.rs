//! Prefix parameters: the bank of per-layer virtual keys/values, PEFT's layout, the
//! Li & Liang reparameterization, and initialization.
//!
//! - this file: [`PrefixBank`], the layout the attention reads, and whole-bank data movement
//!   (random init, select/stack prefixes, flatten for the optimizer);
//! - [`peft`]: PEFT's `prompt_embeddings` layout ↔ bank, and PEFT adapter directories;
//! - [`reparam`]: the Embedding → Linear → tanh → Linear reparameterization, forward/backward/fold;
//! - [`init`]: a prefix from the frozen model's keys/values of a real text (Li & Liang §7.4);
//! - [`file`]: our prefix files (safetensors + metadata), loading with validation.

pub mod file;
pub mod peft;
pub mod reparam;
pub mod resolve;
pub mod trainable;

pub use file::{
    check_compatible, load_prefix, load_prefix_for, load_reparam, save_prefix, save_reparam,
    Positions, PrefixMeta,
};
pub use peft::{export_peft_adapter, from_peft, import_peft_adapter, to_peft, PeftAdapterConfig};
pub use reparam::{Reparam, ReparamCache, ReparamGrads};
pub use trainable::Trainable;

use anyhow::{bail, ensure, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::model::config::ModelConfig;
use crate::real::Real;

/// Prefixes for every layer of a model, for one or more tasks.
///
/// Layer `l`'s keys are `k[l]`, laid out `[n_prefixes, kv_heads, len, head_dim]`, which is the
/// prefix-bank layout the attention (reference and kernels) reads; values likewise in `v[l]`.
/// The same struct holds gradients.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefixBank<T> {
    pub n_prefixes: usize,
    pub n_layers: usize,
    pub kv_heads: usize,
    /// Prefix length P (virtual tokens).
    pub len: usize,
    pub head_dim: usize,
    /// Per layer, `[n_prefixes, kv_heads, len, head_dim]`.
    pub k: Vec<Vec<T>>,
    /// Per layer, `[n_prefixes, kv_heads, len, head_dim]`.
    pub v: Vec<Vec<T>>,
}

impl<T: Real> PrefixBank<T> {
    /// A bank of zeros (also the starting point of a gradient).
    pub fn zeros(
        n_prefixes: usize,
        n_layers: usize,
        kv_heads: usize,
        len: usize,
        head_dim: usize,
    ) -> Self {
        let per = n_prefixes * kv_heads * len * head_dim;
        PrefixBank {
            n_prefixes,
            n_layers,
            kv_heads,
            len,
            head_dim,
            k: vec![vec![T::zero(); per]; n_layers],
            v: vec![vec![T::zero(); per]; n_layers],
        }
    }

    /// A zero bank of the same shape.
    pub fn zeros_like(&self) -> Self {
        Self::zeros(
            self.n_prefixes,
            self.n_layers,
            self.kv_heads,
            self.len,
            self.head_dim,
        )
    }

    /// Elements per layer per K or V: `n_prefixes · kv_heads · len · head_dim`.
    pub fn layer_len(&self) -> usize {
        self.n_prefixes * self.kv_heads * self.len * self.head_dim
    }

    /// A bank of independent N(0, std²) values from a seeded generator.
    pub fn random(
        n_prefixes: usize,
        n_layers: usize,
        kv_heads: usize,
        len: usize,
        head_dim: usize,
        std: f64,
        seed: u64,
    ) -> Self {
        let mut bank = Self::zeros(n_prefixes, n_layers, kv_heads, len, head_dim);
        let mut rng = StdRng::seed_from_u64(seed);
        let normal =
            Normal::new(0.0, std).expect("PrefixBank::random: std must be finite and >= 0");
        for l in 0..n_layers {
            for x in bank.k[l].iter_mut().chain(bank.v[l].iter_mut()) {
                *x = T::of(normal.sample(&mut rng));
            }
        }
        bank
    }

    /// Elements of one prefix in one layer's K (or V): `kv_heads · len · head_dim`.
    pub fn prefix_len_elems(&self) -> usize {
        self.kv_heads * self.len * self.head_dim
    }

    /// All parameters: `2 · n_layers · layer_len()`.
    pub fn n_params(&self) -> usize {
        2 * self.n_layers * self.layer_len()
    }

    /// Whether two banks have the same shape apart from the number of prefixes.
    pub fn same_prefix_shape(&self, other: &Self) -> bool {
        self.n_layers == other.n_layers
            && self.kv_heads == other.kv_heads
            && self.len == other.len
            && self.head_dim == other.head_dim
    }

    /// Prefix `i` alone, as a bank with one prefix.
    pub fn select(&self, i: usize) -> Self {
        assert!(
            i < self.n_prefixes,
            "select: prefix {i} of a bank with {}",
            self.n_prefixes
        );
        let per = self.prefix_len_elems();
        let part = |x: &Vec<T>| x[i * per..(i + 1) * per].to_vec();
        PrefixBank {
            n_prefixes: 1,
            n_layers: self.n_layers,
            kv_heads: self.kv_heads,
            len: self.len,
            head_dim: self.head_dim,
            k: self.k.iter().map(part).collect(),
            v: self.v.iter().map(part).collect(),
        }
    }

    /// Overwrites prefix `i` with the (single) prefix of `one`.
    pub fn set_prefix(&mut self, i: usize, one: &Self) {
        assert!(
            one.n_prefixes == 1 && self.same_prefix_shape(one) && i < self.n_prefixes,
            "set_prefix: shape mismatch or index {i} out of range"
        );
        let per = self.prefix_len_elems();
        for l in 0..self.n_layers {
            self.k[l][i * per..(i + 1) * per].copy_from_slice(&one.k[l]);
            self.v[l][i * per..(i + 1) * per].copy_from_slice(&one.v[l]);
        }
    }

    /// A multi-task bank holding the prefixes of `banks` in order (each may hold several).
    pub fn stack(banks: &[Self]) -> Result<Self> {
        let Some(first) = banks.first() else {
            bail!("cannot stack an empty list of prefixes");
        };
        for (j, b) in banks.iter().enumerate() {
            if !first.same_prefix_shape(b) {
                bail!(
                    "cannot stack prefix {j}: shape (layers {}, kv heads {}, length {}, head dim {}) \
                     differs from prefix 0's ({}, {}, {}, {})",
                    b.n_layers,
                    b.kv_heads,
                    b.len,
                    b.head_dim,
                    first.n_layers,
                    first.kv_heads,
                    first.len,
                    first.head_dim
                );
            }
        }
        let cat = |l: usize, kv: fn(&Self) -> &Vec<Vec<T>>| {
            banks
                .iter()
                .flat_map(|b| kv(b)[l].iter().copied())
                .collect::<Vec<T>>()
        };
        Ok(PrefixBank {
            n_prefixes: banks.iter().map(|b| b.n_prefixes).sum(),
            n_layers: first.n_layers,
            kv_heads: first.kv_heads,
            len: first.len,
            head_dim: first.head_dim,
            k: (0..first.n_layers).map(|l| cat(l, |b| &b.k)).collect(),
            v: (0..first.n_layers).map(|l| cat(l, |b| &b.v)).collect(),
        })
    }

    /// All parameters in one vector (for the optimizer): layer 0's K, layer 0's V, layer 1's K, …
    pub fn to_flat(&self) -> Vec<T> {
        let mut out = Vec::with_capacity(self.n_params());
        for l in 0..self.n_layers {
            out.extend_from_slice(&self.k[l]);
            out.extend_from_slice(&self.v[l]);
        }
        out
    }

    /// Reads back what [`to_flat`](Self::to_flat) wrote.
    pub fn copy_from_flat(&mut self, flat: &[T]) {
        assert_eq!(flat.len(), self.n_params(), "copy_from_flat: length");
        let n = self.layer_len();
        for l in 0..self.n_layers {
            let base = 2 * l * n;
            self.k[l].copy_from_slice(&flat[base..base + n]);
            self.v[l].copy_from_slice(&flat[base + n..base + 2 * n]);
        }
    }

    /// Whether every value is finite.
    pub fn all_finite(&self) -> bool {
        self.k
            .iter()
            .chain(&self.v)
            .all(|x| x.iter().all(|v| v.is_finite()))
    }

    /// The same bank in another scalar type.
    pub fn cast<U: Real>(&self) -> PrefixBank<U> {
        let c = |x: &Vec<Vec<T>>| x.iter().map(|v| crate::real::cast(v)).collect();
        PrefixBank {
            n_prefixes: self.n_prefixes,
            n_layers: self.n_layers,
            kv_heads: self.kv_heads,
            len: self.len,
            head_dim: self.head_dim,
            k: c(&self.k),
            v: c(&self.v),
        }
    }
}

/// Checks that `bank` fits the model and holds entry `index` (sequence `b`'s, for the message).
pub fn check_bank<T: Real>(
    cfg: &ModelConfig,
    bank: &PrefixBank<T>,
    index: Option<usize>,
    b: usize,
) -> Result<()> {
    let (hkv, hd) = (cfg.n_kv_heads, cfg.head_dim);
    ensure!(
        bank.n_layers == cfg.n_layers && bank.kv_heads == hkv && bank.head_dim == hd,
        "prefix bank is {} layers × {} kv heads × head dim {}, the model {} × {} × {}",
        bank.n_layers,
        bank.kv_heads,
        bank.head_dim,
        cfg.n_layers,
        hkv,
        hd
    );
    ensure!(
        bank.k.len() == bank.n_layers
            && bank.v.len() == bank.n_layers
            && bank
                .k
                .iter()
                .chain(&bank.v)
                .all(|x| x.len() == bank.layer_len()),
        "prefix bank: layer buffers have the wrong size"
    );
    if let Some(i) = index {
        ensure!(
            i < bank.n_prefixes,
            "sequence {b} asks for prefix {i} but the bank holds {}",
            bank.n_prefixes
        );
    }
    Ok(())
}

/// The checks of a decode request that every engine makes first, so that all refuse alike: the
/// bank fits the model, and each sequence's prefix index names a prefix of it.
pub fn check_decode_request<T: Real>(
    cfg: &ModelConfig,
    bank: Option<&PrefixBank<T>>,
    prefix_index: &[Option<usize>],
) -> Result<()> {
    if let Some(p) = bank {
        check_bank(cfg, p, None, 0)?;
    }
    for (b, idx) in prefix_index.iter().enumerate() {
        match (*idx, bank) {
            (None, _) => {}
            (Some(i), None) => {
                anyhow::bail!("sequence {b} asks for prefix {i} but no prefix was given")
            }
            (Some(i), Some(p)) => check_bank(cfg, p, Some(i), b)?,
        }
    }
    Ok(())
}
