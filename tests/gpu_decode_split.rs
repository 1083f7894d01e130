//! The KV-cache decode attention on the GPU (`kernels/decode_attention.cu` through
//! `prefix_tune::cuda::decode::forward`) against `reference::attention` in f64 with the cache as
//! the prefix: the split-KV kernels for head dims 32, 64, 128 and 256 (one split, several splits
//! with a combine pass, splits past a sequence's keys, GQA groups sharing a K/V load, row groups
//! of several tokens, a cache entry count off every split edge, an empty cache) and the
//! one-warp-per-row kernel for a head dim that is not a multiple of 8. Outputs are poisoned with
//! NaN before each launch; padded rows must come back as zeros.
//!
//! Without a usable GPU the tests print SKIPPED and pass; with `PREFIX_TUNE_REQUIRE_GPU=1` they
//! fail instead.

mod common;

use half::f16;
use prefix_tune::cuda::decode::{self as dec, DecodeBufs, DecodeShape};
use prefix_tune::reference::attention::{self, AttnInputs, AttnShape};
use prefix_tune::reference::real::rel_err;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn randn(rng: &mut StdRng, n: usize) -> Vec<f16> {
    (0..n)
        .map(|_| f16::from_f32(rng.sample::<f32, _>(StandardNormal)))
        .collect()
}

/// `[B, H, L, D]` → sequence `b`'s `[H, n, D]` (its first `n` entries), widened.
fn seq_part(x: &[f16], b: usize, heads: usize, len: usize, n: usize, d: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(heads * n * d);
    for h in 0..heads {
        let at = (b * heads + h) * len * d;
        out.extend(x[at..at + n * d].iter().map(|v| v.to_f64()));
    }
    out
}

struct Case {
    shape: DecodeShape,
    past: Vec<i32>,
    n_new: Vec<i32>,
}

fn run(g: &prefix_tune::cuda::GpuContext, c: &Case, seed: u64) -> f64 {
    let s = c.shape;
    let plan = dec::split_plan(&s).expect("plan");
    println!(
        "case {s:?} past {:?} new {:?}: {}",
        c.past,
        c.n_new,
        match plan {
            Some(p) => format!(
                "{} x {} splits of {} keys",
                p.kernel, p.n_splits, p.keys_per_split
            ),
            None => "pt_decode_attention (one warp per row)".into(),
        }
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let q = randn(&mut rng, s.q_len());
    let k_new = randn(&mut rng, s.new_kv_len());
    let v_new = randn(&mut rng, s.new_kv_len());
    let cache_k = randn(&mut rng, s.cache_len().max(1));
    let cache_v = randn(&mut rng, s.cache_len().max(1));
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    dec::check_lengths(&s, &c.past, &c.n_new).expect("lengths");
    let up = |x: &[f16]| g.stream().clone_htod(x).expect("upload");
    let up_i = |x: &[i32]| g.stream().clone_htod(x).expect("upload");
    let (dq, dkn, dvn, dck, dcv) = (up(&q), up(&k_new), up(&v_new), up(&cache_k), up(&cache_v));
    let (dpast, dnew) = (up_i(&c.past), up_i(&c.n_new));
    let mut o = up(&vec![f16::NAN; s.q_len()]);
    let bufs = DecodeBufs {
        q: &dq,
        k_new: &dkn,
        v_new: &dvn,
        cache_k: &dck,
        cache_v: &dcv,
    };
    dec::forward(g, &s, scale, &bufs, &dpast, &dnew, &mut o).expect("decode attention");
    g.synchronize().expect("decode attention ran");
    let o: Vec<f16> = g.stream().clone_dtoh(&o).expect("download");
    let (t_max, d) = (s.n_new, s.head_dim);
    let mut worst = 0.0f64;
    for b in 0..s.batch {
        let (p, n) = (c.past[b] as usize, c.n_new[b] as usize);
        for h in 0..s.q_heads {
            let at = (b * s.q_heads + h) * t_max * d;
            let pad = &o[at + n * d..at + t_max * d];
            assert!(
                pad.iter().all(|x| x.to_f32() == 0.0),
                "sequence {b} head {h}: padded rows not zero"
            );
        }
        if n == 0 {
            continue;
        }
        let shape = AttnShape {
            batch: 1,
            q_heads: s.q_heads,
            kv_heads: s.kv_heads,
            seq: n,
            prefix: p,
            head_dim: d,
            n_prefixes: 1,
        };
        let qb = seq_part(&q, b, s.q_heads, t_max, n, d);
        let kb = seq_part(&k_new, b, s.kv_heads, t_max, n, d);
        let vb = seq_part(&v_new, b, s.kv_heads, t_max, n, d);
        let pk = seq_part(&cache_k, b, s.kv_heads, s.capacity, p, d);
        let pv = seq_part(&cache_v, b, s.kv_heads, s.capacity, p, d);
        let inputs = AttnInputs {
            q: &qb,
            k: &kb,
            v: &vb,
            prefix_k: &pk,
            prefix_v: &pv,
            prefix_index: &[0],
            valid_len: &[n],
            scale: 1.0 / (d as f64).sqrt(),
        };
        let (want, _) = attention::forward(&shape, &inputs);
        let got = seq_part(&o, b, s.q_heads, t_max, n, d);
        assert!(
            got.iter().all(|x| x.is_finite()),
            "sequence {b}: unwritten (NaN) or non-finite output"
        );
        let e = rel_err(&got, &want);
        println!("    sequence {b} (past {p}, {n} new): rel err {e:.2e}");
        assert!(
            e <= 2e-3,
            "sequence {b} (past {p}, {n} new): rel err {e:.2e}"
        );
        worst = worst.max(e);
    }
    worst
}

#[allow(clippy::too_many_arguments)]
fn case(
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    n_new: usize,
    capacity: usize,
    past: &[i32],
    new: &[i32],
) -> Case {
    Case {
        shape: DecodeShape {
            batch,
            q_heads,
            kv_heads,
            head_dim,
            n_new,
            capacity,
        },
        past: past.to_vec(),
        n_new: new.to_vec(),
    }
}

#[test]
fn gpu_decode_attention_matches_reference() {
    let test = "gpu_decode_attention_matches_reference";
    let Some(g) = common::gpu_or_skip(test) else {
        return;
    };
    let cases = [
        // SmolLM2's heads, one token each, caches past several 64-key splits (one beyond the
        // longest sequence's keys, one sequence with an empty cache).
        case(3, 9, 3, 64, 1, 300, &[300, 0, 131], &[1, 1, 1]),
        // A prefill-like row block (5 tokens) next to single tokens; GQA 2 over two row groups.
        case(3, 4, 2, 128, 5, 13, &[7, 0, 13], &[1, 5, 3]),
        // Head dim 32 (half the lanes of a 64-wide key group idle), MHA, one split.
        case(2, 2, 2, 32, 3, 20, &[20, 5], &[3, 0]),
        // Head dim 256: 32 lanes per key; several splits; GQA 4 (one row group per token).
        case(1, 4, 1, 256, 2, 200, &[190], &[2]),
        // Head dim 96 (12 of 16 lanes), GQA 3 with two tokens: rows of two heads' groups.
        case(2, 6, 2, 96, 2, 150, &[150, 64], &[2, 1]),
        // Not a multiple of 8: the one-warp-per-row kernel.
        case(2, 2, 1, 36, 2, 9, &[9, 3], &[2, 1]),
    ];
    let mut worst = 0.0f64;
    for (i, c) in cases.iter().enumerate() {
        worst = worst.max(run(&g, c, 7 + i as u64));
    }
    println!(
        "RESULT {test}: {} cases, worst relative error {worst:.2e}",
        cases.len()
    );
}
