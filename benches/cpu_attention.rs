//! CPU attention benchmarks at SmolLM2-135M shapes (B=4, Hq=9, Hkv=3, T=128, P=10, D=64):
//! the plain reference and the blockwise (kernel-shaped) version, forward and backward, f32.
//!
//! For scale, `layer_gemms` times the projection GEMMs of one SmolLM2 layer's forward at the same
//! batch (q, k, v, o, gate, up, down on 512 tokens): attention should be a small fraction of it.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use prefix_tune::reference::attention::{self as plain, AttnInputs, AttnShape};
use prefix_tune::reference::blockwise::{self, BlockSizes};
use prefix_tune::reference::real::{matmul, Trans};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

const SHAPE: AttnShape = AttnShape {
    batch: 4,
    q_heads: 9,
    kv_heads: 3,
    seq: 128,
    prefix: 10,
    head_dim: 64,
    n_prefixes: 2,
};

fn normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

fn bench_attention(c: &mut Criterion) {
    let s = SHAPE;
    let mut rng = StdRng::seed_from_u64(7);
    let (q, k, v) = (
        normal(&mut rng, s.q_len()),
        normal(&mut rng, s.kv_len()),
        normal(&mut rng, s.kv_len()),
    );
    let (pk, pv) = (
        normal(&mut rng, s.bank_len()),
        normal(&mut rng, s.bank_len()),
    );
    let d_o = normal(&mut rng, s.q_len());
    let prefix_index = [0, 1, 0, 1];
    let valid_len = [128, 128, 100, 77];
    let inp = AttnInputs {
        q: &q,
        k: &k,
        v: &v,
        prefix_k: &pk,
        prefix_v: &pv,
        prefix_index: &prefix_index,
        valid_len: &valid_len,
        scale: 1.0 / (s.head_dim as f32).sqrt(),
    };
    let bs = BlockSizes::DEFAULT;
    let (o, lse) = plain::forward(&s, &inp);

    let mut g = c.benchmark_group("attention_smollm2");
    g.sample_size(10);
    g.bench_function("plain_forward", |bch| {
        bch.iter(|| black_box(plain::forward(&s, black_box(&inp))))
    });
    g.bench_function("plain_backward", |bch| {
        bch.iter(|| black_box(plain::backward(&s, black_box(&inp), &o, &lse, &d_o)))
    });
    g.bench_function("blockwise_forward", |bch| {
        bch.iter(|| black_box(blockwise::forward(&s, black_box(&inp), bs)))
    });
    g.bench_function("blockwise_backward", |bch| {
        bch.iter(|| black_box(blockwise::backward(&s, black_box(&inp), &o, &lse, &d_o, bs)))
    });

    // One layer's projection GEMMs (forward) on the same 512 tokens, for scale.
    let (n_tok, hidden, kv_dim, inter) = (4 * 128, 576, 192, 1536);
    let x = normal(&mut rng, n_tok * inter);
    let w = normal(&mut rng, hidden * inter);
    let mut y = vec![0.0f32; n_tok * inter];
    g.bench_function("layer_gemms", |bch| {
        bch.iter(|| {
            for (n, kk) in [
                (hidden, hidden), // q
                (kv_dim, hidden), // k
                (kv_dim, hidden), // v
                (hidden, hidden), // o
                (inter, hidden),  // gate
                (inter, hidden),  // up
                (hidden, inter),  // down
            ] {
                matmul(n_tok, n, kk, &x, Trans::No, &w, Trans::Yes, &mut y, false);
            }
            black_box(&y);
        })
    });
    g.finish();
}

criterion_group!(benches, bench_attention);
criterion_main!(benches);
