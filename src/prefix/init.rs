//! Initialising a prefix from real words (Li & Liang §7.4): the frozen model's per-layer keys
//! and values of a text (keys after RoPE, as a cache holds them) become the prefix, so
//! P = the number of text tokens.

use super::PrefixBank;
use crate::reference::real::Real;

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
