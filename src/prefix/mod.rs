//! Prefix parameters: the bank of per-layer virtual keys/values, PEFT's layout, the
//! Li & Liang reparameterization, and initialization.

use crate::reference::real::Real;

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
}
