//! GPU benchmark of the fused prefix-attention kernels: forward and backward (atomic dQ, prefix
//! gradients reduced over the batch) on the grid (B = 8, Hq = Hkv = 16,
//! T ∈ {512, 1024, 2048, 4096}, P ∈ {16, 128}, D ∈ {64, 128}), timed with CUDA events inside
//! `iter_custom`. FLOPs: forward 4·B·Hq·D·T·(P + T/2), backward 2.5× that; criterion's throughput
//! ("elem/s") is FLOP/s. After the criterion run a table of median times and TFLOP/s is printed,
//! and written as JSON lines to `$PREFIX_TUNE_BENCH_JSON` when set (scripts/gpu-check reads it).
//!
//! Without a usable GPU it prints SKIPPED and measures nothing. `PREFIX_TUNE_BENCH_QUICK=1`
//! times only T ∈ {512, 2048}.

use std::sync::Mutex;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use half::f16;
use prefix_tune::cuda::attention::{self as attn, AttnWorkspace, DevAttnGrads, DevAttnInputs};
use prefix_tune::cuda::GpuContext;
use prefix_tune::reference::attention::AttnShape;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One timed case: label, shape, FLOPs per call, per-call milliseconds of every timed batch.
type Timing = (String, AttnShape, f64, Vec<f64>);
static RESULTS: Mutex<Vec<Timing>> = Mutex::new(Vec::new());

fn fwd_flops(s: &AttnShape) -> f64 {
    4.0 * (s.batch * s.q_heads * s.head_dim * s.seq) as f64 * (s.prefix as f64 + s.seq as f64 / 2.0)
}

fn random_half(g: &GpuContext, rng: &mut StdRng, n: usize) -> CudaSlice<f16> {
    // Uniform in [-2, 2): cheap to draw for the largest shapes; never zeros.
    let host: Vec<f16> = (0..n.max(1))
        .map(|_| f16::from_f32(rng.random_range(-2.0f32..2.0)))
        .collect();
    g.stream().clone_htod(&host).expect("upload")
}

fn bench_attention(c: &mut Criterion) {
    let g = match GpuContext::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("SKIPPED attention bench: no usable GPU ({e:#})");
            return;
        }
    };
    eprintln!("{}", g.description());
    let quick = std::env::var("PREFIX_TUNE_BENCH_QUICK").is_ok_and(|v| v == "1");
    let seqs: &[usize] = if quick {
        &[512, 2048]
    } else {
        &[512, 1024, 2048, 4096]
    };
    let mut group = c.benchmark_group("prefix_attention");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let mut rng = StdRng::seed_from_u64(11);
    for &d in &[64usize, 128] {
        for &t in seqs {
            for &p in &[16usize, 128] {
                let s = AttnShape {
                    batch: 8,
                    q_heads: 16,
                    kv_heads: 16,
                    seq: t,
                    prefix: p,
                    head_dim: d,
                    n_prefixes: 2,
                };
                let scale = 1.0 / (d as f32).sqrt();
                let q = random_half(&g, &mut rng, s.q_len());
                let k = random_half(&g, &mut rng, s.kv_len());
                let v = random_half(&g, &mut rng, s.kv_len());
                let pk = random_half(&g, &mut rng, s.bank_len());
                let pv = random_half(&g, &mut rng, s.bank_len());
                let d_o = random_half(&g, &mut rng, s.q_len());
                let prefix_index: Vec<usize> = (0..s.batch).map(|b| b % 2).collect();
                let (pi, vl) = attn::upload_indices(&g, &s, &prefix_index, &vec![t; s.batch])
                    .expect("indices");
                let inp = DevAttnInputs {
                    q: &q,
                    k: &k,
                    v: &v,
                    prefix_k: &pk,
                    prefix_v: &pv,
                    prefix_index: &pi,
                    valid_len: &vl,
                };
                let mut o = g.stream().alloc_zeros::<f16>(s.q_len()).expect("o");
                let mut lse = g.stream().alloc_zeros::<f32>(s.lse_len()).expect("lse");
                let mut ws = AttnWorkspace::new(&g, &s, true).expect("workspace");
                let mut grads = DevAttnGrads::new(&g, &s).expect("grads");
                let flops = fwd_flops(&s);
                let label = format!("T{t}_P{p}_D{d}");

                let time = |name: &str, flops: f64, iters: u64, f: &mut dyn FnMut()| {
                    let ctx = g.context();
                    let start = ctx
                        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                        .expect("event");
                    let end = ctx
                        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                        .expect("event");
                    start.record(g.stream()).expect("record");
                    for _ in 0..iters {
                        f();
                    }
                    end.record(g.stream()).expect("record");
                    let ms = start.elapsed_ms(&end).expect("elapsed") as f64;
                    let mut r = RESULTS.lock().unwrap();
                    let key = format!("{name}/{label}");
                    match r.iter_mut().find(|e| e.0 == key) {
                        Some(e) => e.3.push(ms / iters as f64),
                        None => r.push((key, s, flops, vec![ms / iters as f64])),
                    }
                    Duration::from_secs_f64(ms / 1e3)
                };

                group.throughput(Throughput::Elements(flops as u64));
                group.bench_function(BenchmarkId::new("fwd", &label), |bch| {
                    bch.iter_custom(|iters| {
                        time("fwd", flops, iters, &mut || {
                            attn::forward(&g, &s, scale, &inp, &mut o, &mut lse).expect("forward")
                        })
                    })
                });
                group.throughput(Throughput::Elements((2.5 * flops) as u64));
                group.bench_function(BenchmarkId::new("bwd", &label), |bch| {
                    bch.iter_custom(|iters| {
                        time("bwd", 2.5 * flops, iters, &mut || {
                            attn::backward(
                                &g, &s, scale, false, &inp, &o, &lse, &d_o, &mut ws, &mut grads,
                            )
                            .expect("backward")
                        })
                    })
                });
                group.bench_function(BenchmarkId::new("bwd_deterministic", &label), |bch| {
                    bch.iter_custom(|iters| {
                        time("bwd_deterministic", 2.5 * flops, iters, &mut || {
                            attn::backward(
                                &g, &s, scale, true, &inp, &o, &lse, &d_o, &mut ws, &mut grads,
                            )
                            .expect("backward")
                        })
                    })
                });
                g.synchronize().expect("bench kernels ran");
            }
        }
    }
    group.finish();
    report(&g);
}

fn report(g: &GpuContext) {
    let r = RESULTS.lock().unwrap();
    let json = std::env::var("PREFIX_TUNE_BENCH_JSON").ok();
    let mut lines = Vec::new();
    println!(
        "\n{:<34} {:>10} {:>9}",
        "prefix attention (median)", "ms", "TFLOP/s"
    );
    for (key, s, flops, times) in r.iter() {
        let mut t = times.clone();
        t.sort_by(f64::total_cmp);
        let ms = t[t.len() / 2];
        let tflops = flops / (ms * 1e-3) / 1e12;
        println!("{key:<34} {ms:>10.3} {tflops:>9.1}");
        let (pass, shape) = key.split_once('/').unwrap_or((key.as_str(), ""));
        lines.push(format!(
            "{{\"pass\":\"{pass}\",\"shape\":\"{shape}\",\"batch\":{},\"q_heads\":{},\"seq\":{},\"prefix\":{},\"head_dim\":{},\"ms\":{ms:.6},\"tflops\":{tflops:.3},\"device\":{:?}}}",
            s.batch, s.q_heads, s.seq, s.prefix, s.head_dim, g.description()
        ));
    }
    if let Some(path) = json {
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, lines.join("\n") + "\n")
            .and_then(|_| std::fs::rename(&tmp, &path))
            .unwrap_or_else(|e| eprintln!("writing {path}: {e}"));
    }
}

criterion_group!(benches, bench_attention);
criterion_main!(benches);
