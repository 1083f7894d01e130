//! `prefix-tune bench train`: the GPU engine's training step on model shapes of interest with
//! random weights (speed does not depend on the values): tokens/s, step time, the forward's
//! share, and the peak device memory. The HF + PEFT baseline on the same configurations is
//! `tools/bench/peft_train.py`; `BENCHMARKS.md` holds the ratio table.
//!
//! A step is what the trainer does per batch: upload the prefix, forward, chunked LM head and
//! cross-entropy, the prefix-only backward, and the prefix gradient back on the host.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};

use crate::cuda::engine::CudaEngine;
use crate::engine::Engine;
use crate::model::config::{Arch, LayerWeights, ModelConfig, ModelWeights};
use crate::prefix::PrefixBank;
use crate::reference::model::{Batch, RunOptions};

/// Benchmarks.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

/// What to benchmark.
#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Training steps of the GPU engine (random weights).
    Train(TrainBenchArgs),
}

/// Model shapes for `bench train`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchModel {
    /// SmolLM2-135M: Llama, 30 layers, d=576, 9 heads / 3 kv heads, vocab 49152.
    Smollm2,
    /// GPT-2 medium: 24 layers, d=1024, 16 heads, vocab 50257.
    Gpt2Medium,
}

#[derive(Debug, Args)]
pub struct TrainBenchArgs {
    /// Models to time (default: both).
    #[arg(long, value_enum, num_args = 1..)]
    pub model: Vec<BenchModel>,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Prefix length (virtual tokens).
    #[arg(long, default_value_t = 10)]
    pub prefix_len: usize,
    /// Timed steps (after 2 warm-up steps).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Also print one JSON object per model.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchWhat::Train(t) => train(t),
    }
}

/// The configuration of a benchmark model.
pub fn bench_config(m: BenchModel) -> ModelConfig {
    match m {
        BenchModel::Smollm2 => crate::reference::testing::smollm2_135m_config(),
        BenchModel::Gpt2Medium => ModelConfig {
            arch: Arch::Gpt2,
            vocab_size: 50257,
            d_model: 1024,
            n_layers: 24,
            n_heads: 16,
            n_kv_heads: 16,
            head_dim: 64,
            d_ff: 4096,
            max_positions: 1024,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
            tied_embeddings: true,
            bos_token_id: Some(50256),
            eos_token_ids: vec![50256],
        },
    }
}

/// A fast deterministic generator (xorshift64*) for random weights: uniform in [-a, a].
struct Fill(u64);

impl Fill {
    fn vec(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                let u =
                    (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32;
                a * (2.0 * u - 1.0)
            })
            .collect()
    }
    fn ones(&mut self, n: usize) -> Vec<f32> {
        self.vec(n, 0.1).into_iter().map(|x| 1.0 + x).collect()
    }
}

/// Random weights of `cfg` (uniform, scaled like an initialised model).
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> ModelWeights<f32> {
    let mut r = Fill(seed.max(1));
    let (d, q, kv, f) = (cfg.d_model, cfg.q_dim(), cfg.kv_dim(), cfg.d_ff);
    let gpt2 = cfg.arch == Arch::Gpt2;
    let a = 0.02 * 3f32.sqrt();
    let layers = (0..cfg.n_layers)
        .map(|_| {
            let mut opt = |n: usize| gpt2.then(|| r.vec(n, a));
            let (anb, bq, bk, bv, bo, mnb, b_in, b_out) = (
                opt(d),
                opt(q),
                opt(kv),
                opt(kv),
                opt(d),
                opt(d),
                opt(f),
                opt(d),
            );
            LayerWeights {
                attn_norm_w: r.ones(d),
                attn_norm_b: anb,
                wq: r.vec(q * d, a),
                wk: r.vec(kv * d, a),
                wv: r.vec(kv * d, a),
                bq,
                bk,
                bv,
                wo: r.vec(d * q, a),
                bo,
                mlp_norm_w: r.ones(d),
                mlp_norm_b: mnb,
                w_in: r.vec(f * d, a),
                b_in,
                w_up: (!gpt2).then(|| r.vec(f * d, a)),
                w_out: r.vec(d * f, a),
                b_out,
            }
        })
        .collect();
    ModelWeights {
        config: cfg.clone(),
        tok_emb: r.vec(cfg.vocab_size * d, a),
        pos_emb: gpt2.then(|| r.vec(cfg.max_positions * d, a)),
        layers,
        final_norm_w: r.ones(d),
        final_norm_b: gpt2.then(|| r.vec(d, a)),
        lm_head: (!cfg.tied_embeddings).then(|| r.vec(cfg.vocab_size * d, a)),
    }
}

/// A full batch: every position predicts the next (random) token.
fn random_batch(cfg: &ModelConfig, batch: usize, seq: usize, seed: u64) -> Batch {
    let mut r = Fill(seed.max(1));
    let ids: Vec<u32> = r
        .vec(batch * (seq + 1), 1.0)
        .iter()
        .map(|&u| (((u + 1.0) * 0.5 * cfg.vocab_size as f32) as u32).min(cfg.vocab_size as u32 - 1))
        .collect();
    let mut tokens = Vec::with_capacity(batch * seq);
    let mut labels = Vec::with_capacity(batch * seq);
    for b in 0..batch {
        let s = &ids[b * (seq + 1)..(b + 1) * (seq + 1)];
        tokens.extend_from_slice(&s[..seq]);
        labels.extend(s[1..].iter().map(|&t| Some(t)));
    }
    Batch {
        batch,
        seq,
        tokens,
        labels,
        valid_len: vec![seq; batch],
        prefix_index: vec![0; batch],
    }
}

fn train(a: TrainBenchArgs) -> Result<()> {
    if a.batch_size == 0 || a.seq_len == 0 || a.steps == 0 {
        bail!("--batch-size, --seq-len and --steps must be positive");
    }
    let models = if a.model.is_empty() {
        vec![BenchModel::Smollm2, BenchModel::Gpt2Medium]
    } else {
        a.model.clone()
    };
    println!(
        "{:<12} {:>3} {:>5} {:>3} {:>9} {:>9} {:>10} {:>9} {:>9} {:>10}",
        "model",
        "B",
        "T",
        "P",
        "step ms",
        "fwd ms",
        "tokens/s",
        "alloc MiB",
        "peak MiB",
        "loss scale"
    );
    for m in models {
        let cfg = bench_config(m);
        if cfg.arch == Arch::Gpt2 && a.prefix_len + a.seq_len > cfg.max_positions {
            bail!(
                "{m:?}: a prefix of {} plus {} tokens exceeds GPT-2's {} positions",
                a.prefix_len,
                a.seq_len,
                cfg.max_positions
            );
        }
        let weights = Arc::new(random_weights(&cfg, 1234));
        let mut engine = CudaEngine::new(weights.clone())
            .with_context(|| format!("bench train needs the GPU engine ({m:?})"))?;
        drop(weights);
        let mut prefix =
            PrefixBank::<f32>::zeros(1, cfg.n_layers, cfg.n_kv_heads, a.prefix_len, cfg.head_dim);
        let mut r = Fill(99);
        for l in 0..cfg.n_layers {
            prefix.k[l] = r.vec(prefix.layer_len(), 0.5);
            prefix.v[l] = r.vec(prefix.layer_len(), 0.5);
        }
        let batch = random_batch(&cfg, a.batch_size, a.seq_len, 7);
        let opts = RunOptions::default();
        for _ in 0..2 {
            engine.loss_and_grad(&prefix, &batch, &opts)?;
        }
        let t0 = Instant::now();
        for _ in 0..a.steps {
            engine.loss_and_grad(&prefix, &batch, &opts)?;
        }
        let step = t0.elapsed().as_secs_f64() / a.steps as f64;
        let t1 = Instant::now();
        for _ in 0..a.steps {
            engine.loss(Some(&prefix), &batch, &opts)?;
        }
        let fwd = t1.elapsed().as_secs_f64() / a.steps as f64;
        let tokens = (a.batch_size * a.seq_len) as f64;
        let peak = engine.peak_device_memory() as f64 / (1u64 << 20) as f64;
        let allocated = engine.allocated_bytes() as f64 / (1u64 << 20) as f64;
        println!(
            "{:<12} {:>3} {:>5} {:>3} {:>9.2} {:>9.2} {:>10.0} {:>9.0} {:>9.0} {:>10}",
            format!("{m:?}").to_lowercase(),
            a.batch_size,
            a.seq_len,
            a.prefix_len,
            step * 1e3,
            fwd * 1e3,
            tokens / step,
            allocated,
            peak,
            engine.loss_scale()
        );
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "bench": "train", "model": format!("{m:?}").to_lowercase(),
                    "batch": a.batch_size, "seq": a.seq_len, "prefix": a.prefix_len,
                    "step_ms": step * 1e3, "forward_ms": fwd * 1e3,
                    "tokens_per_s": tokens / step, "allocated_mib": allocated,
                    "peak_device_mib": peak,
                    "overflow_retries": engine.overflow_retries(),
                    "device": engine.device_description(),
                })
            );
        }
    }
    println!(
        "(step = prefix upload + forward + chunked head/CE + prefix-only backward + gradient \
         download; fwd = loss only; alloc = weights + workspaces; peak = device memory in use as the driver reports it)"
    );
    Ok(())
}
