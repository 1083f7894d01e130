//! `prefix-tune bench`: speed measurements.
//!
//! - `bench attention`: the fused prefix-attention kernels on the GPU, forward and backward (with
//!   the prefix-gradient reduction), on the grid of the kernel issue (B = 8, Hq = 16,
//!   T ∈ {512, 1024, 2048, 4096}, P ∈ {10, 16, 128}, D ∈ {64, 128}; GQA 9/3 at D = 64, P = 10), timed with CUDA events; or the CPU
//!   reference attention (plain and blockwise, f32) on a small grid with `--device cpu`.
//! - `bench decode`: the KV-cache decode attention on the GPU (split-KV and one-warp-per-row
//!   kernels): tokens/s and GB/s against the device's memory bandwidth.
//! - `bench train`: the prefix-only training step (loss and prefix gradient through the
//!   [`Engine`], plus the AdamW update) on model shapes of interest with random weights (speed does
//!   not depend on the values), or on a real model: step time, tokens/s, the forward's time and,
//!   on the GPU, the device memory. The HF + PEFT baseline on the same configurations is
//!   `tools/bench/peft_train.py`; `BENCHMARKS.md` holds the ratio table.
//!
//! The timing itself lives in [`crate::bench`] (shared with `benches/attention.rs`). Output is a
//! table, or one JSON object per row with `--json` (what `scripts/gpu-check` reads).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};

use crate::bench::{
    bench_cpu_attention, bench_gpu_attention, bench_gpu_decode, bench_train_steps,
    cpu_attention_grid, gpu_attention_grid, gpu_decode_grid, tiny_attention_grid, AttnBenchOpts,
    AttnRow, DecodeRow, GPU_PROTOCOL,
};
use crate::cuda::device_optim::DeviceOptimEngine;
use crate::cuda::engine::CudaEngine;
use crate::cuda::GpuContext;
use crate::devices::open_engine_with;
use crate::engine::{Device, Engine, EngineOptions};
use crate::model::config::{Arch, LayerWeights, ModelConfig, ModelWeights};
use crate::prefix::PrefixBank;
use crate::reference::model::{Batch, RunOptions};
use crate::reference::testing::{smollm2_135m_config, tiny_config};

/// Benchmarks.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  prefix-tune bench attention                 (GPU kernels, the full grid)
  prefix-tune bench attention --device cpu --quick --json
  prefix-tune bench decode --json
  prefix-tune bench train --device cuda --shape smollm2-135m gpt2-medium
  prefix-tune bench train --device cpu --shape tiny-llama")]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

/// What to benchmark.
#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Prefix attention forward and backward: the GPU kernels, or the CPU reference.
    Attention(AttentionBenchArgs),
    /// KV-cache decode attention on the GPU: tokens/s and GB/s against the memory bound.
    Decode(DecodeBenchArgs),
    /// Training steps (loss, prefix gradient, AdamW update) of an engine.
    Train(TrainBenchArgs),
    /// A load test of `prefix-tune serve` on loopback (see `bench serve --help`).
    Serve(super::serve::BenchServeArgs),
}

/// Where a benchmark runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchDevice {
    /// The CPU reference code (f32).
    Cpu,
    /// The GPU (CUDA kernels, GPU engine).
    Cuda,
}

#[derive(Debug, Args)]
pub struct AttentionBenchArgs {
    /// Where to run: the GPU kernels, or the CPU reference (plain and blockwise) on a small grid.
    #[arg(long, value_enum, default_value_t = BenchDevice::Cuda)]
    pub device: BenchDevice,
    /// A smaller grid (GPU: T ∈ {512, 2048}; CPU: T = 32).
    #[arg(long)]
    pub quick: bool,
    /// A tiny grid (B=1, Hq=2, Hkv=1, T=64, P=10, both head dims): a smoke test of the benchmark
    /// itself, e.g. on the simulated device (scripts/gpu-check's dry run).
    #[arg(long, conflicts_with = "quick")]
    pub tiny: bool,
    /// Also time the deterministic backward (dQ without float atomics).
    #[arg(long)]
    pub deterministic: bool,
    /// One JSON object per row instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Untimed calls per pass before measuring.
    #[arg(long, default_value_t = GPU_PROTOCOL.warmup)]
    pub warmup: usize,
    /// Timed runs per pass; the median is reported (default: GPU 10, CPU 3).
    #[arg(long)]
    pub reps: Option<usize>,
    /// GPU: back-to-back calls between the two events of a run (tools/bench/torch_attention.py
    /// uses the same default).
    #[arg(long, default_value_t = GPU_PROTOCOL.calls_per_rep)]
    pub calls: usize,
    /// GPU: do not flush the L2 cache before each run (both sides then run warm).
    #[arg(long)]
    pub no_l2_flush: bool,
}

#[derive(Debug, Args)]
pub struct DecodeBenchArgs {
    /// A smaller grid (B in {1, 32}, past in {512, 8192}).
    #[arg(long)]
    pub quick: bool,
    /// One JSON object per row instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Timed runs per case; the median is reported.
    #[arg(long, default_value_t = GPU_PROTOCOL.reps)]
    pub reps: usize,
    /// Back-to-back calls between the two events of a run.
    #[arg(long, default_value_t = GPU_PROTOCOL.calls_per_rep)]
    pub calls: usize,
    /// Do not flush the L2 cache before each run.
    #[arg(long)]
    pub no_l2_flush: bool,
}

/// Model shapes for `bench train` (random weights).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchShape {
    /// SmolLM2-135M: Llama, 30 layers, d=576, 9 heads / 3 kv heads, vocab 49152.
    #[value(name = "smollm2-135m", alias = "smollm2")]
    Smollm2,
    /// GPT-2 medium: 24 layers, d=1024, 16 heads, vocab 50257, 1024 positions.
    Gpt2Medium,
    /// The tests' tiny Llama (2 layers, d=32, vocab 61).
    TinyLlama,
    /// The tests' tiny GPT-2 (2 layers, d=32, vocab 61, 40 positions).
    TinyGpt2,
    /// A tiny Llama the GPU kernels take (2 layers, d=96, 4 heads of 64 / 2 kv heads, vocab 83):
    /// for a quick look on the simulated device.
    TinyGpu,
}

impl BenchShape {
    /// The name in tables and JSON (`smollm2`, `gpt2-medium` match tools/bench/peft_train.py).
    pub fn name(self) -> &'static str {
        match self {
            BenchShape::Smollm2 => "smollm2",
            BenchShape::Gpt2Medium => "gpt2-medium",
            BenchShape::TinyLlama => "tiny-llama",
            BenchShape::TinyGpt2 => "tiny-gpt2",
            BenchShape::TinyGpu => "tiny-gpu",
        }
    }

    /// The model configuration.
    pub fn config(self) -> ModelConfig {
        match self {
            BenchShape::Smollm2 => smollm2_135m_config(),
            BenchShape::Gpt2Medium => gpt2_medium_config(),
            BenchShape::TinyLlama => tiny_config(Arch::Llama, true),
            BenchShape::TinyGpt2 => tiny_config(Arch::Gpt2, true),
            BenchShape::TinyGpu => {
                let mut cfg = tiny_config(Arch::Llama, false);
                cfg.head_dim = 64;
                cfg.d_model = 96;
                cfg.n_heads = 4;
                cfg.n_kv_heads = 2;
                cfg.d_ff = 112;
                cfg.vocab_size = 83;
                cfg
            }
        }
    }
}

/// GPT-2 medium's shapes: 24 layers, d=1024, 16 heads of 64, d_ff 4096, vocab 50257, 1024
/// positions, tied head.
pub fn gpt2_medium_config() -> ModelConfig {
    ModelConfig {
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
    }
}

#[derive(Debug, Args)]
pub struct TrainBenchArgs {
    /// Where to run: the GPU engine or the CPU reference engine.
    #[arg(long, value_enum, default_value_t = BenchDevice::Cuda)]
    pub device: BenchDevice,
    /// Model shapes to time with random weights (default: smollm2-135m and gpt2-medium).
    #[arg(long, value_enum, num_args = 1.., conflicts_with = "model")]
    pub shape: Vec<BenchShape>,
    /// A real model (HF directory or .gguf) instead of random weights.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Sequences per batch (default: 8 on the GPU, 4 on the CPU).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Tokens per sequence (default: 512 on the GPU, 128 on the CPU; at most what the model's
    /// positions allow after the prefix).
    #[arg(long, alias = "seq-len")]
    pub seq: Option<usize>,
    /// Prefix length (virtual tokens).
    #[arg(long, default_value_t = 10)]
    pub prefix_len: usize,
    /// Timed steps; the median is reported (default: 10 on the GPU, 3 on the CPU).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Untimed steps first (default: 2 on the GPU, 1 on the CPU).
    #[arg(long)]
    pub warmup: Option<usize>,
    /// One JSON object per model instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Per-layer activation recomputation (GPU engine: less memory, one more forward per step;
    /// no effect on the CPU engine).
    #[arg(long)]
    pub recompute: bool,
    /// GPU: after the timing, this many more steps with every operation synchronised and timed,
    /// for the per-op breakdown (0: none).
    #[arg(long, default_value_t = 3)]
    pub profile_steps: usize,
}

pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchWhat::Attention(a) => attention(a),
        BenchWhat::Decode(d) => decode(d),
        BenchWhat::Train(t) => train(t),
        BenchWhat::Serve(s) => super::serve::bench(s),
    }
}

fn attention(a: AttentionBenchArgs) -> Result<()> {
    let cpu = a.device == BenchDevice::Cpu;
    let opts = AttnBenchOpts {
        warmup: a.warmup,
        reps: a.reps.unwrap_or(if cpu { 3 } else { GPU_PROTOCOL.reps }),
        calls_per_rep: if cpu { 1 } else { a.calls },
        deterministic: a.deterministic,
        flush_l2: !cpu && !a.no_l2_flush,
    };
    if opts.reps == 0 || opts.calls_per_rep == 0 {
        bail!("--reps and --calls must be positive");
    }
    let gpu = if cpu {
        None
    } else {
        Some(GpuContext::new(0).context(
            "bench attention times the GPU kernels and needs a usable GPU (--device cpu times the \
             CPU reference instead)",
        )?)
    };
    let shapes = if cpu {
        if a.tiny {
            tiny_attention_grid()
        } else {
            cpu_attention_grid(a.quick)
        }
    } else {
        if a.tiny {
            tiny_attention_grid()
        } else {
            gpu_attention_grid(a.quick)
        }
    };
    if let Some(g) = &gpu {
        eprintln!("{}", g.description());
    }
    if !a.json {
        println!(
            "{:<14} {:<18} {:<16} {:>10} {:>9}",
            "impl", "pass", "shape", "ms", "TFLOP/s"
        );
    }
    for (i, s) in shapes.iter().enumerate() {
        let seed = 11 + i as u64;
        let rows = match &gpu {
            Some(g) => bench_gpu_attention(g, s, &opts, seed)?,
            None => bench_cpu_attention(s, &opts, seed),
        };
        for r in &rows {
            print_attn_row(r, a.json)?;
        }
    }
    if !a.json {
        let s = shapes[0];
        println!(
            "(B={}, Hq={}, Hkv={}; median of {} runs of {} back-to-back calls after {} warm-up \
             calls{}; FLOPs: fwd 4*B*Hq*D*T*(P+T/2), bwd 2.5x; bwd includes the prefix-gradient \
             reduction)",
            s.batch,
            s.q_heads,
            s.kv_heads,
            opts.reps,
            opts.calls_per_rep,
            opts.warmup,
            if opts.flush_l2 {
                ", L2 flushed before each run"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn decode(a: DecodeBenchArgs) -> Result<()> {
    let opts = AttnBenchOpts {
        reps: a.reps,
        calls_per_rep: a.calls,
        flush_l2: !a.no_l2_flush,
        ..GPU_PROTOCOL
    };
    if opts.reps == 0 || opts.calls_per_rep == 0 {
        bail!("--reps and --calls must be positive");
    }
    let g = GpuContext::new(0)
        .context("bench decode times the GPU decode-attention kernels and needs a usable GPU")?;
    eprintln!("{}", g.description());
    if !a.json {
        println!(
            "{:<17} {:>3} {:>7} {:>4} {:>6} {:>6} {:>9} {:>11} {:>8} {:>6}",
            "impl", "B", "heads", "D", "past", "splits", "us", "tokens/s", "GB/s", "bound"
        );
    }
    for (i, c) in gpu_decode_grid(a.quick).iter().enumerate() {
        for r in bench_gpu_decode(&g, c, &opts, 31 + i as u64)? {
            print_decode_row(&r, a.json)?;
        }
    }
    if !a.json {
        println!(
            "(one new token per sequence, one layer's attention; GB/s: K and V of every visible \
             key plus q and o, fp16; bound: memory clock x bus width x 2; median of {} runs of {} \
             calls{})",
            opts.reps,
            opts.calls_per_rep,
            if opts.flush_l2 {
                ", L2 flushed before each run"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn print_decode_row(r: &DecodeRow, json: bool) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(r)?)?;
    } else {
        writeln!(
            out,
            "{:<17} {:>3} {:>7} {:>4} {:>6} {:>6} {:>9.1} {:>11.0} {:>8.1} {:>5.0}%",
            r.implementation,
            r.batch,
            format!("{}/{}", r.q_heads, r.kv_heads),
            r.head_dim,
            r.past,
            r.splits,
            r.us,
            r.tokens_per_s,
            r.gb_s,
            100.0 * r.gb_s / r.bound_gb_s
        )?;
    }
    out.flush()?;
    Ok(())
}

fn print_attn_row(r: &AttnRow, json: bool) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(r)?)?;
    } else {
        writeln!(
            out,
            "{:<14} {:<18} {:<16} {:>10.3} {:>9.3}",
            r.implementation, r.pass, r.shape, r.ms, r.tflops
        )?;
    }
    out.flush()?;
    Ok(())
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

/// Where a benchmarked model comes from.
enum Source {
    Shape(BenchShape),
    File(PathBuf),
}

fn train(a: TrainBenchArgs) -> Result<()> {
    let cpu = a.device == BenchDevice::Cpu;
    let batch_size = a.batch_size.unwrap_or(if cpu { 4 } else { 8 });
    let steps = a.steps.unwrap_or(if cpu { 3 } else { 10 });
    let warmup = a.warmup.unwrap_or(if cpu { 1 } else { 2 });
    if batch_size == 0 || steps == 0 || a.seq == Some(0) {
        bail!("--batch-size, --seq and --steps must be positive");
    }
    let sources: Vec<Source> = match &a.model {
        Some(path) => vec![Source::File(path.clone())],
        None if a.shape.is_empty() => vec![
            Source::Shape(BenchShape::Smollm2),
            Source::Shape(BenchShape::Gpt2Medium),
        ],
        None => a.shape.iter().map(|&s| Source::Shape(s)).collect(),
    };
    if !cpu {
        // Fail before drawing a large model's random weights.
        crate::cuda::gpu_available().map_err(|e| {
            anyhow::anyhow!(
                "bench train --device cuda needs a usable GPU (--device cpu runs the CPU \
                 reference engine): {e}"
            )
        })?;
    }
    let mut header = !a.json;
    for src in sources {
        // One model at a time: GPT-2 medium's random weights are 1.4 GB in f32.
        let (name, weights) = match src {
            Source::Shape(s) => (s.name().to_string(), random_weights(&s.config(), 1234)),
            Source::File(p) => {
                let name = p.file_name().unwrap_or(p.as_os_str());
                let name = name.to_string_lossy().into_owned();
                (name, super::load_model_arg(&p)?.weights)
            }
        };
        let cfg = weights.config.clone();
        let max_seq = if cfg.arch == Arch::Gpt2 {
            cfg.max_positions.saturating_sub(a.prefix_len)
        } else {
            usize::MAX
        };
        let seq = match a.seq {
            Some(t) => t,
            None => (if cpu { 128 } else { 512 }).min(max_seq),
        };
        if seq == 0 || seq > max_seq {
            bail!(
                "{name}: a prefix of {} plus {seq} tokens does not fit GPT-2's {} positions",
                a.prefix_len,
                cfg.max_positions
            );
        }
        let mut prefix =
            PrefixBank::<f32>::zeros(1, cfg.n_layers, cfg.n_kv_heads, a.prefix_len, cfg.head_dim);
        let mut r = Fill(99);
        for l in 0..cfg.n_layers {
            prefix.k[l] = r.vec(prefix.layer_len(), 0.5);
            prefix.v[l] = r.vec(prefix.layer_len(), 0.5);
        }
        let batch = random_batch(&cfg, batch_size, seq, 7);
        let weights = Arc::new(weights);
        eprintln!(
            "timing {name} on {}: B={batch_size} T={seq} P={}, {warmup} warm-up + {steps} steps",
            if cpu { "cpu" } else { "cuda" },
            a.prefix_len
        );
        // The GPU engine is kept concrete to read its memory counters.
        let (timing, mem, device, profile, sim) = if cpu {
            let opts = EngineOptions {
                recompute: a.recompute,
            };
            let mut engine = open_engine_with(weights, Device::Cpu, &opts)?;
            let t = bench_train_steps(engine.as_mut(), &mut prefix, &batch, warmup, steps)
                .with_context(|| format!("bench train {name}"))?;
            (t, None, engine.describe(), None, None)
        } else {
            let mut engine = CudaEngine::new(weights).with_context(|| {
                format!(
                    "bench train {name} needs the GPU engine (--device cpu runs the CPU reference)"
                )
            })?;
            engine.set_recompute(a.recompute);
            // With the optimizer kernels, as in `train --device cuda`.
            let mut wrapped = DeviceOptimEngine::new(engine);
            let t = bench_train_steps(&mut wrapped, &mut prefix, &batch, warmup, steps)
                .with_context(|| format!("bench train {name}"))?;
            // The simulated device's exact counts of one step, a prefill and decoded tokens.
            let sim = crate::bench::sim_step_counts(&mut wrapped, &mut prefix, &batch, 32, 8)
                .with_context(|| format!("bench train {name}: the simulator's counts"))?;
            let describe = wrapped.describe();
            let mut engine = wrapped.engine;
            let profile = if a.profile_steps > 0 {
                Some(
                    profile_steps(&mut engine, &prefix, &batch, a.profile_steps)
                        .with_context(|| format!("bench train {name}: the per-op profile"))?,
                )
            } else {
                None
            };
            let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
            let mem = (
                mib(engine.allocated_bytes()),
                mib(engine.peak_device_memory()),
                engine.loss_scale(),
                engine.overflow_skips(),
            );
            (t, Some(mem), describe, profile, sim)
        };
        let tokens = (batch_size * seq) as f64;
        if a.json {
            let mut row = serde_json::json!({
                "bench": "train", "model": name, "device": device,
                "batch": batch_size, "seq": seq, "prefix": a.prefix_len,
                "warmup": warmup, "steps": steps,
                "step_ms": timing.step_s * 1e3, "forward_ms": timing.forward_s * 1e3,
                "tokens_per_s": tokens / timing.step_s, "loss": timing.last_loss,
                "allocated_mib": null, "peak_device_mib": null,
                "recompute": a.recompute,
            });
            if let Some(p) = &profile {
                row["profile"] = serde_json::to_value(p)?;
            }
            if let Some(c) = &sim {
                row["sim_step"] = c.step.to_json();
                row["sim_prefill"] = c.prefill.to_json();
                row["sim_prefill_tokens"] = c.prompt.into();
                row["sim_decode"] = c.decode.to_json();
                row["sim_decode_tokens"] = c.tokens.into();
            }
            if let Some((alloc, peak, scale, skips)) = mem {
                row["allocated_mib"] = alloc.into();
                row["peak_device_mib"] = peak.into();
                row["loss_scale"] = scale.into();
                row["overflow_skips"] = skips.into();
            }
            println!("{row}");
        } else {
            if std::mem::take(&mut header) {
                println!(
                    "{:<12} {:<5} {:>3} {:>5} {:>3} {:>9} {:>9} {:>10} {:>9} {:>9}",
                    "model",
                    "dev",
                    "B",
                    "T",
                    "P",
                    "step ms",
                    "fwd ms",
                    "tokens/s",
                    "alloc MiB",
                    "peak MiB"
                );
            }
            let (alloc, peak) = match mem {
                Some((a, p, ..)) => (format!("{a:.0}"), format!("{p:.0}")),
                None => ("n/a".into(), "n/a".into()),
            };
            println!(
                "{:<12} {:<5} {:>3} {:>5} {:>3} {:>9.2} {:>9.2} {:>10.0} {:>9} {:>9}",
                name,
                if cpu { "cpu" } else { "cuda" },
                batch_size,
                seq,
                a.prefix_len,
                timing.step_s * 1e3,
                timing.forward_s * 1e3,
                tokens / timing.step_s,
                alloc,
                peak
            );
            if timing.overflow_skips > 0 {
                println!(
                    "  {}: {} of the {} steps skipped for fp16 gradient overflow (no update; \
                     the loss scale was lowered{})",
                    name,
                    timing.overflow_skips,
                    warmup + steps.max(1),
                    mem.map_or(String::new(), |m| format!(" to {}", m.2))
                );
            }
            if let Some(p) = &profile {
                print!("{}", format_profile(&name, p));
            }
            if let Some(c) = &sim {
                println!("  {name} on the simulated device (exact counts):");
                println!("    per training step: {}", c.step.summary(1));
                println!(
                    "    prefill of {} tokens x {batch_size}: {}",
                    c.prompt,
                    c.prefill.summary(1)
                );
                println!(
                    "    per decoded token (x {batch_size} sequences): {}",
                    c.decode.summary(c.tokens)
                );
            }
        }
    }
    if !a.json {
        println!(
            "(step = loss and prefix gradient + AdamW update, median; fwd = loss only; tokens/s = \
             B*T / step; alloc = weights + workspaces; peak = device memory in use as the driver \
             reports it)"
        );
        if crate::cuda::context::simulated() {
            println!(
                "(on the simulated device the times are the simulator's on this CPU, not a GPU's; \
                 the counts are exact{})",
                if crate::cuda::context::simulator_execute() {
                    ""
                } else {
                    "; PTSIM_EXECUTE=0: nothing was computed"
                }
            );
        }
    }
    Ok(())
}

/// The per-op breakdown of a training step (`bench train --device cuda`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StepProfile {
    /// Profiled steps the figures are averaged over.
    pub steps: usize,
    /// Wall time of one profiled step (ms; longer than an unprofiled one: every operation waits
    /// for the device before and after itself).
    pub step_ms: f64,
    /// The categories, most time first.
    pub ops: Vec<OpTime>,
}

/// One category of device operations in [`StepProfile`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OpTime {
    pub op: String,
    /// Milliseconds per step.
    pub ms: f64,
    /// Calls per step.
    pub calls: f64,
    /// Fraction of the profiled step's wall time.
    pub share: f64,
}

impl StepProfile {
    /// From the backend's totals over `steps` steps that took `wall_s` seconds in all.
    pub fn new(totals: &[(&str, f64, u64)], steps: usize, wall_s: f64) -> StepProfile {
        let n = steps.max(1) as f64;
        let step_ms = wall_s * 1e3 / n;
        let mut ops: Vec<OpTime> = totals
            .iter()
            .map(|&(op, secs, calls)| OpTime {
                op: op.to_string(),
                ms: secs * 1e3 / n,
                calls: calls as f64 / n,
                share: if step_ms > 0.0 {
                    secs * 1e3 / n / step_ms
                } else {
                    0.0
                },
            })
            .collect();
        ops.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.op.cmp(&b.op)));
        StepProfile {
            steps,
            step_ms,
            ops,
        }
    }

    /// Milliseconds per step outside the timed operations (host work, launches, transfers).
    pub fn other_ms(&self) -> f64 {
        (self.step_ms - self.ops.iter().map(|o| o.ms).sum::<f64>()).max(0.0)
    }
}

/// Runs `steps` more `loss_and_grad` calls on `engine` with its backend's profiling on.
fn profile_steps(
    engine: &mut CudaEngine,
    prefix: &PrefixBank<f32>,
    batch: &Batch,
    steps: usize,
) -> Result<StepProfile> {
    let opts = RunOptions::default();
    engine.backend_mut().enable_profile();
    let _ = engine.backend_mut().take_profile(); // start from zero
    let t0 = std::time::Instant::now();
    for _ in 0..steps {
        // An fp16 overflow skips the step (the engine lowers its scale); it is no error here.
        if let Err(e) = engine.loss_and_grad(prefix, batch, &opts) {
            e.downcast::<crate::engine::GradOverflow>()?;
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let totals = engine.backend_mut().take_profile();
    Ok(StepProfile::new(&totals, steps, wall))
}

/// The per-op table printed after a model's timing row.
pub fn format_profile(model: &str, p: &StepProfile) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "  per-op time of {model} (mean of {} profiled steps of {:.2} ms; loss and prefix \
         gradient, each op synchronised):",
        p.steps, p.step_ms
    );
    let _ = writeln!(
        s,
        "  {:<28} {:>9} {:>7} {:>8}",
        "op", "ms/step", "share", "calls"
    );
    for o in &p.ops {
        let _ = writeln!(
            s,
            "  {:<28} {:>9.3} {:>6.1}% {:>8.1}",
            o.op,
            o.ms,
            100.0 * o.share,
            o.calls
        );
    }
    let other = p.other_ms();
    let share = if p.step_ms > 0.0 {
        other / p.step_ms
    } else {
        0.0
    };
    let _ = writeln!(
        s,
        "  {:<28} {:>9.3} {:>6.1}%",
        "(host, launches, other)",
        other,
        100.0 * share
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_averages_per_step_and_sorts_by_time() {
        // Three steps of 30 ms: 45 ms of gemm in 60 calls, 15 ms of attention in 6.
        let totals = [("attention fwd", 0.015, 6), ("gemm", 0.045, 60)];
        let p = StepProfile::new(&totals, 3, 0.090);
        assert_eq!(p.steps, 3);
        assert!((p.step_ms - 30.0).abs() < 1e-9);
        assert_eq!(p.ops[0].op, "gemm");
        assert!((p.ops[0].ms - 15.0).abs() < 1e-9);
        assert!((p.ops[0].calls - 20.0).abs() < 1e-9);
        assert!((p.ops[0].share - 0.5).abs() < 1e-9);
        assert_eq!(p.ops[1].op, "attention fwd");
        assert!((p.ops[1].ms - 5.0).abs() < 1e-9);
        assert!((p.other_ms() - 10.0).abs() < 1e-9);

        let table = format_profile("tiny", &p);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5, "{table}");
        assert!(lines[0].contains("tiny") && lines[0].contains("3 profiled steps"));
        assert!(lines[2].contains("gemm") && lines[2].contains("15.000"));
        assert!(lines[2].contains("50.0%") && lines[2].contains("20.0"));
        assert!(lines[3].contains("attention fwd") && lines[3].contains("5.000"));
        assert!(lines[4].contains("10.000") && lines[4].contains("33.3%"));

        let j = serde_json::to_value(&p).unwrap();
        assert_eq!(j["ops"][0]["op"], "gemm");
        assert_eq!(j["ops"][1]["calls"], 2.0);
    }

    #[test]
    fn profile_of_no_steps_does_not_divide_by_zero() {
        let p = StepProfile::new(&[("gemm", 0.0, 0)], 0, 0.0);
        assert!(p.ops[0].share == 0.0 && p.other_ms() == 0.0);
        assert!(format_profile("m", &p).contains("0.0%"));
    }
}
