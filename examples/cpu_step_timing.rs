//! Times one CPU prefix-tuning step (`loss_and_grad`: forward + prefix-only backward, f32) on the
//! real SmolLM2-135M-Instruct GGUF, at the shape of `tools/bench/torch_cpu_step.py` (PyTorch + PEFT):
//! a batch of B×T random tokens, every next token a target, one prefix of P virtual tokens.
//! Prints one JSON line. See BENCHMARKS.md; `tools/bench/cpu_vs_torch` runs it interleaved with
//! PyTorch.
//!
//! `cargo run --release --example cpu_step_timing -- [B T P warmup steps]` (defaults 4 128 10 1 5)
//!
//! `cargo run --release --example cpu_step_timing -- generate B prompt new P [reps]`: greedy
//! decoding of `new` tokens after a random prompt of `prompt` tokens, B sequences together, with a
//! random prefix of P (the KV-cache engine `generate` uses; EOS ignored so every run decodes `new`
//! tokens); reports the median over `reps` runs after one warm-up.

use std::time::Instant;

use anyhow::{Context, Result};
use prefix_tune::assets::smollm2_gguf_path;
use prefix_tune::model::load_model;
use prefix_tune::prefix::PrefixBank;
use prefix_tune::reference::model::{loss, loss_and_grad, Batch, RunOptions};
use rand::{Rng, SeedableRng};

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some("generate") {
        return generate_timing();
    }
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse()
                .context("arguments are integers: B T P warmup steps")
        })
        .collect::<Result<_>>()?;
    let arg = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (b, t, p, warmup, steps) = (arg(0, 4), arg(1, 128), arg(2, 10), arg(3, 1), arg(4, 5));

    let path = smollm2_gguf_path();
    let model = load_model(&path).with_context(|| format!("loading {}", path.display()))?;
    let m = &model.weights;
    let c = &m.config;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let tokens: Vec<u32> = (0..b * t)
        .map(|_| rng.random_range(0..c.vocab_size as u32))
        .collect();
    // HF's labels = input_ids: position t predicts token t+1, for t < T-1.
    let labels: Vec<Option<u32>> = (0..b * t)
        .map(|r| (r % t + 1 < t).then(|| tokens[r + 1]))
        .collect();
    let batch = Batch {
        batch: b,
        seq: t,
        tokens,
        labels,
        valid_len: vec![t; b],
        prefix_index: vec![0; b],
    };
    let bank = PrefixBank::<f32>::random(1, c.n_layers, c.n_kv_heads, p, c.head_dim, 0.5, 1);
    let opts = RunOptions::default();

    let time = |f: &dyn Fn()| {
        for _ in 0..warmup {
            f();
        }
        let mut v: Vec<f64> = (0..steps)
            .map(|_| {
                let t0 = Instant::now();
                f();
                t0.elapsed().as_secs_f64()
            })
            .collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (v[v.len() / 2], v[0])
    };
    let (fwd_med, fwd_min) = time(&|| {
        std::hint::black_box(loss(m, Some(&bank), &batch, &opts));
    });
    let (step_med, step_min) = time(&|| {
        std::hint::black_box(loss_and_grad(m, &bank, &batch, &opts));
    });
    println!(
        "{{\"impl\": \"prefix-tune reference\", \"threads\": {}, \"batch\": {b}, \"seq\": {t}, \"prefix\": {p}, \"steps\": {steps}, \"forward_median_s\": {fwd_med:.4}, \"forward_min_s\": {fwd_min:.4}, \"median_s\": {step_med:.4}, \"min_s\": {step_min:.4}, \"tokens_per_s\": {:.1}}}",
        rayon::current_num_threads(),
        (b * t) as f64 / step_med
    );
    Ok(())
}

/// `generate B prompt new P [reps]`: greedy tokens/s of the CPU engine with a prefix.
fn generate_timing() -> Result<()> {
    use prefix_tune::devices::open_engine;
    use prefix_tune::engine::Device;
    use prefix_tune::generate::{generate, GenerateOptions, Request, Strategy};
    use std::sync::Arc;

    let args: Vec<usize> = std::env::args()
        .skip(2)
        .map(|a| {
            a.parse()
                .context("arguments are integers: B prompt new P [reps]")
        })
        .collect::<Result<_>>()?;
    let arg = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (b, prompt, new, p, reps) = (arg(0, 1), arg(1, 32), arg(2, 32), arg(3, 10), arg(4, 3));
    let path = smollm2_gguf_path();
    let model = load_model(&path).with_context(|| format!("loading {}", path.display()))?;
    let c = model.weights.config.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let requests: Vec<Request> = (0..b)
        .map(|_| Request {
            prompt: (0..prompt)
                .map(|_| rng.random_range(0..c.vocab_size as u32))
                .collect(),
            prefix: Some(0),
        })
        .collect();
    let bank = PrefixBank::<f32>::random(1, c.n_layers, c.n_kv_heads, p, c.head_dim, 0.5, 1);
    let mut engine = open_engine(Arc::new(model.weights), Device::Cpu)?;
    let opts = GenerateOptions {
        max_new_tokens: new,
        strategy: Strategy::Greedy,
        eos: Vec::new(),
        run: RunOptions::default(),
        batch_size: b,
    };
    let mut once = || -> Result<f64> {
        let t0 = Instant::now();
        let out = generate(engine.as_mut(), Some(&bank), &requests, &opts)?;
        let dt = t0.elapsed().as_secs_f64();
        anyhow::ensure!(
            out.iter().all(|g| g.tokens.len() == new),
            "a sequence stopped early"
        );
        Ok(dt)
    };
    once()?;
    let mut v: Vec<f64> = (0..reps.max(1)).map(|_| once()).collect::<Result<_>>()?;
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = v[v.len() / 2];
    println!(
        "{{\"impl\": \"prefix-tune reference\", \"mode\": \"generate\", \"threads\": {}, \"batch\": {b}, \"prompt\": {prompt}, \"new\": {new}, \"prefix\": {p}, \"reps\": {}, \"median_s\": {med:.4}, \"min_s\": {:.4}, \"tokens_per_s\": {:.1}}}",
        rayon::current_num_threads(),
        v.len(),
        v[0],
        (b * new) as f64 / med
    );
    Ok(())
}
