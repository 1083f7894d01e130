//! One CPU training step (`loss_and_grad`: forward + prefix-only backward) in f32 with random
//! weights: at SmolLM2-135M shapes (B=4, T=128, P=10, two prefixes) and at a tiny shape.
//! A loss-only forward at SmolLM2 shapes is timed too, for the backward's share.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use prefix_tune::model::config::{Arch, ModelConfig, ModelWeights};
use prefix_tune::prefix::PrefixBank;
use prefix_tune::reference::model::{loss, loss_and_grad, Batch, RunOptions};
use prefix_tune::reference::testing::{
    random_bank, random_batch, random_model, smollm2_135m_config, tiny_config,
};

fn setup(
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    prefix: usize,
) -> (ModelWeights<f32>, PrefixBank<f32>, Batch) {
    // Scaled like a trained model so activations stay O(1) through 30 layers.
    let std = 0.02;
    let m: ModelWeights<f32> = random_model(cfg, std, 1).cast();
    let bank: PrefixBank<f32> = random_bank(cfg, 2, prefix, 0.5, 2).cast();
    let mut batch = random_batch(cfg, batch, seq, 2, 3);
    // Full-length sequences: the benchmark shape is the whole B×T.
    let b = batch.batch;
    batch.valid_len = vec![seq; b];
    (m, bank, batch)
}

fn bench_train_step(c: &mut Criterion) {
    let opts = RunOptions::default();
    let mut group = c.benchmark_group("cpu_train");
    group.sample_size(10);

    let tiny = tiny_config(Arch::Llama, false);
    let (m, bank, batch) = setup(&tiny, 4, 16, 4);
    group.bench_function("tiny_llama_step_B4_T16_P4", |b| {
        b.iter(|| black_box(loss_and_grad(&m, &bank, &batch, &opts)))
    });

    let cfg = smollm2_135m_config();
    let (m, bank, batch) = setup(&cfg, 4, 128, 10);
    group.bench_function("smollm2_135m_forward_B4_T128_P10", |b| {
        b.iter(|| black_box(loss(&m, Some(&bank), &batch, &opts)))
    });
    group.bench_function("smollm2_135m_step_B4_T128_P10", |b| {
        b.iter(|| black_box(loss_and_grad(&m, &bank, &batch, &opts)))
    });
    group.finish();
}

criterion_group!(benches, bench_train_step);
criterion_main!(benches);
