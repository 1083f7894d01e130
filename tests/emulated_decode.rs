//! The KV-cache decoding of the GPU engine on the host emulation of its kernels.
//!
//! - The decode-attention kernel alone (`kernels/decode_attention.cu`) against
//!   `reference::attention` in f64 with the cache as the prefix: uneven cache lengths (one
//!   empty), uneven new-token counts (a prefill-like row block and single tokens), GQA, padded
//!   rows written as zeros, poisoned (NaN) outputs.
//! - The emulated engine's KV-cache decoding against the CPU reference decoding
//!   (`reference/decode.rs`) step by step: see the engine tests below.
//!
//! Skips with a visible message when the build has no emulation; fails instead with
//! `PREFIX_TUNE_REQUIRE_KERNELS=1`.

mod common;

use common::emulation_or_skip;
use half::f16;
use prefix_tune::cuda::decode::{DecodeBufs, DecodeShape};
use prefix_tune::emu_decode;
use prefix_tune::reference::attention::{self, AttnInputs, AttnShape};
use prefix_tune::reference::real::rel_err;
use prefix_tune::reference::testing::random_vec;
use rand::rngs::StdRng;
use rand::SeedableRng;

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
    if !emulation_or_skip("decode_attention_kernel_matches_reference") {
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
        let o = emu_decode::forward(&s, scale, &bufs, &past, &n_new).unwrap();
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
