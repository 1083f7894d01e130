//! The fused prefix-attention kernels on a real GPU against the CPU reference (f64, from the same
//! fp16 inputs): the small shapes of tests/gpu_attention_cases.rs plus realistic ones (T up to 2048, P up to 256).
//! Outputs are poisoned with NaN before each launch and every element must come back written.
//!
//! Without a usable GPU the tests print SKIPPED and pass; with `PREFIX_TUNE_REQUIRE_GPU=1` they
//! fail instead (the device check script sets it).

mod common;

use half::f16;
use prefix_tune::cuda::attention::{self as gpu_attn, AttnWorkspace, DevAttnGrads, DevAttnInputs};
use prefix_tune::cuda::GpuContext;
use prefix_tune::reference::attention::{self, AttnInputs, AttnShape};
use prefix_tune::reference::real::rel_err;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

const TOL: f64 = 1e-2;

use common::gpu_or_skip;

struct Case {
    shape: AttnShape,
    prefix_index: Vec<usize>,
    valid_len: Vec<usize>,
}

#[allow(clippy::too_many_arguments)]
fn case(
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    seq: usize,
    prefix: usize,
    head_dim: usize,
    n_prefixes: usize,
    prefix_index: &[usize],
    valid_len: &[usize],
) -> Case {
    Case {
        shape: AttnShape {
            batch,
            q_heads,
            kv_heads,
            seq,
            prefix,
            head_dim,
            n_prefixes,
        },
        prefix_index: prefix_index.to_vec(),
        valid_len: valid_len.to_vec(),
    }
}

fn randn(rng: &mut StdRng, n: usize) -> Vec<f16> {
    (0..n)
        .map(|_| f16::from_f32(rng.sample::<f32, _>(StandardNormal)))
        .collect()
}

fn widen(x: &[f16]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
    g: &GpuContext,
    x: &cudarc::driver::CudaSlice<T>,
    len: usize,
) -> Vec<T> {
    let mut v = g.stream().clone_dtoh(x).expect("download");
    v.truncate(len);
    v
}

fn upload<T: cudarc::driver::DeviceRepr + Copy>(
    g: &GpuContext,
    x: &[T],
    poison: T,
) -> cudarc::driver::CudaSlice<T> {
    // Never zero-length: CUDA cannot allocate 0 bytes.
    let owned;
    let src = if x.is_empty() {
        owned = vec![poison];
        &owned[..]
    } else {
        x
    };
    g.stream().clone_htod(src).expect("upload")
}

fn compare(label: &str, what: &str, got: &[f64], want: &[f64], worst: &mut f64) {
    let bad = got.iter().filter(|v| !v.is_finite()).count();
    assert_eq!(
        bad, 0,
        "{label} {what}: {bad} elements unwritten (NaN poison) or not finite"
    );
    let err = rel_err(got, want);
    println!("    {what:<11} rel err {err:.2e}");
    assert!(
        err <= TOL,
        "{label} {what}: relative error {err:.3e} > {TOL:.0e}"
    );
    *worst = worst.max(err);
}

/// Forward + both backward modes of one case on the GPU; returns the worst relative error.
fn run(g: &GpuContext, c: &Case, seed: u64) -> f64 {
    let s = c.shape;
    let label = format!("{s:?} valid {:?}", c.valid_len);
    println!("case {label}");
    let mut rng = StdRng::seed_from_u64(seed);
    let q = randn(&mut rng, s.q_len());
    let k = randn(&mut rng, s.kv_len());
    let v = randn(&mut rng, s.kv_len());
    let pk = randn(&mut rng, s.bank_len());
    let pv = randn(&mut rng, s.bank_len());
    let d_o = randn(&mut rng, s.q_len());
    let scale = 1.0 / (s.head_dim as f32).sqrt();

    // Reference in f64.
    let (q64, k64, v64, pk64, pv64) = (widen(&q), widen(&k), widen(&v), widen(&pk), widen(&pv));
    let inp64 = AttnInputs {
        q: &q64,
        k: &k64,
        v: &v64,
        prefix_k: &pk64,
        prefix_v: &pv64,
        prefix_index: &c.prefix_index,
        valid_len: &c.valid_len,
        scale: scale as f64,
    };
    let (o_ref, lse_ref) = attention::forward(&s, &inp64);
    let g_ref = attention::backward(&s, &inp64, &o_ref, &lse_ref, &widen(&d_o));

    let nan = f16::NAN;
    let (dq, dk, dv, dpk, dpv) = (
        upload(g, &q, nan),
        upload(g, &k, nan),
        upload(g, &v, nan),
        upload(g, &pk, nan),
        upload(g, &pv, nan),
    );
    let (pi, vl) = gpu_attn::upload_indices(g, &s, &c.prefix_index, &c.valid_len).expect("indices");
    let inp = DevAttnInputs {
        q: &dq,
        k: &dk,
        v: &dv,
        prefix_k: &dpk,
        prefix_v: &dpv,
        prefix_index: &pi,
        valid_len: &vl,
    };
    let mut o = upload(g, &vec![nan; s.q_len()], nan);
    let mut lse = upload(g, &vec![f32::NAN; s.lse_len()], f32::NAN);
    gpu_attn::forward(g, &s, scale, &inp, &mut o, &mut lse).expect("forward");
    g.synchronize().expect("forward ran");
    let o_h = download(g, &o, s.q_len());
    let lse_h: Vec<f64> = download(g, &lse, s.lse_len())
        .iter()
        .map(|&x| x as f64)
        .collect();
    let mut worst = 0.0f64;
    compare(&label, "o", &widen(&o_h), &o_ref, &mut worst);
    compare(&label, "lse", &lse_h, &lse_ref, &mut worst);

    let d_o_dev = upload(g, &d_o, nan);
    let mut first_det: Option<Vec<Vec<u64>>> = None;
    for (deterministic, run_no) in [(false, 0), (true, 0), (true, 1)] {
        println!("  backward, deterministic = {deterministic}");
        let mut ws = AttnWorkspace::new(g, &s, !deterministic).expect("workspace");
        let mut grads = DevAttnGrads {
            dq: upload(g, &vec![nan; s.q_len()], nan),
            dk: upload(g, &vec![nan; s.kv_len()], nan),
            dv: upload(g, &vec![nan; s.kv_len()], nan),
            d_prefix_k: upload(g, &vec![f32::NAN; s.bank_len()], f32::NAN),
            d_prefix_v: upload(g, &vec![f32::NAN; s.bank_len()], f32::NAN),
        };
        gpu_attn::backward(
            g,
            &s,
            scale,
            deterministic,
            &inp,
            &o,
            &lse,
            &d_o_dev,
            &mut ws,
            &mut grads,
        )
        .expect("backward");
        g.synchronize().expect("backward ran");
        // dQ, dK, dV are fp16, the prefix gradients fp32; all widened exactly to f64.
        let wide32 = |x: Vec<f32>| -> Vec<f64> { x.into_iter().map(f64::from).collect() };
        let got = [
            widen(&download(g, &grads.dq, s.q_len())),
            widen(&download(g, &grads.dk, s.kv_len())),
            widen(&download(g, &grads.dv, s.kv_len())),
            wide32(download(g, &grads.d_prefix_k, s.bank_len())),
            wide32(download(g, &grads.d_prefix_v, s.bank_len())),
        ];
        let want = [
            &g_ref.dq,
            &g_ref.dk,
            &g_ref.dv,
            &g_ref.d_prefix_k,
            &g_ref.d_prefix_v,
        ];
        let names = ["dq", "dk", "dv", "d_prefix_k", "d_prefix_v"];
        if run_no == 0 {
            for ((x, w), n) in got.iter().zip(want).zip(names) {
                compare(&label, n, x, w, &mut worst);
            }
        }
        if deterministic {
            let b: Vec<Vec<u64>> = got
                .iter()
                .map(|x| x.iter().map(|v| v.to_bits()).collect())
                .collect();
            match &first_det {
                None => first_det = Some(b),
                Some(a) => assert!(
                    a == &b,
                    "{label}: deterministic backward differs between runs"
                ),
            }
        }
    }
    println!("  worst relative error {worst:.2e}");
    worst
}

fn run_all(test: &str, cases: &[Case]) {
    let Some(g) = gpu_or_skip(test) else { return };
    println!("{}", g.description());
    let mut worst = 0.0f64;
    for (i, c) in cases.iter().enumerate() {
        worst = worst.max(run(&g, c, 100 + i as u64));
    }
    println!(
        "RESULT {test}: {} cases, worst relative error {worst:.2e}",
        cases.len()
    );
}

#[test]
fn gpu_attention_small_shapes() {
    run_all(
        "gpu_attention_small_shapes",
        &[
            case(1, 2, 2, 1, 0, 64, 0, &[0], &[1]),
            case(1, 1, 1, 65, 0, 64, 0, &[0], &[65]),
            case(2, 4, 2, 37, 1, 64, 2, &[1, 0], &[37, 20]),
            case(3, 2, 1, 70, 75, 64, 3, &[2, 0, 2], &[70, 0, 45]),
            case(1, 2, 2, 150, 13, 128, 1, &[0], &[150]),
            case(3, 4, 2, 33, 130, 128, 2, &[1, 0, 1], &[33, 0, 17]),
        ],
    );
}

#[test]
fn gpu_attention_realistic_shapes() {
    let cases = [
        case(2, 8, 2, 2048, 256, 128, 2, &[1, 0], &[2048, 1500]),
        case(
            4,
            4,
            4,
            1024,
            16,
            64,
            2,
            &[0, 1, 1, 0],
            &[1024, 1000, 513, 1],
        ),
        case(2, 6, 2, 777, 200, 64, 1, &[0, 0], &[777, 600]),
        case(1, 8, 8, 512, 128, 128, 1, &[0], &[512]),
    ];
    // On the simulated device (a CPU running every CUDA thread) the long sequences would take
    // many minutes: it runs the realistic case of T = 512 only; a GPU runs them all.
    let cases: Vec<Case> = if prefix_tune::cuda::context::simulated() {
        eprintln!("gpu_attention_realistic_shapes: simulated device: the T = 512 case only");
        cases.into_iter().filter(|c| c.shape.seq <= 512).collect()
    } else {
        cases.into()
    };
    run_all("gpu_attention_realistic_shapes", &cases);
}

/// Shapes that select every path of the backward's (query head, 128-key block) grid: several
/// sequence key blocks with masked diagonal steps (one 128-row step at D = 64, two 64-row steps
/// at D = 128) and unmasked main-loop steps; prefix blocks (P = 1, 10, 128, 130: one key, a short
/// prefix, exactly one block, two blocks); GQA groups of 2 and 3 (SmolLM2's 9/3 heads) folded
/// into the dK/dV and prefix reductions; padded sequences (one empty, lengths off the step edges);
/// and a seeded random draw around the tile edges.
#[test]
fn gpu_attention_randomized_shapes() {
    let mut cases = vec![
        // SmolLM2's heads, P = 10, three sequence key blocks (T past two 128-row query steps).
        case(1, 9, 3, 300, 10, 64, 1, &[0], &[300]),
        // D = 128: two 64-row masked steps per diagonal; two prefix blocks (P = 130), GQA 2.
        case(2, 4, 2, 257, 130, 128, 2, &[1, 0], &[257, 129]),
        // Exactly one prefix block, MHA (dK/dV written by the dK/dV kernel itself), padding.
        case(2, 2, 2, 256, 128, 64, 2, &[0, 1], &[256, 100]),
        // One prefix key, GQA 3, an empty sequence.
        case(2, 3, 1, 129, 1, 128, 1, &[0, 0], &[129, 0]),
    ];
    let mut rng = StdRng::seed_from_u64(0x5eed_b4c7);
    for _ in 0..3 {
        let head_dim = if rng.random_bool(0.5) { 64 } else { 128 };
        let kv_heads = rng.random_range(1..=2);
        let q_heads = kv_heads * rng.random_range(1..=3);
        let batch = rng.random_range(1..=2);
        let edges = [1, 63, 64, 65, 127, 128, 129, 200, 255, 256, 257];
        let seq = edges[rng.random_range(0..edges.len())];
        let prefix = [0, 1, 10, 16, 127, 128, 129][rng.random_range(0..7)];
        let n_prefixes = if prefix > 0 { 2 } else { 0 };
        let prefix_index: Vec<usize> = (0..batch).map(|_| rng.random_range(0..2)).collect();
        let valid_len: Vec<usize> = (0..batch).map(|_| rng.random_range(0..=seq)).collect();
        cases.push(case(
            batch,
            q_heads,
            kv_heads,
            seq,
            prefix,
            head_dim,
            n_prefixes,
            &prefix_index,
            &valid_len,
        ));
    }
    run_all("gpu_attention_randomized_shapes", &cases);
}
