//! One entry point for loading a frozen model and its tokenizer: an HF directory or a `.gguf` file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use super::config::ModelWeights;
use super::gguf::GgufFile;
use super::safetensors::{load_hf_tokenizer, load_hf_weights};
use super::tokenizer::Tokenizer;

/// A model ready to run: weights in f32, tokenizer, where it came from and a fingerprint.
pub struct LoadedModel {
    pub weights: ModelWeights<f32>,
    pub tokenizer: Tokenizer,
    pub source: PathBuf,
    /// Stable hash of the config and weights (see [`fingerprint`]); prefixes record it so that
    /// they are not applied to another model.
    pub fingerprint: String,
}

/// Load an HF directory (`config.json` + safetensors) or a GGUF file.
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    let (weights, tokenizer) = if path.is_dir() {
        let w = load_hf_weights(path)
            .with_context(|| format!("loading HF model directory {}", path.display()))?;
        let t = load_hf_tokenizer(path, &w.config)?;
        (w, t)
    } else if path.is_file() {
        let g = GgufFile::open(path)?;
        let w = g.llama_weights()?;
        let t = Tokenizer::from_gguf(&g)?;
        (w, t)
    } else {
        bail!("{}: no such model file or directory", path.display());
    };
    if tokenizer.vocab_size() > weights.config.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but the model's vocabulary has only {}",
            path.display(),
            tokenizer.vocab_size(),
            weights.config.vocab_size
        );
    }
    let fingerprint = fingerprint(&weights);
    Ok(LoadedModel {
        weights,
        tokenizer,
        source: path.to_path_buf(),
        fingerprint,
    })
}

/// Largest accepted size of any one model dimension (layers, heads, widths, vocabulary,
/// positions): keeps every product of two of them far from overflowing.
pub const MAX_DIM: usize = 1 << 24;

/// Refuse a configuration with a zero or absurd size before anything is allocated from it.
pub(crate) fn check_config_sizes(c: &super::config::ModelConfig, file: &str) -> Result<()> {
    for (name, v) in [
        ("vocab_size", c.vocab_size),
        ("d_model", c.d_model),
        ("n_layers", c.n_layers),
        ("n_heads", c.n_heads),
        ("n_kv_heads", c.n_kv_heads),
        ("head_dim", c.head_dim),
        ("d_ff", c.d_ff),
        ("max_positions", c.max_positions),
    ] {
        if v == 0 || v > MAX_DIM {
            bail!("{file}: {name} = {v} is out of range (1..={MAX_DIM})");
        }
    }
    if c.n_heads % c.n_kv_heads != 0 {
        bail!(
            "{file}: {} heads are not a multiple of {} key/value heads",
            c.n_heads,
            c.n_kv_heads
        );
    }
    Ok(())
}

// Loaded models are shared across threads.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<LoadedModel>();
};

/// Values hashed per parallel task; fixed so the result does not depend on the thread count.
const HASH_CHUNK: usize = 1 << 16;

fn mix(mut h: u64) -> u64 {
    // splitmix64 finalizer
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn hash_chunk(seed: u64, xs: &[f32]) -> u64 {
    let mut h = mix(seed ^ xs.len() as u64);
    for pair in xs.chunks(2) {
        let lo = pair[0].to_bits() as u64;
        let hi = pair.get(1).map_or(0xffff_ffff_u64, |x| x.to_bits() as u64);
        h = mix(h ^ (lo | hi << 32)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    }
    h
}

fn hash_tensor(seed: u64, xs: &[f32]) -> u64 {
    let parts: Vec<u64> = xs
        .par_chunks(HASH_CHUNK)
        .enumerate()
        .map(|(i, c)| hash_chunk(seed ^ mix(i as u64 + 1), c))
        .collect();
    parts
        .iter()
        .fold(mix(seed ^ xs.len() as u64), |h, &p| mix(h ^ p))
}

/// A stable 128-bit hex hash of a model's configuration and every weight value (bit patterns, in
/// [`ModelWeights`] order), independent of the file format the weights came from.
pub fn fingerprint(w: &ModelWeights<f32>) -> String {
    let mut tensors: Vec<(&str, &[f32])> = vec![("tok_emb", &w.tok_emb)];
    if let Some(p) = &w.pos_emb {
        tensors.push(("pos_emb", p));
    }
    for l in &w.layers {
        for (name, v) in [
            ("attn_norm_w", Some(&l.attn_norm_w)),
            ("attn_norm_b", l.attn_norm_b.as_ref()),
            ("wq", Some(&l.wq)),
            ("wk", Some(&l.wk)),
            ("wv", Some(&l.wv)),
            ("bq", l.bq.as_ref()),
            ("bk", l.bk.as_ref()),
            ("bv", l.bv.as_ref()),
            ("wo", Some(&l.wo)),
            ("bo", l.bo.as_ref()),
            ("mlp_norm_w", Some(&l.mlp_norm_w)),
            ("mlp_norm_b", l.mlp_norm_b.as_ref()),
            ("w_in", Some(&l.w_in)),
            ("b_in", l.b_in.as_ref()),
            ("w_up", l.w_up.as_ref()),
            ("w_out", Some(&l.w_out)),
            ("b_out", l.b_out.as_ref()),
        ] {
            if let Some(v) = v {
                tensors.push((name, v));
            }
        }
    }
    tensors.push(("final_norm_w", &w.final_norm_w));
    if let Some(b) = &w.final_norm_b {
        tensors.push(("final_norm_b", b));
    }
    if let Some(h) = &w.lm_head {
        tensors.push(("lm_head", h));
    }
    let config = serde_json::to_string(&w.config).unwrap_or_default();
    let name_hash = |s: &str| {
        s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        })
    };
    let per: Vec<u64> = tensors
        .par_iter()
        .enumerate()
        .map(|(i, (n, v))| hash_tensor(name_hash(n) ^ mix(i as u64), v))
        .collect();
    let (mut a, mut b) = (
        name_hash(&config),
        mix(name_hash(&config) ^ 0x5851_f42d_4c95_7f2d),
    );
    for &p in &per {
        a = mix(a ^ p);
        b = mix(b.wrapping_add(p).rotate_left(17));
    }
    format!("{a:016x}{b:016x}")
}
