//! The GPU engine on the real SmolLM2-135M-Instruct weights (all 30 layers), against the CPU
//! reference: the fp16 numerics of a real model
//! (its activation outliers, its 49152-word head) rather than random weights.
//!
//! - loss and prefix gradient of a two-prefix batch of chat prompt/answer pairs;
//! - greedy generation (the fused-kernel prefill, then KV-cache decode steps) for a batch
//!   mixing a prefixed request and one without a prefix.
//!
//! Runs on GPU 0 through `prefix_tune::cuda::host` / the GPU engine: a real card, or the
//! simulated CUDA device (`scripts/sim`, which CI uses). Skips with a visible message without
//! one; fails instead with `PREFIX_TUNE_REQUIRE_GPU=1`.
//! Skips visibly without the GGUF in the cache (`scripts/setup`).

mod common;

use std::sync::Arc;

use common::{host_gpu_or_skip, smollm2};
use prefix_tune::cuda::engine::CudaEngine;
use prefix_tune::engine::{CpuEngine, Engine, GradOverflow};
use prefix_tune::model::config::ModelWeights;
use prefix_tune::model::LoadedModel;
use prefix_tune::prefix::PrefixBank;
use prefix_tune::reference::model::{Batch, RunOptions};
use prefix_tune::reference::real::rel_err;

/// The engine tolerances of the GPU issue: loss, gradient (relative norm error and cosine).
const LOSS_TOL: f64 = 1e-2;
const GRAD_REL_TOL: f64 = 2e-2;
const GRAD_COS_MIN: f64 = 0.999;

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

/// The model with fp16-rounded weights (what the GPU engine holds) and two prefixes
/// initialized from real words (Li & Liang's initialization, the demo's choice), rounded to
/// fp16 so both engines see the same numbers.
///
/// Real words rather than a random bank: Li & Liang's initialization and the closer case (within
/// 0.5 %; from random prefixes the gradient error is ~1.5 %, see `random_prefix_gradient_error`).
fn setup(m: &LoadedModel) -> (Arc<ModelWeights<f32>>, PrefixBank<f32>) {
    let w = Arc::new(m.weights.clone().rounded_to_f16());
    let texts = [
        "Describe the restaurant in one sentence:",
        "Answer with a number only:",
    ];
    let bank = common::real_word_bank(&w, &texts.map(|t| encode(m, t)));
    (w, bank)
}

fn encode(m: &LoadedModel, s: &str) -> Vec<u32> {
    m.tokenizer
        .encode(s)
        .unwrap_or_else(|e| panic!("encoding {s:?}: {e:#}"))
}

/// Loss and prefix gradient of the GPU engine and the CPU reference on a two-prefix batch of chat
/// pairs: (loss rel err, gradient rel err, cosine, gradient rel err had the reduced gradient been
/// rounded to fp16 at the loss scale, as the kernel did before it wrote fp32).
fn loss_and_gradient_errors(
    m: &LoadedModel,
    w: Arc<ModelWeights<f32>>,
    bank: &PrefixBank<f32>,
) -> (f64, f64, f64, f64) {
    let pairs = [
        (
            "<|im_start|>user\nDescribe a restaurant called The Eagle.<|im_end|>\n\
             <|im_start|>assistant\n",
            "The Eagle is a family-friendly coffee shop near Burger King, serving cheap \
             Italian food.",
        ),
        (
            "<|im_start|>user\nAdd 17 and 25.<|im_end|>\n<|im_start|>assistant\n",
            "17 + 25 = 42.",
        ),
    ]
    .map(|(i, o)| (encode(m, i), encode(m, o)));
    let eos = m.tokenizer.eos_token_ids().first().copied();
    let batch = Batch::from_pairs(&pairs, eos, eos.unwrap_or(0)).with_prefix_index(vec![1, 0]);
    let opts = RunOptions::default();
    let mut gpu = CudaEngine::new(w.clone()).unwrap();
    let mut cpu = CpuEngine::new(w);
    let (want, want_g) = cpu.loss_and_grad(bank, &batch, &opts).unwrap();
    let mut overflows = 0;
    let (got, got_g) = loop {
        match gpu.loss_and_grad(bank, &batch, &opts) {
            Ok(r) => break r,
            Err(e) if e.is::<GradOverflow>() && overflows < 8 => {
                println!("  {e}");
                overflows += 1;
            }
            Err(e) => panic!("GPU engine: {e:#}"),
        }
    };
    let loss_err = rel_err(&f64s(&got.loss_sum), &f64s(&want.loss_sum));
    let (g, wg) = (f64s(&got_g.to_flat()), f64s(&want_g.to_flat()));
    assert!(g.iter().all(|x| x.is_finite()), "non-finite gradient");
    let grad_err = rel_err(&g, &wg);
    let cos = cosine(&g, &wg);
    let scale = gpu.loss_scale() as f64;
    let g16: Vec<f64> = g
        .iter()
        .map(|&x| half::f16::from_f64(x * scale).to_f64() / scale)
        .collect();
    let grad_err_f16 = rel_err(&g16, &wg);
    println!(
        "  B=2 T={} P={}: mean loss gpu {:.5} CPU {:.5}; loss rel err {loss_err:.2e}; prefix \
         grad rel err {grad_err:.2e}, cosine {cos:.6}; {overflows} overflow(s), loss scale {}",
        batch.seq,
        bank.len,
        got.mean_loss,
        want.mean_loss,
        gpu.loss_scale()
    );
    (loss_err, grad_err, cos, grad_err_f16)
}

#[test]
fn real_weights_loss_and_gradient() {
    let test = "real_weights_loss_and_gradient";
    if !host_gpu_or_skip(test) {
        return;
    }
    let Some(m) = smollm2(test) else { return };
    let (w, bank) = setup(m);
    let (loss_err, grad_err, cos, _) = loss_and_gradient_errors(m, w, &bank);
    assert!(loss_err <= LOSS_TOL, "loss rel err {loss_err:.3e}");
    assert!(grad_err <= GRAD_REL_TOL, "gradient rel err {grad_err:.3e}");
    assert!(cos >= GRAD_COS_MIN, "gradient cosine {cos:.6}");
    println!(
        "RESULT gpu_smollm2/{test}: 1 cases, worst relative error {:.2e}",
        loss_err.max(grad_err)
    );
}

/// A measurement, not a check (the README's fp16 finding): the GPU engine's prefix-gradient
/// error against the f32 reference from random prefixes of std 1 (`train`'s default init), 0.5
/// and 0.1, rounded to fp16 for both. Run by hand:
/// `scripts/sim cargo test --release --test gpu_smollm2 -- --ignored --nocapture random_prefix`.
#[test]
#[ignore = "a measurement (prints the errors); run by hand"]
fn random_prefix_gradient_error() {
    let test = "random_prefix_gradient_error";
    if !host_gpu_or_skip(test) {
        return;
    }
    let Some(m) = smollm2(test) else { return };
    let w = Arc::new(m.weights.clone().rounded_to_f16());
    let c = &w.config;
    for std in [1.0, 0.5, 0.1] {
        let mut bank =
            PrefixBank::<f32>::random(2, c.n_layers, c.n_kv_heads, 10, c.head_dim, std, 7);
        for v in bank.k.iter_mut().chain(bank.v.iter_mut()) {
            v.iter_mut()
                .for_each(|x| *x = half::f16::from_f32(*x).to_f32());
        }
        let (loss_err, grad_err, cos, grad_err_f16) = loss_and_gradient_errors(m, w.clone(), &bank);
        println!(
            "RESULT gpu_smollm2/{test}: std {std}: loss rel err {loss_err:.2e}, gradient rel err \
             {grad_err:.3e} (rounded to fp16 as before: {grad_err_f16:.3e}), cosine {cos:.6}"
        );
    }
}

#[test]
fn real_weights_greedy_generation() {
    let test = "real_weights_greedy_generation";
    if !host_gpu_or_skip(test) {
        return;
    }
    let Some(m) = smollm2(test) else { return };
    let (w, bank) = setup(m);
    let vocab = w.config.vocab_size;
    let opts = RunOptions::default();
    let mut gpu = CudaEngine::new(w.clone()).unwrap();
    let mut cpu = CpuEngine::new(w);
    // A prefixed request and one without a prefix, prompts of different lengths.
    let index = [Some(1), None];
    let mut ge = gpu.begin_decode(Some(&bank), &index, &opts).unwrap();
    let mut ce = cpu.begin_decode(Some(&bank), &index, &opts).unwrap();
    let mut feed = vec![
        encode(m, "The capital of France is"),
        encode(
            m,
            "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
        ),
    ];
    let argmax = |x: &[f32]| (0..x.len()).max_by(|&a, &b| x[a].total_cmp(&x[b])).unwrap() as u32;
    let mut worst = 0.0f64;
    let mut texts = vec![Vec::new(); 2];
    for step in 0..8 {
        let want = cpu.decode(ce.as_mut(), &feed).unwrap();
        let got = gpu.decode(ge.as_mut(), &feed).unwrap();
        assert!(
            got.iter().all(|x| x.is_finite()),
            "step {step}: non-finite logits"
        );
        let e = rel_err(&f64s(&got), &f64s(&want));
        worst = worst.max(e);
        assert!(e <= LOSS_TOL, "step {step}: logits rel err {e:.3e}");
        feed = (0..2)
            .map(|b| {
                let (g, c) = (
                    argmax(&got[b * vocab..(b + 1) * vocab]),
                    argmax(&want[b * vocab..(b + 1) * vocab]),
                );
                assert_eq!(g, c, "step {step}, request {b}: greedy tokens differ");
                texts[b].push(c);
                vec![c]
            })
            .collect();
    }
    for (b, t) in texts.iter().enumerate() {
        println!(
            "  request {b}: {:?}",
            m.tokenizer.decode(t).unwrap_or_default()
        );
    }
    println!("RESULT gpu_smollm2/{test}: 8 cases, worst relative error {worst:.2e}");
}
