//! GPU benchmark of the fused prefix-attention kernels: forward and backward (atomic dQ, prefix
//! gradients reduced over the batch) on the grid (B = 8, Hq = Hkv = 16,
//! T ∈ {512, 1024, 2048, 4096}, P ∈ {16, 128}, D ∈ {64, 128}), timed with CUDA events inside
//! `iter_custom`. FLOPs: forward 4·B·Hq·D·T·(P + T/2), backward 2.5× that; criterion's throughput
//! ("elem/s") is FLOP/s. After the criterion run a table of median times and TFLOP/s is printed,
//! and written as JSON lines to `$PREFIX_TUNE_BENCH_JSON` when set (scripts/gpu-check reads it).
//!
//! The inputs, the launches, the event timing and the FLOP count are those of
//! `prefix-tune bench attention` ([`prefix_tune::bench`]); this file only adds criterion.
//! Without a usable GPU it prints SKIPPED and measures nothing. `PREFIX_TUNE_BENCH_QUICK=1`
//! times only T ∈ {512, 2048}.

use std::sync::Mutex;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use prefix_tune::bench::{
    attention_fwd_flops, cuda_time_ms, gpu_attention_grid, median, shape_label, AttnRow,
    GpuAttnCase, BWD_FLOP_FACTOR,
};
use prefix_tune::cuda::GpuContext;
use prefix_tune::reference::attention::AttnShape;

/// One timed case: pass, shape, per-call milliseconds of every timed batch.
type Timing = (&'static str, AttnShape, Vec<f64>);
static RESULTS: Mutex<Vec<Timing>> = Mutex::new(Vec::new());

/// Times `iters` calls of `f` with CUDA events and records the per-call time under `pass`/`s`.
fn timed(
    g: &GpuContext,
    pass: &'static str,
    s: &AttnShape,
    iters: u64,
    f: impl FnMut() -> anyhow::Result<()>,
) -> Duration {
    let ms = cuda_time_ms(g, iters, f).expect("timed launches");
    let mut r = RESULTS.lock().unwrap();
    match r.iter_mut().find(|e| e.0 == pass && e.1 == *s) {
        Some(e) => e.2.push(ms),
        None => r.push((pass, *s, vec![ms])),
    }
    Duration::from_secs_f64(ms * iters as f64 / 1e3)
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
    let mut group = c.benchmark_group("prefix_attention");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for (i, s) in gpu_attention_grid(quick).iter().enumerate() {
        let mut case = GpuAttnCase::new(&g, s, 11 + i as u64).expect("bench inputs");
        let flops = attention_fwd_flops(s);
        let label = shape_label(s);
        group.throughput(Throughput::Elements(flops as u64));
        group.bench_function(BenchmarkId::new("fwd", &label), |bch| {
            bch.iter_custom(|iters| timed(&g, "fwd", s, iters, || case.forward(&g)))
        });
        group.throughput(Throughput::Elements((BWD_FLOP_FACTOR * flops) as u64));
        for (pass, det) in [("bwd", false), ("bwd_deterministic", true)] {
            group.bench_function(BenchmarkId::new(pass, &label), |bch| {
                bch.iter_custom(|iters| timed(&g, pass, s, iters, || case.backward(&g, det)))
            });
        }
        g.synchronize().expect("bench kernels ran");
    }
    group.finish();
    report(&g);
}

fn report(g: &GpuContext) {
    let r = RESULTS.lock().unwrap();
    let mut lines = Vec::new();
    println!(
        "\n{:<34} {:>10} {:>9}",
        "prefix attention (median)", "ms", "TFLOP/s"
    );
    for (pass, s, times) in r.iter() {
        let row = AttnRow::new("gpu", pass, s, median(&mut times.clone()), g.description());
        println!(
            "{:<34} {:>10.3} {:>9.1}",
            format!("{pass}/{}", row.shape),
            row.ms,
            row.tflops
        );
        lines.push(serde_json::to_string(&row).expect("JSON row"));
    }
    if let Ok(path) = std::env::var("PREFIX_TUNE_BENCH_JSON") {
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, lines.join("\n") + "\n")
            .and_then(|_| std::fs::rename(&tmp, &path))
            .unwrap_or_else(|e| eprintln!("writing {path}: {e}"));
    }
}

criterion_group!(benches, bench_attention);
criterion_main!(benches);
