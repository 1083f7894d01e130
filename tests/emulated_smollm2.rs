//! The GPU engine's code on the real SmolLM2-135M-Instruct weights, run through the host
//! emulation of its kernels, against the CPU reference: the fp16 numerics of a real model
//! (its activation outliers, its 49152-word head) rather than random weights.
//!
//! - loss and prefix gradient of a two-prefix batch of chat prompt/answer pairs;
//! - greedy generation (the fused-kernel prefill, then KV-cache decode steps) for a batch
//!   mixing a prefixed request and one without a prefix.
//!
//! Skips visibly without the emulation or without the GGUF in the cache (`scripts/setup`).

mod common;

use std::sync::Arc;

use common::{emulation_or_skip, smollm2};
use prefix_tune::emu::backend::EmuEngine;
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
/// Not a random bank: with random prefix keys/values the prefix gradient of this 30-layer model
/// is ill-conditioned, for any fp16 engine. Measured 2026-11-26 (std-1 prefixes, `train`'s
/// random init): rounding only the queries to fp16 inside the f32 reference moves its gradient
/// by 86 % (the attention outputs: 53 %; layers 0-1 worst, layer 29 under 1 %), and this
/// engine's emulation is off by 56 %; with std 0.5, 9 %; with std 0.1, 0.6 %. Real-word
/// prefixes keep every layer within 0.5 %.
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

#[test]
fn real_weights_loss_and_gradient() {
    let test = "real_weights_loss_and_gradient";
    if !emulation_or_skip(test) {
        return;
    }
    let Some(m) = smollm2(test) else { return };
    let (w, bank) = setup(m);
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
    let mut emu = EmuEngine::new_emulated(w.clone()).unwrap();
    let mut cpu = CpuEngine::new(w);
    let (want, want_g) = cpu.loss_and_grad(&bank, &batch, &opts).unwrap();
    let mut overflows = 0;
    let (got, got_g) = loop {
        match emu.loss_and_grad(&bank, &batch, &opts) {
            Ok(r) => break r,
            Err(e) if e.is::<GradOverflow>() && overflows < 8 => {
                println!("  {e}");
                overflows += 1;
            }
            Err(e) => panic!("emulated engine: {e:#}"),
        }
    };
    let loss_err = rel_err(&f64s(&got.loss_sum), &f64s(&want.loss_sum));
    let (g, wg) = (f64s(&got_g.to_flat()), f64s(&want_g.to_flat()));
    assert!(g.iter().all(|x| x.is_finite()), "non-finite gradient");
    let grad_err = rel_err(&g, &wg);
    let cos = cosine(&g, &wg);
    println!(
        "  B=2 T={} P={}: mean loss emu {:.5} CPU {:.5}; loss rel err {loss_err:.2e}; prefix \
         grad rel err {grad_err:.2e}, cosine {cos:.6}; {overflows} overflow(s), loss scale {}",
        batch.seq,
        bank.len,
        got.mean_loss,
        want.mean_loss,
        emu.loss_scale()
    );
    assert!(loss_err <= LOSS_TOL, "loss rel err {loss_err:.3e}");
    assert!(grad_err <= GRAD_REL_TOL, "gradient rel err {grad_err:.3e}");
    assert!(cos >= GRAD_COS_MIN, "gradient cosine {cos:.6}");
    println!(
        "RESULT emulated_smollm2/{test}: 1 cases, worst relative error {:.2e}",
        loss_err.max(grad_err)
    );
}

#[test]
fn real_weights_greedy_generation() {
    let test = "real_weights_greedy_generation";
    if !emulation_or_skip(test) {
        return;
    }
    let Some(m) = smollm2(test) else { return };
    let (w, bank) = setup(m);
    let vocab = w.config.vocab_size;
    let opts = RunOptions::default();
    let mut emu = EmuEngine::new_emulated(w.clone()).unwrap();
    let mut cpu = CpuEngine::new(w);
    // A prefixed request and one without a prefix, prompts of different lengths.
    let index = [Some(1), None];
    let mut ge = emu.begin_decode(Some(&bank), &index, &opts).unwrap();
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
        let got = emu.decode(ge.as_mut(), &feed).unwrap();
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
    println!("RESULT emulated_smollm2/{test}: 8 cases, worst relative error {worst:.2e}");
}
