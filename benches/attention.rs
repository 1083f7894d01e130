//! GPU benchmark of the fused prefix-attention kernels and the KV-cache decode attention.
//!
//! Criterion part: forward and backward (atomic dQ and deterministic; prefix gradients reduced
//! over the batch) on the grid of `prefix_tune::bench::gpu_attention_grid` (B = 8, Hq = Hkv = 16,
//! T ∈ {512, 1024, 2048, 4096}, P ∈ {10, 16, 128}, D ∈ {64, 128}, and SmolLM2's GQA 9/3 heads at
//! D = 64, P = 10), and the decode kernels on `gpu_decode_grid`, timed with CUDA events inside
//! `iter_custom` (criterion's throughput, "elem/s", is FLOP/s for the attention, tokens/s for
//! decoding).
//!
//! The table printed afterwards (and written as JSON lines to `$PREFIX_TUNE_BENCH_JSON` when set;
//! scripts/gpu-check reads it) does not come from criterion's samples, whose warm-up runs and
//! varying iteration counts differ from how the torch baseline is timed: it is measured again
//! with `prefix_tune::bench::GPU_PROTOCOL`, the protocol of `prefix-tune bench attention` /
//! `bench decode` and of `tools/bench/torch_attention.py` (warm-up calls, runs of 5 back-to-back
//! calls between two events, L2 flushed before each run, the median run).
//!
//! Without a usable GPU it prints SKIPPED and measures nothing. `PREFIX_TUNE_BENCH_QUICK=1`
//! times only T ∈ {512, 2048} (and the quick decode grid).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use prefix_tune::bench::{
    attention_fwd_flops, bench_gpu_attention, bench_gpu_decode, cuda_time_ms, gpu_attention_grid,
    gpu_decode_grid, shape_label, AttnBenchOpts, GpuAttnCase, BWD_FLOP_FACTOR, GPU_PROTOCOL,
};
use prefix_tune::cuda::decode::{self as dec, DecodeBufs};
use prefix_tune::cuda::GpuContext;

fn quick() -> bool {
    std::env::var("PREFIX_TUNE_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// Times `iters` back-to-back calls of `f` between two CUDA events.
fn timed(g: &GpuContext, iters: u64, f: impl FnMut() -> anyhow::Result<()>) -> Duration {
    let ms = cuda_time_ms(g, iters, f).expect("timed launches");
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
    let mut group = c.benchmark_group("prefix_attention");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for (i, s) in gpu_attention_grid(quick()).iter().enumerate() {
        let mut case = GpuAttnCase::new(&g, s, 11 + i as u64).expect("bench inputs");
        let flops = attention_fwd_flops(s);
        // Heads in the criterion id: the grid has MHA and GQA rows of the same T, P, D.
        let label = format!("{}_H{}x{}", shape_label(s), s.q_heads, s.kv_heads);
        group.throughput(Throughput::Elements(flops as u64));
        group.bench_function(BenchmarkId::new("fwd", &label), |bch| {
            bch.iter_custom(|iters| timed(&g, iters, || case.forward(&g)))
        });
        group.throughput(Throughput::Elements((BWD_FLOP_FACTOR * flops) as u64));
        for (pass, det) in [("bwd", false), ("bwd_deterministic", true)] {
            group.bench_function(BenchmarkId::new(pass, &label), |bch| {
                bch.iter_custom(|iters| timed(&g, iters, || case.backward(&g, det)))
            });
        }
        g.synchronize().expect("bench kernels ran");
    }
    group.finish();

    let mut group = c.benchmark_group("decode_attention");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(500));
    for (i, d) in gpu_decode_grid(quick()).iter().enumerate() {
        let s = d.shape();
        let b = DecodeBuffers::new(&g, &s, d.past, 31 + i as u64);
        let scale = 1.0 / (d.head_dim as f32).sqrt();
        let label = format!(
            "B{}_H{}x{}_D{}_past{}",
            d.batch, d.q_heads, d.kv_heads, d.head_dim, d.past
        );
        group.throughput(Throughput::Elements(d.batch as u64));
        for (name, kernel) in [
            ("split_kv", dec::DecodeKernel::Auto),
            ("one_warp_per_row", dec::DecodeKernel::OneWarpPerRow),
        ] {
            let mut out = g.stream().alloc_zeros(s.q_len()).expect("decode output");
            group.bench_function(BenchmarkId::new(name, &label), |bch| {
                bch.iter_custom(|iters| {
                    timed(&g, iters, || {
                        dec::forward_with(
                            &g,
                            kernel,
                            &s,
                            scale,
                            &b.bufs(),
                            &b.past,
                            &b.n_new,
                            &mut out,
                        )
                    })
                })
            });
        }
        g.synchronize().expect("decode kernels ran");
    }
    group.finish();
    report(&g);
}

/// Random decode inputs on the device.
struct DecodeBuffers {
    q: cudarc::driver::CudaSlice<half::f16>,
    k_new: cudarc::driver::CudaSlice<half::f16>,
    v_new: cudarc::driver::CudaSlice<half::f16>,
    cache_k: cudarc::driver::CudaSlice<half::f16>,
    cache_v: cudarc::driver::CudaSlice<half::f16>,
    past: cudarc::driver::CudaSlice<i32>,
    n_new: cudarc::driver::CudaSlice<i32>,
}

impl DecodeBuffers {
    fn new(g: &GpuContext, s: &dec::DecodeShape, past: usize, seed: u64) -> Self {
        let mut x = seed | 1;
        let mut rnd = |n: usize| -> Vec<half::f16> {
            (0..n.max(1))
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    half::f16::from_f32((x % 4001) as f32 / 1000.0 - 2.0)
                })
                .collect()
        };
        let up = |v: Vec<half::f16>| g.stream().clone_htod(&v).expect("upload");
        let (q, k_new, v_new) = (
            up(rnd(s.q_len())),
            up(rnd(s.new_kv_len())),
            up(rnd(s.new_kv_len())),
        );
        let (cache_k, cache_v) = (up(rnd(s.cache_len())), up(rnd(s.cache_len())));
        let ints = |v: Vec<i32>| g.stream().clone_htod(&v).expect("upload");
        DecodeBuffers {
            q,
            k_new,
            v_new,
            cache_k,
            cache_v,
            past: ints(vec![past as i32; s.batch]),
            n_new: ints(vec![1; s.batch]),
        }
    }

    fn bufs(&self) -> DecodeBufs<'_, cudarc::driver::CudaSlice<half::f16>> {
        DecodeBufs {
            q: &self.q,
            k_new: &self.k_new,
            v_new: &self.v_new,
            cache_k: &self.cache_k,
            cache_v: &self.cache_v,
        }
    }
}

/// The table and the JSON lines, measured with [`GPU_PROTOCOL`] (not criterion's samples).
fn report(g: &GpuContext) {
    let opts = AttnBenchOpts {
        deterministic: true,
        ..GPU_PROTOCOL
    };
    let mut lines = Vec::new();
    println!(
        "\n{:<34} {:>10} {:>9}   (median of {} runs of {} back-to-back calls, L2 flushed before each)",
        "prefix attention", "ms", "TFLOP/s", opts.reps, opts.calls_per_rep
    );
    for (i, s) in gpu_attention_grid(quick()).iter().enumerate() {
        for row in bench_gpu_attention(g, s, &opts, 11 + i as u64).expect("attention protocol") {
            println!(
                "{:<34} {:>10.3} {:>9.1}",
                format!(
                    "{}/{}_H{}x{}",
                    row.pass, row.shape, row.q_heads, row.kv_heads
                ),
                row.ms,
                row.tflops
            );
            lines.push(serde_json::to_string(&row).expect("JSON row"));
        }
    }
    println!(
        "\n{:<40} {:>9} {:>11} {:>8} {:>6}",
        "decode attention", "us", "tokens/s", "GB/s", "bound"
    );
    for (i, d) in gpu_decode_grid(quick()).iter().enumerate() {
        for row in bench_gpu_decode(g, d, &opts, 31 + i as u64).expect("decode protocol") {
            println!(
                "{:<40} {:>9.1} {:>11.0} {:>8.1} {:>5.0}%",
                format!(
                    "{}/B{}_H{}x{}_D{}_past{}",
                    row.implementation,
                    row.batch,
                    row.q_heads,
                    row.kv_heads,
                    row.head_dim,
                    row.past
                ),
                row.us,
                row.tokens_per_s,
                row.gb_s,
                100.0 * row.gb_s / row.bound_gb_s
            );
            lines.push(serde_json::to_string(&row).expect("JSON row"));
        }
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
