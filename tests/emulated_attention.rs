//! The fused prefix-attention kernels (kernels/prefix_attention.cu), run on the CPU through the
//! host emulation, against the plain CPU reference computed in f64 from the same fp16 inputs.
//!
//! Skips with a visible message when the build has no emulation (no CUDA headers); fails instead
//! when `PREFIX_TUNE_REQUIRE_KERNELS=1`.

mod common;

use half::f16;
use prefix_tune::emu::{self, HalfGrads, HalfInputs};
use prefix_tune::reference::attention::{self, AttnInputs, AttnShape};
use prefix_tune::reference::real::rel_err;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// fp16 tolerance on relative norm error (outputs and gradients).
const TOL: f64 = 1e-2;

use common::emulation_or_skip;

#[derive(Clone, Debug)]
struct Case {
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    seq: usize,
    prefix: usize,
    head_dim: usize,
    n_prefixes: usize,
    prefix_index: Vec<usize>,
    valid_len: Vec<usize>,
}

impl Case {
    fn shape(&self) -> AttnShape {
        AttnShape {
            batch: self.batch,
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            seq: self.seq,
            prefix: self.prefix,
            head_dim: self.head_dim,
            n_prefixes: self.n_prefixes,
        }
    }
}

fn randn_f16(rng: &mut StdRng, n: usize) -> Vec<f16> {
    (0..n)
        .map(|_| f16::from_f32(rng.sample::<f32, _>(StandardNormal)))
        .collect()
}

fn widen(x: &[f16]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

struct Problem {
    shape: AttnShape,
    half: HalfInputs,
    d_o: Vec<f16>,
}

fn problem(c: &Case, seed: u64) -> Problem {
    let s = c.shape();
    let mut rng = StdRng::seed_from_u64(seed);
    let half = HalfInputs {
        q: randn_f16(&mut rng, s.q_len()),
        k: randn_f16(&mut rng, s.kv_len()),
        v: randn_f16(&mut rng, s.kv_len()),
        prefix_k: randn_f16(&mut rng, s.bank_len()),
        prefix_v: randn_f16(&mut rng, s.bank_len()),
        prefix_index: c.prefix_index.clone(),
        valid_len: c.valid_len.clone(),
        scale: 1.0 / (c.head_dim as f32).sqrt(),
    };
    let d_o = randn_f16(&mut rng, s.q_len());
    Problem {
        shape: s,
        half,
        d_o,
    }
}

/// The reference in f64 on the fp16-rounded inputs: (O, LSE, grads).
fn reference(p: &Problem) -> (Vec<f64>, Vec<f64>, attention::AttnGrads<f64>) {
    let h = &p.half;
    let (q, k, v, pk, pv) = (
        widen(&h.q),
        widen(&h.k),
        widen(&h.v),
        widen(&h.prefix_k),
        widen(&h.prefix_v),
    );
    let inp = AttnInputs {
        q: &q,
        k: &k,
        v: &v,
        prefix_k: &pk,
        prefix_v: &pv,
        prefix_index: &h.prefix_index,
        valid_len: &h.valid_len,
        scale: h.scale as f64,
    };
    let (o, lse) = attention::forward(&p.shape, &inp);
    let g = attention::backward(&p.shape, &inp, &o, &lse, &widen(&p.d_o));
    (o, lse, g)
}

fn assert_all_written(what: &str, x: &[f64]) {
    let bad = x.iter().filter(|v| !v.is_finite()).count();
    assert_eq!(
        bad,
        0,
        "{what}: {bad} of {} elements not written (NaN poison left) or not finite",
        x.len()
    );
}

/// Relative error of one tensor, with the largest element difference for the log.
fn compare(what: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_all_written(what, got);
    let err = rel_err(got, want);
    let (worst_i, worst) = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold((0, 0.0f64), |m, (i, d)| if d > m.1 { (i, d) } else { m });
    println!(
        "    {what:<11} rel err {err:.2e}  worst |diff| {worst:.2e} at {worst_i} (got {:.4}, want {:.4})",
        got.get(worst_i).copied().unwrap_or(0.0),
        want.get(worst_i).copied().unwrap_or(0.0)
    );
    assert!(err <= TOL, "{what}: relative error {err:.3e} > {TOL:.0e}");
    err
}

fn grads_f64(g: &HalfGrads) -> [(&'static str, Vec<f64>); 5] {
    [
        ("dq", widen(&g.dq)),
        ("dk", widen(&g.dk)),
        ("dv", widen(&g.dv)),
        ("d_prefix_k", widen(&g.d_prefix_k)),
        ("d_prefix_v", widen(&g.d_prefix_v)),
    ]
}

fn bits(x: &[f16]) -> Vec<u16> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Forward and both backward modes of one case; returns the worst relative error.
fn run_case(c: &Case, seed: u64) -> f64 {
    println!("case {c:?}");
    let p = problem(c, seed);
    let (o_ref, lse_ref, g_ref) = reference(&p);
    let (o, lse) = emu::forward(&p.shape, &p.half).expect("emulated forward");
    let mut worst = compare("o", &widen(&o), &o_ref);
    let lse64: Vec<f64> = lse.iter().map(|&x| x as f64).collect();
    worst = worst.max(compare("lse", &lse64, &lse_ref));

    let want = [
        &g_ref.dq,
        &g_ref.dk,
        &g_ref.dv,
        &g_ref.d_prefix_k,
        &g_ref.d_prefix_v,
    ];
    for deterministic in [false, true] {
        println!("  backward, deterministic = {deterministic}");
        let g = emu::backward(&p.shape, &p.half, &o, &lse, &p.d_o, deterministic)
            .expect("emulated backward");
        for ((what, got), want) in grads_f64(&g).iter().zip(want) {
            worst = worst.max(compare(what, got, want));
        }
        if deterministic {
            let again = emu::backward(&p.shape, &p.half, &o, &lse, &p.d_o, true)
                .expect("emulated backward");
            for (a, b, what) in [
                (&g.dq, &again.dq, "dq"),
                (&g.dk, &again.dk, "dk"),
                (&g.dv, &again.dv, "dv"),
                (&g.d_prefix_k, &again.d_prefix_k, "d_prefix_k"),
                (&g.d_prefix_v, &again.d_prefix_v, "d_prefix_v"),
            ] {
                assert_eq!(
                    bits(a),
                    bits(b),
                    "deterministic mode: {what} differs between two runs"
                );
            }
        }
    }
    println!("  worst relative error {worst:.2e}");
    let conflicts = emu::ldmatrix_bank_conflicts();
    assert_eq!(
        conflicts, 0,
        "{conflicts} ldmatrix accesses with shared-memory bank conflicts"
    );
    worst
}

#[test]
fn single_token_no_prefix_d64() {
    if !emulation_or_skip("single_token_no_prefix_d64") {
        return;
    }
    let c = Case {
        batch: 1,
        q_heads: 2,
        kv_heads: 2,
        seq: 1,
        prefix: 0,
        head_dim: 64,
        n_prefixes: 0,
        prefix_index: vec![0],
        valid_len: vec![1],
    };
    run_case(&c, 1);
}

#[test]
fn no_prefix_multi_tile_d64() {
    if !emulation_or_skip("no_prefix_multi_tile_d64") {
        return;
    }
    // P = 0 with more than one query/key tile.
    let c = Case {
        batch: 1,
        q_heads: 1,
        kv_heads: 1,
        seq: 65,
        prefix: 0,
        head_dim: 64,
        n_prefixes: 0,
        prefix_index: vec![0],
        valid_len: vec![65],
    };
    run_case(&c, 6);
}

#[test]
fn gqa_short_prefix_padding_d64() {
    if !emulation_or_skip("gqa_short_prefix_padding_d64") {
        return;
    }
    // T not a multiple of the tile, P = 1, GQA 4/2, one padded sequence.
    let c = Case {
        batch: 2,
        q_heads: 4,
        kv_heads: 2,
        seq: 37,
        prefix: 1,
        head_dim: 64,
        n_prefixes: 2,
        prefix_index: vec![1, 0],
        valid_len: vec![37, 20],
    };
    run_case(&c, 2);
}

#[test]
fn two_prefixes_multi_tile_d64() {
    if !emulation_or_skip("two_prefixes_multi_tile_d64") {
        return;
    }
    // P and T both over one tile and not multiples of it; three sequences on two of three bank
    // entries (one shared, one unused), one sequence entirely padding.
    let c = Case {
        batch: 3,
        q_heads: 2,
        kv_heads: 1,
        seq: 70,
        prefix: 75,
        head_dim: 64,
        n_prefixes: 3,
        prefix_index: vec![2, 0, 2],
        valid_len: vec![70, 0, 45],
    };
    run_case(&c, 3);
}

#[test]
fn long_sequence_d128() {
    if !emulation_or_skip("long_sequence_d128") {
        return;
    }
    // T over two tiles, P a non-multiple of the tile, Hq = Hkv.
    let c = Case {
        batch: 1,
        q_heads: 2,
        kv_heads: 2,
        seq: 150,
        prefix: 13,
        head_dim: 128,
        n_prefixes: 1,
        prefix_index: vec![0],
        valid_len: vec![150],
    };
    run_case(&c, 4);
}

#[test]
fn gqa_two_prefixes_padding_d128() {
    if !emulation_or_skip("gqa_two_prefixes_padding_d128") {
        return;
    }
    // D = 128 with GQA, P over two tiles, two prefixes, padding (incl. an empty sequence).
    let c = Case {
        batch: 3,
        q_heads: 4,
        kv_heads: 2,
        seq: 33,
        prefix: 130,
        head_dim: 128,
        n_prefixes: 2,
        prefix_index: vec![1, 0, 1],
        valid_len: vec![33, 0, 17],
    };
    run_case(&c, 5);
}

/// The sequences `seqs` of `p` as a problem of their own; without `prefix`, with P = 0.
fn sub_problem(p: &Problem, seqs: &[usize], prefix: bool) -> Problem {
    let s = &p.shape;
    let (q_n, kv_n) = (
        s.q_heads * s.seq * s.head_dim,
        s.kv_heads * s.seq * s.head_dim,
    );
    let pick = |x: &[f16], n: usize| -> Vec<f16> {
        seqs.iter()
            .flat_map(|&b| x[b * n..(b + 1) * n].iter().copied())
            .collect()
    };
    let shape = AttnShape {
        batch: seqs.len(),
        prefix: if prefix { s.prefix } else { 0 },
        n_prefixes: if prefix { s.n_prefixes } else { 0 },
        ..*s
    };
    let h = &p.half;
    let half = HalfInputs {
        q: pick(&h.q, q_n),
        k: pick(&h.k, kv_n),
        v: pick(&h.v, kv_n),
        prefix_k: if prefix {
            h.prefix_k.clone()
        } else {
            Vec::new()
        },
        prefix_v: if prefix {
            h.prefix_v.clone()
        } else {
            Vec::new()
        },
        prefix_index: seqs
            .iter()
            .map(|&b| if prefix { h.prefix_index[b] } else { 0 })
            .collect(),
        valid_len: seqs.iter().map(|&b| h.valid_len[b]).collect(),
        scale: h.scale,
    };
    Problem {
        shape,
        half,
        d_o: pick(&p.d_o, q_n),
    }
}

#[test]
fn a_sequence_without_prefix_in_a_prefixed_batch() {
    let test = "a_sequence_without_prefix_in_a_prefixed_batch";
    if !emulation_or_skip(test) {
        return;
    }
    // Sequence 1 sees no prefix (the KV-cache prefill of a request without one); the others use
    // prefixes 1 and 0. Expected: sequence 1 as a P = 0 problem of its own, the others (and the
    // prefix gradient, summed over them only) as a problem without sequence 1.
    let none = prefix_tune::cuda::attention::NO_PREFIX;
    let c = Case {
        batch: 3,
        q_heads: 4,
        kv_heads: 2,
        seq: 70,
        prefix: 12,
        head_dim: 64,
        n_prefixes: 2,
        prefix_index: vec![1, none, 0],
        valid_len: vec![70, 41, 66],
    };
    let p = problem(&c, 11);
    let with = sub_problem(&p, &[0, 2], true);
    let without = sub_problem(&p, &[1], false);
    let (o_w, lse_w, g_w) = reference(&with);
    let (o_n, lse_n, g_n) = reference(&without);
    let s = &p.shape;
    let (q_n, kv_n, l_n) = (
        s.q_heads * s.seq * s.head_dim,
        s.kv_heads * s.seq * s.head_dim,
        s.q_heads * s.seq,
    );
    // Sequence order 0, 1, 2 from the two sub-problems.
    let merge =
        |a: &[f64], b: &[f64], n: usize| -> Vec<f64> { [&a[..n], &b[..n], &a[n..2 * n]].concat() };
    let (o, lse) = emu::forward(&p.shape, &p.half).expect("emulated forward");
    let mut worst = compare("o", &widen(&o), &merge(&o_w, &o_n, q_n));
    let lse64: Vec<f64> = lse.iter().map(|&x| x as f64).collect();
    worst = worst.max(compare("lse", &lse64, &merge(&lse_w, &lse_n, l_n)));
    for deterministic in [false, true] {
        println!("  backward, deterministic = {deterministic}");
        let g = emu::backward(&p.shape, &p.half, &o, &lse, &p.d_o, deterministic)
            .expect("emulated backward");
        let want = [
            merge(&g_w.dq, &g_n.dq, q_n),
            merge(&g_w.dk, &g_n.dk, kv_n),
            merge(&g_w.dv, &g_n.dv, kv_n),
            g_w.d_prefix_k.clone(),
            g_w.d_prefix_v.clone(),
        ];
        for ((what, got), want) in grads_f64(&g).iter().zip(&want) {
            worst = worst.max(compare(what, got, want));
        }
    }
    println!("RESULT emulated_attention/{test}: 1 cases, worst relative error {worst:.2e}");
}
