//! The KV-cache decoding of the GPU engine.
//!
//! - The decode-attention kernel alone (`kernels/decode_attention.cu`) against
//!   `reference::attention` in f64 with the cache as the prefix: uneven cache lengths (one
//!   empty), uneven new-token counts (a prefill-like row block and single tokens), GQA, padded
//!   rows written as zeros, poisoned (NaN) outputs.
//! - The GPU engine's KV-cache decoding against the CPU reference decoding
//!   (`reference/decode.rs`) step by step: see the engine tests below.
//!
//! Runs on GPU 0 through `prefix_tune::cuda::host` / the GPU engine: a real card, or the
//! simulated CUDA device (`scripts/sim`, which CI uses). Skips with a visible message without
//! one; fails instead with `PREFIX_TUNE_REQUIRE_GPU=1`.

mod common;

use std::sync::Arc;

use common::host_gpu_or_skip;
use half::f16;
use prefix_tune::cuda::decode::{DecodeBufs, DecodeShape};
use prefix_tune::cuda::engine::CudaEngine;
use prefix_tune::cuda::host;
use prefix_tune::engine::{CpuEngine, DecodeCache, Engine};
use prefix_tune::model::config::{Arch, ModelConfig, ModelWeights};
use prefix_tune::prefix::PrefixBank;
use prefix_tune::reference::attention::{self, AttnInputs, AttnShape};
use prefix_tune::reference::model::{Positions, RunOptions};
use prefix_tune::reference::real::rel_err;
use prefix_tune::reference::testing::{random_bank, random_model, random_vec, tiny_config};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Logits tolerance of the engine against the reference (fp16 weights and activations).
const LOGITS_TOL: f64 = 1e-2;

fn halves(rng: &mut StdRng, n: usize) -> Vec<f16> {
    random_vec(rng, n, 1.0)
        .into_iter()
        .map(f16::from_f64)
        .collect()
}

fn f64s(x: &[f16]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

/// `[B, H, L, D]` → sequence `b`'s `[H, n, D]` (its first `n` entries).
fn seq_part(x: &[f16], b: usize, heads: usize, len: usize, n: usize, d: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(heads * n * d);
    for h in 0..heads {
        let at = (b * heads + h) * len * d;
        out.extend(f64s(&x[at..at + n * d]));
    }
    out
}

#[test]
fn decode_attention_kernel_matches_reference() {
    if !host_gpu_or_skip("decode_attention_kernel_matches_reference") {
        return;
    }
    let mut rng = StdRng::seed_from_u64(0xdec0de);
    for (q_heads, kv_heads, head_dim) in [(4, 2, 64), (2, 2, 32)] {
        let s = DecodeShape {
            batch: 3,
            q_heads,
            kv_heads,
            head_dim,
            n_new: 5,
            capacity: 13,
        };
        let past = [7i32, 0, 13];
        let n_new = [1i32, 5, 3];
        let q = halves(&mut rng, s.q_len());
        let k_new = halves(&mut rng, s.new_kv_len());
        let v_new = halves(&mut rng, s.new_kv_len());
        let cache_k = halves(&mut rng, s.cache_len());
        let cache_v = halves(&mut rng, s.cache_len());
        let scale = 1.0 / (head_dim as f32).sqrt();
        let bufs = DecodeBufs {
            q: &q[..],
            k_new: &k_new[..],
            v_new: &v_new[..],
            cache_k: &cache_k[..],
            cache_v: &cache_v[..],
        };
        let o = host::decode_forward(&s, scale, &bufs, &past, &n_new).unwrap();
        let (t_max, d) = (s.n_new, head_dim);
        let mut worst = 0.0f64;
        for b in 0..s.batch {
            let (p, n) = (past[b] as usize, n_new[b] as usize);
            let shape = AttnShape {
                batch: 1,
                q_heads,
                kv_heads,
                seq: n,
                prefix: p,
                head_dim,
                n_prefixes: 1,
            };
            let qb = seq_part(&q, b, q_heads, t_max, n, d);
            let kb = seq_part(&k_new, b, kv_heads, t_max, n, d);
            let vb = seq_part(&v_new, b, kv_heads, t_max, n, d);
            let pk = seq_part(&cache_k, b, kv_heads, s.capacity, p, d);
            let pv = seq_part(&cache_v, b, kv_heads, s.capacity, p, d);
            let inputs = AttnInputs {
                q: &qb,
                k: &kb,
                v: &vb,
                prefix_k: &pk,
                prefix_v: &pv,
                prefix_index: &[0],
                valid_len: &[n],
                scale: 1.0 / (head_dim as f64).sqrt(),
            };
            let (want, _) = attention::forward(&shape, &inputs);
            let got = seq_part(&o, b, q_heads, t_max, n, d);
            assert!(
                got.iter().all(|x| x.is_finite()),
                "sequence {b}: non-finite output"
            );
            let e = rel_err(&got, &want);
            worst = worst.max(e);
            assert!(
                e <= 2e-3,
                "sequence {b} (past {p}, {n} new): rel err {e:.2e}"
            );
            // Padded rows are zeros.
            for h in 0..q_heads {
                let at = (b * q_heads + h) * t_max * d;
                let pad = &o[at + n * d..at + t_max * d];
                assert!(
                    pad.iter().all(|x| x.to_f32() == 0.0),
                    "sequence {b} head {h}: padded rows not zero"
                );
            }
        }
        eprintln!(
            "decode attention Hq={q_heads} Hkv={kv_heads} D={head_dim}: worst rel err {worst:.2e}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The GPU engine's KV-cache decoding against the CPU reference decoding.

fn round16(v: &mut [f32]) {
    v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32());
}

/// Small models of both families with head dim 64; Llama with GQA and q_dim != d_model.
fn config(arch: Arch) -> ModelConfig {
    let mut cfg = tiny_config(arch, arch == Arch::Gpt2);
    cfg.head_dim = 64;
    cfg.d_model = 64;
    cfg.vocab_size = 71;
    match arch {
        Arch::Gpt2 => {
            cfg.n_heads = 2;
            cfg.n_kv_heads = 2;
            cfg.d_ff = 96;
            cfg.max_positions = 40;
        }
        Arch::Llama => {
            cfg.n_heads = 4;
            cfg.n_kv_heads = 2;
            cfg.d_ff = 80;
        }
    }
    cfg
}

fn setup(arch: Arch, seed: u64) -> (Arc<ModelWeights<f32>>, PrefixBank<f32>) {
    let cfg = config(arch);
    let weights = Arc::new(
        random_model(&cfg, 0.08, seed)
            .cast::<f32>()
            .rounded_to_f16(),
    );
    let mut bank = random_bank(&cfg, 2, 4, 0.5, seed + 1).cast::<f32>();
    for v in bank.k.iter_mut().chain(bank.v.iter_mut()) {
        round16(v);
    }
    (weights, bank)
}

fn f64s32(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn argmax(x: &[f32]) -> u32 {
    (0..x.len()).max_by(|&a, &b| x[a].total_cmp(&x[b])).unwrap() as u32
}

/// Both engines' decoding side by side.
struct Pair {
    gpu: CudaEngine,
    cpu: CpuEngine,
    ge: Box<dyn DecodeCache>,
    ce: Box<dyn DecodeCache>,
    worst: f64,
}

impl Pair {
    /// One step: compares the logits and returns the (equal) greedy tokens.
    fn step(&mut self, feed: &[Vec<u32>], what: &str) -> Vec<u32> {
        let want = self.cpu.decode(self.ce.as_mut(), feed).unwrap();
        let got = self.gpu.decode(self.ge.as_mut(), feed).unwrap();
        assert_eq!(got.len(), want.len(), "{what}: logits length");
        assert!(
            got.iter().all(|x| x.is_finite()),
            "{what}: non-finite logits"
        );
        let e = rel_err(&f64s32(&got), &f64s32(&want));
        self.worst = self.worst.max(e);
        assert!(e <= LOGITS_TOL, "{what}: logits rel err {e:.3e}");
        let vocab = self.gpu.config().vocab_size;
        (0..feed.len())
            .map(|b| {
                let (g, w) = (
                    argmax(&got[b * vocab..(b + 1) * vocab]),
                    argmax(&want[b * vocab..(b + 1) * vocab]),
                );
                assert_eq!(g, w, "{what}, sequence {b}: greedy tokens differ");
                w
            })
            .collect()
    }

    fn reorder(&mut self, rows: &[usize]) {
        self.ce.reorder(rows).unwrap();
        self.ge.reorder(rows).unwrap();
        assert_eq!(self.ge.batch(), rows.len());
    }
}

#[test]
fn kv_cache_decoding_matches_the_reference() {
    let test = "kv_cache_decoding_matches_the_reference";
    if !host_gpu_or_skip(test) {
        return;
    }
    for (arch, positions, seed) in [
        (Arch::Gpt2, Positions::AfterPrefix, 501),
        (Arch::Llama, Positions::FromZero, 502),
        (Arch::Llama, Positions::AfterPrefix, 503),
    ] {
        let (weights, bank) = setup(arch, seed);
        let opts = RunOptions { positions };
        // Two different prefixes and a no-prefix request in one batch, uneven prompts.
        let index = [Some(1), None, Some(0), Some(1)];
        let mut gpu = CudaEngine::new(weights.clone()).unwrap();
        let mut cpu = CpuEngine::new(weights.clone());
        let ge = gpu.begin_decode(Some(&bank), &index, &opts).unwrap();
        let ce = cpu.begin_decode(Some(&bank), &index, &opts).unwrap();
        let mut p = Pair {
            gpu,
            cpu,
            ge,
            ce,
            worst: 0.0,
        };
        let prompts: Vec<Vec<u32>> = vec![
            vec![3, 14, 15, 9, 2, 6],
            vec![26],
            vec![35, 8, 9],
            vec![1, 70],
        ];
        let mut next = p.step(&prompts, "prefill");
        // A step with several new tokens for some sequences (causal among themselves).
        let feed: Vec<Vec<u32>> = next
            .iter()
            .enumerate()
            .map(|(b, &t)| if b % 2 == 0 { vec![t, 7, 11] } else { vec![t] })
            .collect();
        next = p.step(&feed, "multi-token step");
        for step in 0..4 {
            let feed: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
            next = p.step(&feed, &format!("greedy step {step}"));
        }
        // Beams: grow (a sequence copied twice), drop one, reorder; then more greedy steps.
        let rows = vec![2, 0, 2, 3, 1];
        p.reorder(&rows);
        next = rows.iter().map(|&r| next[r]).collect();
        for step in 0..3 {
            let feed: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
            next = p.step(&feed, &format!("after reorder, step {step}"));
        }
        let rows = vec![4, 1];
        p.reorder(&rows);
        next = rows.iter().map(|&r| next[r]).collect();
        for step in 0..2 {
            let feed: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
            next = p.step(&feed, &format!("after second reorder, step {step}"));
        }
        println!(
            "  {arch:?} {positions:?}: prefill + 11 steps equal greedy tokens, worst logits rel \
             err {:.2e}",
            p.worst
        );
    }
}

#[test]
fn kv_cache_grows_past_its_headroom() {
    let test = "kv_cache_grows_past_its_headroom";
    if !host_gpu_or_skip(test) {
        return;
    }
    let (weights, bank) = setup(Arch::Llama, 600);
    let mut gpu = CudaEngine::new(weights.clone()).unwrap();
    // Capacity after the prefill: prefix 4 + prompt 3 + headroom 2 = 9 entries; the session
    // below needs 4 + 3 + 14 = 21, so the cache doubles twice (9 → 18 → 36), once after a
    // beam reorder still pending on the device.
    gpu.set_decode_headroom(2);
    let opts = RunOptions::default();
    let index = [Some(0), None, Some(1)];
    let mut cpu = CpuEngine::new(weights);
    let ge = gpu.begin_decode(Some(&bank), &index, &opts).unwrap();
    let ce = cpu.begin_decode(Some(&bank), &index, &opts).unwrap();
    let mut p = Pair {
        gpu,
        cpu,
        ge,
        ce,
        worst: 0.0,
    };
    let mut next = p.step(&[vec![1, 2, 3], vec![4], vec![9, 8]], "prefill");
    for step in 0..14 {
        if step == 8 {
            let rows = vec![2, 0, 0];
            p.reorder(&rows);
            next = rows.iter().map(|&r| next[r]).collect();
        }
        let feed: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
        next = p.step(&feed, &format!("greedy step {step}"));
    }
    println!(
        "RESULT gpu_decode/{test}: 15 cases, worst relative error {:.2e}",
        p.worst
    );
}
