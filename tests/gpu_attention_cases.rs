//! The fused prefix-attention kernels (kernels/prefix_attention.cu), launched through their real
//! wrappers on host data, against the plain CPU reference computed in f64 from the same fp16
//! inputs: named edge cases (single tokens, no prefix, GQA, padding, two prefixes, several
//! tiles, a sequence without a prefix in a prefixed batch) and randomized shapes.
//!
//! Runs on GPU 0 through `prefix_tune::cuda::host` / the GPU engine: a real card, or the
//! simulated CUDA device (`scripts/sim`, which CI uses). Skips with a visible message without
//! one; fails instead with `PREFIX_TUNE_REQUIRE_GPU=1`.

mod common;

use half::f16;
use prefix_tune::cuda::host::{self, HalfGrads, HalfInputs};
use prefix_tune::reference::attention::{self, AttnInputs, AttnShape};
use prefix_tune::reference::real::rel_err;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// fp16 tolerance on relative norm error (outputs and gradients).
const TOL: f64 = 1e-2;

use common::host_gpu_or_skip;

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
        (
            "d_prefix_k",
            g.d_prefix_k.iter().map(|&x| x as f64).collect(),
        ),
        (
            "d_prefix_v",
            g.d_prefix_v.iter().map(|&x| x as f64).collect(),
        ),
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
    let (o, lse) = host::attention_forward(&p.shape, &p.half).expect("forward");
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
        let g = host::attention_backward(&p.shape, &p.half, &o, &lse, &p.d_o, deterministic)
            .expect("backward");
        for ((what, got), want) in grads_f64(&g).iter().zip(want) {
            worst = worst.max(compare(what, got, want));
        }
        if deterministic {
            let again = host::attention_backward(&p.shape, &p.half, &o, &lse, &p.d_o, true)
                .expect("backward");
            for (a, b, what) in [
                (&g.dq, &again.dq, "dq"),
                (&g.dk, &again.dk, "dk"),
                (&g.dv, &again.dv, "dv"),
            ] {
                assert_eq!(
                    bits(a),
                    bits(b),
                    "deterministic mode: {what} differs between two runs"
                );
            }
            for (a, b, what) in [
                (&g.d_prefix_k, &again.d_prefix_k, "d_prefix_k"),
                (&g.d_prefix_v, &again.d_prefix_v, "d_prefix_v"),
            ] {
                let bits32 = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
                assert_eq!(
                    bits32(a),
                    bits32(b),
                    "deterministic mode: {what} differs between two runs"
                );
            }
        }
    }
    println!("  worst relative error {worst:.2e}");
    let conflicts = host::ldmatrix_bank_conflicts().unwrap_or(0);
    assert_eq!(
        conflicts, 0,
        "{conflicts} ldmatrix accesses with shared-memory bank conflicts"
    );
    worst
}

#[test]
fn single_token_no_prefix_d64() {
    if !host_gpu_or_skip("single_token_no_prefix_d64") {
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
    if !host_gpu_or_skip("no_prefix_multi_tile_d64") {
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
    if !host_gpu_or_skip("gqa_short_prefix_padding_d64") {
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
    if !host_gpu_or_skip("two_prefixes_multi_tile_d64") {
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
    if !host_gpu_or_skip("long_sequence_d128") {
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
    if !host_gpu_or_skip("gqa_two_prefixes_padding_d128") {
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
    if !host_gpu_or_skip(test) {
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
    let (o, lse) = host::attention_forward(&p.shape, &p.half).expect("forward");
    let mut worst = compare("o", &widen(&o), &merge(&o_w, &o_n, q_n));
    let lse64: Vec<f64> = lse.iter().map(|&x| x as f64).collect();
    worst = worst.max(compare("lse", &lse64, &merge(&lse_w, &lse_n, l_n)));
    for deterministic in [false, true] {
        println!("  backward, deterministic = {deterministic}");
        let g = host::attention_backward(&p.shape, &p.half, &o, &lse, &p.d_o, deterministic)
            .expect("backward");
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
    println!("RESULT gpu_attention_cases/{test}: 1 cases, worst relative error {worst:.2e}");
}

/// Shapes drawn at random (seeded) around the tile boundaries of every kernel, plus the shapes
/// that select each path of the forward's key walk: masked diagonal tiles, the unmasked main
/// loop over sequence keys only (T beyond two query blocks), prefix tiles, a short prefix sharing
/// its tile with the first sequence keys (P = 10), a prefix of exactly one key tile, GQA 9/3
/// (SmolLM2's heads) and padding.
#[test]
fn randomized_shapes() {
    let test = "randomized_shapes";
    if !host_gpu_or_skip(test) {
        return;
    }
    let mut cases = vec![
        // SmolLM2-like GQA, P = 10, T past two 128-row query blocks (D = 64 main loop).
        Case {
            batch: 1,
            q_heads: 3,
            kv_heads: 1,
            seq: 300,
            prefix: 10,
            head_dim: 64,
            n_prefixes: 1,
            prefix_index: vec![0],
            valid_len: vec![300],
        },
        // A prefix of exactly one D = 64 key tile, two sequences on two bank entries, one padded.
        Case {
            batch: 2,
            q_heads: 2,
            kv_heads: 2,
            seq: 260,
            prefix: 64,
            head_dim: 64,
            n_prefixes: 2,
            prefix_index: vec![1, 0],
            valid_len: vec![200, 260],
        },
        // D = 128, P = 10 and a prefix over several 32-key tiles.
        Case {
            batch: 2,
            q_heads: 9,
            kv_heads: 3,
            seq: 140,
            prefix: 10,
            head_dim: 128,
            n_prefixes: 1,
            prefix_index: vec![0, 0],
            valid_len: vec![140, 129],
        },
    ];
    let mut rng = StdRng::seed_from_u64(0x5eed_a77e);
    for _ in 0..3 {
        let head_dim = if rng.random_bool(0.5) { 64 } else { 128 };
        let kv_heads = rng.random_range(1..=2);
        let q_heads = kv_heads * rng.random_range(1..=3);
        let batch = rng.random_range(1..=2);
        // Around the tile edges: 1, 31..33, 63..65, 127..129, up to 2.5 query blocks.
        let edges = [1, 31, 32, 33, 63, 64, 65, 127, 128, 129, 200, 320];
        let seq = edges[rng.random_range(0..edges.len())];
        let prefix = [0, 1, 10, 31, 64, 65, 100][rng.random_range(0..7)];
        let n_prefixes = if prefix > 0 { 2 } else { 0 };
        // (NO_PREFIX has its own test: the reference takes bank indices only.)
        let prefix_index = (0..batch).map(|_| rng.random_range(0..2)).collect();
        let valid_len = (0..batch).map(|_| rng.random_range(0..=seq)).collect();
        cases.push(Case {
            batch,
            q_heads,
            kv_heads,
            seq,
            prefix,
            head_dim,
            n_prefixes,
            prefix_index,
            valid_len,
        });
    }
    let mut worst = 0.0f64;
    for (i, c) in cases.iter().enumerate() {
        worst = worst.max(run_case(c, 100 + i as u64));
    }
    println!(
        "RESULT gpu_attention_cases/{test}: {} cases, worst relative error {worst:.2e}",
        cases.len()
    );
}

/// The tests that cover the fused attention's every kernel and path (both head dims, forward,
/// both backward modes, prefixes over and under a tile, GQA): what the mutation test runs.
const COVERING: [&str; 3] = [
    "two_prefixes_multi_tile_d64",
    "gqa_two_prefixes_padding_d128",
    "long_sequence_d128",
];

/// The `sync_block()` and `cp_async_wait<N>()` call sites of kernels/prefix_attention.cu.
fn sites(what: &str) -> Vec<usize> {
    let src = include_str!("../kernels/prefix_attention.cu");
    src.lines()
        .enumerate()
        .filter(|(_, l)| {
            let code = l.split("//").next().unwrap_or("");
            code.contains(what)
        })
        .map(|(i, _)| i + 1)
        .collect()
}

/// Runs the covering tests in a child process with one mutation of the simulated device
/// (`PTSIM_SKIP_BARRIER` / `PTSIM_WAIT_GROUP`); true when they pass.
fn covering_tests_pass(env: (&str, String)) -> bool {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(COVERING)
        .args(["--exact", "--test-threads", "2"])
        .env(env.0, &env.1)
        .env("PTSIM_QUIET", "1")
        .env_remove("PREFIX_TUNE_MUTATION_CHILD");
    let out = cmd.output().expect("running the covering tests");
    out.status.success()
}

/// Every barrier of the fused attention matters, and so does every cp.async wait: deleting any one
/// `sync_block()` of kernels/prefix_attention.cu (the simulator skips that call site), or making
/// any `cp_async_wait<N>` wait for one group less, makes the covering tests fail (a hazard, a
/// fault or a wrong result); without a mutation they pass. Simulated device only.
#[test]
fn every_barrier_and_every_cp_async_wait_of_the_attention_matters() {
    if !host_gpu_or_skip("every_barrier_and_every_cp_async_wait_of_the_attention_matters") {
        return;
    }
    if !prefix_tune::cuda::context::simulated() {
        eprintln!("SKIPPED every_barrier_and_every_cp_async_wait_of_the_attention_matters: mutations need the simulated device");
        return;
    }
    assert!(
        covering_tests_pass(("PTSIM_SKIP_BARRIER", String::new())),
        "the covering tests fail without any mutation"
    );
    let barriers = sites("sync_block();");
    let waits = sites("cp_async_wait<");
    assert!(
        barriers.len() >= 5 && waits.len() >= 3,
        "found {barriers:?} / {waits:?}"
    );
    let mut survived = Vec::new();
    for line in &barriers {
        let spec = format!("kernels/prefix_attention.cu:{line}");
        if covering_tests_pass(("PTSIM_SKIP_BARRIER", spec.clone())) {
            survived.push(format!("sync_block() at {spec} deleted"));
        }
    }
    for line in &waits {
        let spec = format!("kernels/prefix_attention.cu:{line}:1");
        if covering_tests_pass(("PTSIM_WAIT_GROUP", spec.clone())) {
            survived.push(format!("cp_async_wait at {spec} retiring one group less"));
        }
    }
    println!(
        "RESULT gpu_attention_cases/mutations: {} barriers and {} waits mutated, {} survived",
        barriers.len(),
        waits.len(),
        survived.len()
    );
    assert!(
        survived.is_empty(),
        "mutations no test caught: {survived:#?}"
    );
}
