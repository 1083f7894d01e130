//! Random tiny models, prefix banks and batches for tests and benchmarks (seeded, reproducible).
//!
//! Weights are drawn from N(0, std²) (norm scales from 1 + N(0, std²)), so with std ≈ 0.2–0.3
//! the prefix changes the loss measurably and every parameter matters to the gradient.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use super::model::Batch;
use crate::model::config::{Arch, LayerWeights, ModelConfig, ModelWeights};
use crate::prefix::PrefixBank;

/// A tiny configuration: GPT-2 (d 32, 2 layers, 4 heads, vocab 61, 40 positions, tied head) or
/// Llama (d 32, 2 layers, 4 heads, 2 kv heads, head dim 8, d_ff 48, vocab 61, `tied` as asked).
pub fn tiny_config(arch: Arch, tied: bool) -> ModelConfig {
    match arch {
        Arch::Gpt2 => ModelConfig {
            arch,
            vocab_size: 61,
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 4,
            head_dim: 8,
            d_ff: 128,
            max_positions: 40,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
            tied_embeddings: tied,
            bos_token_id: Some(60),
            eos_token_ids: vec![60],
        },
        Arch::Llama => ModelConfig {
            arch,
            vocab_size: 61,
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            d_ff: 48,
            max_positions: 64,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
            tied_embeddings: tied,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        },
    }
}

/// SmolLM2-135M's shapes (30 layers, d 576, 9 heads, 3 kv heads, d_ff 1536, vocab 49152, tied),
/// for benchmarks with random weights.
pub fn smollm2_135m_config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        vocab_size: 49152,
        d_model: 576,
        n_layers: 30,
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        d_ff: 1536,
        max_positions: 8192,
        norm_eps: 1e-5,
        rope_theta: 100000.0,
        tied_embeddings: true,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// `n` draws from N(0, std²).
pub fn random_vec(rng: &mut StdRng, n: usize, std: f64) -> Vec<f64> {
    let normal = Normal::new(0.0, std).expect("finite std");
    (0..n).map(|_| normal.sample(rng)).collect()
}

/// `n` draws from N(1, std²) (norm scales).
fn random_scale(rng: &mut StdRng, n: usize, std: f64) -> Vec<f64> {
    random_vec(rng, n, std)
        .into_iter()
        .map(|x| 1.0 + x)
        .collect()
}

/// A model of the given configuration with random weights (biases, LayerNorm shifts and
/// position embeddings for GPT-2; an untied head when `!cfg.tied_embeddings`).
pub fn random_model(cfg: &ModelConfig, std: f64, seed: u64) -> ModelWeights<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (d, q, kv, f) = (cfg.d_model, cfg.q_dim(), cfg.kv_dim(), cfg.d_ff);
    let gpt2 = cfg.arch == Arch::Gpt2;
    let opt = |rng: &mut StdRng, n: usize| gpt2.then(|| random_vec(rng, n, std));
    let layers = (0..cfg.n_layers)
        .map(|_| LayerWeights {
            attn_norm_w: random_scale(&mut rng, d, std),
            attn_norm_b: opt(&mut rng, d),
            wq: random_vec(&mut rng, q * d, std),
            wk: random_vec(&mut rng, kv * d, std),
            wv: random_vec(&mut rng, kv * d, std),
            bq: opt(&mut rng, q),
            bk: opt(&mut rng, kv),
            bv: opt(&mut rng, kv),
            wo: random_vec(&mut rng, d * q, std),
            bo: opt(&mut rng, d),
            mlp_norm_w: random_scale(&mut rng, d, std),
            mlp_norm_b: opt(&mut rng, d),
            w_in: random_vec(&mut rng, f * d, std),
            b_in: opt(&mut rng, f),
            w_up: (!gpt2).then(|| random_vec(&mut rng, f * d, std)),
            w_out: random_vec(&mut rng, d * f, std),
            b_out: opt(&mut rng, d),
        })
        .collect();
    ModelWeights {
        config: cfg.clone(),
        tok_emb: random_vec(&mut rng, cfg.vocab_size * d, std),
        pos_emb: gpt2.then(|| random_vec(&mut rng, cfg.max_positions * d, std)),
        layers,
        final_norm_w: random_scale(&mut rng, d, std),
        final_norm_b: opt(&mut rng, d),
        lm_head: (!cfg.tied_embeddings).then(|| random_vec(&mut rng, cfg.vocab_size * d, std)),
    }
}

/// A bank of `n_prefixes` random prefixes of length `len` for every layer of `cfg`.
pub fn random_bank(
    cfg: &ModelConfig,
    n_prefixes: usize,
    len: usize,
    std: f64,
    seed: u64,
) -> PrefixBank<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut bank = PrefixBank::zeros(n_prefixes, cfg.n_layers, cfg.n_kv_heads, len, cfg.head_dim);
    let n = bank.layer_len();
    for l in 0..cfg.n_layers {
        bank.k[l] = random_vec(&mut rng, n, std);
        bank.v[l] = random_vec(&mut rng, n, std);
    }
    bank
}

/// A random right-padded batch: `valid_len[0] = seq`, the others shorter (at least 1); random
/// tokens (padding rows hold token 0); labels on about 3/4 of the valid rows plus a label on
/// a padding row (which must be ignored); sequences alternate between prefixes 0 and 1 (all 0
/// when `n_prefixes < 2`).
pub fn random_batch(
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    n_prefixes: usize,
    seed: u64,
) -> Batch {
    let mut rng = StdRng::seed_from_u64(seed);
    let vocab = cfg.vocab_size as u32;
    let valid_len: Vec<usize> = (0..batch)
        .map(|b| {
            if b == 0 {
                seq
            } else {
                rng.random_range(1..=seq.max(1)).min(seq)
            }
        })
        .collect();
    let mut tokens = vec![0u32; batch * seq];
    let mut labels = vec![None; batch * seq];
    for (b, &vl) in valid_len.iter().enumerate() {
        for t in 0..seq {
            let r = b * seq + t;
            if t < vl {
                tokens[r] = rng.random_range(0..vocab);
                if rng.random_bool(0.75) {
                    labels[r] = Some(rng.random_range(0..vocab));
                }
            } else if t == vl {
                labels[r] = Some(rng.random_range(0..vocab));
            }
        }
    }
    let prefix_index = (0..batch)
        .map(|b| if n_prefixes >= 2 { b % 2 } else { 0 })
        .collect();
    Batch {
        batch,
        seq,
        tokens,
        labels,
        valid_len,
        prefix_index,
    }
}
