//! Timing of the prefix attention and of the prefix-only training step, shared by
//! `prefix-tune bench` (`src/cli/bench.rs`) and the criterion benchmark `benches/attention.rs`.
//!
//! Attention: the GPU kernels ([`crate::cuda::attention`]) are timed by [`GPU_PROTOCOL`], the
//! method `tools/bench/torch_attention.py` uses for torch too: warm-up calls, then runs of a fixed
//! number of back-to-back calls between two CUDA events (no synchronisation inside a run), the L2
//! cache flushed (a memset of twice its size) before each run, outside the events; the median run
//! is kept. The first call of a run starts from a cold L2, the later ones find what the previous
//! call left there, on both sides alike. The CPU reference (plain and blockwise, f32) is timed
//! with the wall clock. FLOPs count the two matrix products of the forward over the visible keys,
//! `4·B·Hq·D·T·(P + T/2)`, and 2.5× that for the backward (five products instead of two), as
//! FlashAttention counts them.
//!
//! Decode attention (KV-cache decoding, [`crate::cuda::decode`]): the same protocol; tokens/s
//! (new tokens per second of one layer's attention) and the bytes it must read (K and V of every
//! visible key, the queries, the output) per second against the device's memory bandwidth
//! (memory clock × bus width × 2), for the split-KV kernels and the one-warp-per-row kernel.
//!
//! Training: one step is what the trainer does per batch, `loss_and_grad` through the
//! [`Engine`] plus an AdamW update of the prefix on the host.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::cuda::attention::{self as gpu_attn, AttnWorkspace, DevAttnGrads, DevAttnInputs};
use crate::cuda::decode::{self, split_plan, DecodeBufs, DecodeKernel, DecodeShape};
use crate::cuda::GpuContext;
use crate::engine::Engine;
use crate::optim::{AdamW, AdamWConfig, Optimizer};
use crate::prefix::PrefixBank;
use crate::reference::attention::{self as plain, AttnInputs, AttnShape};
use crate::reference::blockwise::{self, BlockSizes};
use crate::reference::model::{Batch, RunOptions};

/// Backward FLOPs per forward FLOP.
pub const BWD_FLOP_FACTOR: f64 = 2.5;

/// Forward FLOPs of one prefix-attention call: `4·B·Hq·D·T·(P + T/2)`.
pub fn attention_fwd_flops(s: &AttnShape) -> f64 {
    4.0 * (s.batch * s.q_heads * s.head_dim * s.seq) as f64 * (s.prefix as f64 + s.seq as f64 / 2.0)
}

/// The GPU grid: B = 8, Hq = Hkv = 16, T ∈ {512, 1024, 2048, 4096} ({512, 2048} when `quick`),
/// P ∈ {10, 16, 128}, D ∈ {64, 128}; then SmolLM2's GQA heads (Hq = 9, Hkv = 3, D = 64) with
/// its prefix of 10. Two prefixes in the bank, sequences alternating between them.
pub fn gpu_attention_grid(quick: bool) -> Vec<AttnShape> {
    let seqs: &[usize] = if quick {
        &[512, 2048]
    } else {
        &[512, 1024, 2048, 4096]
    };
    let mut g = grid(8, 16, 16, seqs, &[10, 16, 128], &[64, 128]);
    g.extend(grid(8, 9, 3, seqs, &[10], &[64]));
    g
}

/// A smoke-test grid: B = 1, Hq = 2, Hkv = 1, T = 64, P = 10, D ∈ {64, 128}.
pub fn tiny_attention_grid() -> Vec<AttnShape> {
    grid(1, 2, 1, &[64], &[10], &[64, 128])
}

/// A grid small enough for the CPU reference: B = 4, Hq = 8, Hkv = 2 (GQA), T ∈ {128, 256},
/// P = 16, D = 64; with `quick` B = 2, Hq = 4, T = 32.
pub fn cpu_attention_grid(quick: bool) -> Vec<AttnShape> {
    if quick {
        grid(2, 4, 2, &[32], &[16], &[64])
    } else {
        grid(4, 8, 2, &[128, 256], &[16], &[64])
    }
}

fn grid(
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    seqs: &[usize],
    prefixes: &[usize],
    dims: &[usize],
) -> Vec<AttnShape> {
    let mut out = Vec::new();
    for &head_dim in dims {
        for &seq in seqs {
            for &prefix in prefixes {
                out.push(AttnShape {
                    batch,
                    q_heads,
                    kv_heads,
                    seq,
                    prefix,
                    head_dim,
                    n_prefixes: 2,
                });
            }
        }
    }
    out
}

/// `T{seq}_P{prefix}_D{head_dim}`, the shape's name in tables and JSON (the heads are fields of
/// their own).
pub fn shape_label(s: &AttnShape) -> String {
    format!("T{}_P{}_D{}", s.seq, s.prefix, s.head_dim)
}

/// The median of `v` (sorted in place); NaN for an empty slice.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Warm-up and repetition counts of an attention measurement.
#[derive(Clone, Copy, Debug)]
pub struct AttnBenchOpts {
    /// Untimed calls before the first measurement.
    pub warmup: usize,
    /// Timed runs; the median is reported.
    pub reps: usize,
    /// Calls per timed run (GPU: back to back between two events).
    pub calls_per_rep: usize,
    /// Also time the deterministic backward (GPU).
    pub deterministic: bool,
    /// GPU: flush the L2 cache before each timed run (outside the events).
    pub flush_l2: bool,
}

/// The GPU timing protocol of every GPU benchmark here and of `tools/bench/torch_attention.py`
/// (its `--warmup`, `--reps`, `--calls` defaults are these numbers): 3 warm-up calls, 10 runs of 5
/// back-to-back calls between two events, L2 flushed before each run.
pub const GPU_PROTOCOL: AttnBenchOpts = AttnBenchOpts {
    warmup: 3,
    reps: 10,
    calls_per_rep: 5,
    deterministic: false,
    flush_l2: true,
};

/// One measured row: an implementation, a pass, a shape.
#[derive(Clone, Debug, Serialize)]
pub struct AttnRow {
    pub bench: &'static str,
    /// `gpu`, `cpu-plain` or `cpu-blockwise`.
    pub implementation: &'static str,
    /// `fwd`, `bwd` or `bwd_deterministic`.
    pub pass: &'static str,
    pub shape: String,
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub prefix: usize,
    pub head_dim: usize,
    /// FLOPs of one call.
    pub flops: f64,
    /// Median milliseconds per call.
    pub ms: f64,
    pub tflops: f64,
    pub device: String,
}

impl AttnRow {
    /// The row of `pass` (`fwd`, `bwd`, `bwd_deterministic`) on `s` at `ms` per call; FLOPs and
    /// TFLOP/s follow from the shape.
    pub fn new(
        implementation: &'static str,
        pass: &'static str,
        s: &AttnShape,
        ms: f64,
        device: &str,
    ) -> Self {
        let fwd = attention_fwd_flops(s);
        let flops = if pass == "fwd" {
            fwd
        } else {
            BWD_FLOP_FACTOR * fwd
        };
        AttnRow {
            bench: "attention",
            implementation,
            pass,
            shape: shape_label(s),
            batch: s.batch,
            q_heads: s.q_heads,
            kv_heads: s.kv_heads,
            seq: s.seq,
            prefix: s.prefix,
            head_dim: s.head_dim,
            flops,
            ms,
            tflops: flops / (ms * 1e-3) / 1e12,
            device: device.to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GPU attention.

/// Uniform fp16 values in [-2, 2) on the device (never all zeros; cheap for the largest shapes).
fn random_half(g: &GpuContext, rng: &mut StdRng, n: usize) -> Result<CudaSlice<f16>> {
    let host: Vec<f16> = (0..n.max(1))
        .map(|_| f16::from_f32(rng.random_range(-2.0f32..2.0)))
        .collect();
    g.stream()
        .clone_htod(&host)
        .map_err(|e| anyhow!("uploading {n} random fp16 values: {e:?}"))
}

/// Device buffers of one attention shape with random inputs; the forward has run once, so the
/// backward can be timed on its O and LSE.
pub struct GpuAttnCase {
    pub shape: AttnShape,
    pub scale: f32,
    q: CudaSlice<f16>,
    k: CudaSlice<f16>,
    v: CudaSlice<f16>,
    pk: CudaSlice<f16>,
    pv: CudaSlice<f16>,
    d_o: CudaSlice<f16>,
    prefix_index: CudaSlice<i32>,
    valid_len: CudaSlice<i32>,
    o: CudaSlice<f16>,
    lse: CudaSlice<f32>,
    ws: AttnWorkspace,
    grads: DevAttnGrads,
}

impl GpuAttnCase {
    /// Random inputs for `s` (seeded), full-length sequences alternating between the bank's
    /// prefixes, softmax scale `1/√D`.
    pub fn new(g: &GpuContext, s: &AttnShape, seed: u64) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let prefix_index: Vec<usize> = (0..s.batch).map(|b| b % s.n_prefixes.max(1)).collect();
        let (pi, vl) = gpu_attn::upload_indices(g, s, &prefix_index, &vec![s.seq; s.batch])?;
        let alloc_err = |what: &str, e| anyhow!("allocating {what}: {e:?}");
        let mut case = GpuAttnCase {
            shape: *s,
            scale: 1.0 / (s.head_dim as f32).sqrt(),
            q: random_half(g, &mut rng, s.q_len())?,
            k: random_half(g, &mut rng, s.kv_len())?,
            v: random_half(g, &mut rng, s.kv_len())?,
            pk: random_half(g, &mut rng, s.bank_len())?,
            pv: random_half(g, &mut rng, s.bank_len())?,
            d_o: random_half(g, &mut rng, s.q_len())?,
            prefix_index: pi,
            valid_len: vl,
            o: g.stream()
                .alloc_zeros::<f16>(s.q_len().max(1))
                .map_err(|e| alloc_err("o", e))?,
            lse: g
                .stream()
                .alloc_zeros::<f32>(s.lse_len().max(1))
                .map_err(|e| alloc_err("lse", e))?,
            ws: AttnWorkspace::new(g, s, true)?,
            grads: DevAttnGrads::new(g, s)?,
        };
        case.forward(g)?;
        g.synchronize().context("the first forward")?;
        Ok(case)
    }

    /// One forward launch (asynchronous).
    pub fn forward(&mut self, g: &GpuContext) -> Result<()> {
        let inp = DevAttnInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            prefix_k: &self.pk,
            prefix_v: &self.pv,
            prefix_index: &self.prefix_index,
            valid_len: &self.valid_len,
        };
        gpu_attn::forward(g, &self.shape, self.scale, &inp, &mut self.o, &mut self.lse)
    }

    /// One backward (preprocess, main kernel, prefix reduction; asynchronous).
    pub fn backward(&mut self, g: &GpuContext, deterministic: bool) -> Result<()> {
        let inp = DevAttnInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            prefix_k: &self.pk,
            prefix_v: &self.pv,
            prefix_index: &self.prefix_index,
            valid_len: &self.valid_len,
        };
        gpu_attn::backward(
            g,
            &self.shape,
            self.scale,
            deterministic,
            &inp,
            &self.o,
            &self.lse,
            &self.d_o,
            &mut self.ws,
            &mut self.grads,
        )
    }
}

/// Milliseconds per call of `calls` calls of `f`, timed with CUDA events on the context's stream.
pub fn cuda_time_ms(g: &GpuContext, calls: u64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let ctx = g.context();
    let event = || {
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| anyhow!("creating a CUDA event: {e:?}"))
    };
    let (start, end) = (event()?, event()?);
    start
        .record(g.stream())
        .map_err(|e| anyhow!("recording a CUDA event: {e:?}"))?;
    for _ in 0..calls {
        f()?;
    }
    end.record(g.stream())
        .map_err(|e| anyhow!("recording a CUDA event: {e:?}"))?;
    let ms = start
        .elapsed_ms(&end)
        .map_err(|e| anyhow!("reading CUDA event times (a kernel failed?): {e:?}"))?;
    Ok(ms as f64 / calls.max(1) as f64)
}

/// A device buffer of twice the L2 cache's size: writing it (a memset) evicts what earlier
/// kernels left in L2.
pub struct L2Flush {
    buf: CudaSlice<u8>,
}

impl L2Flush {
    pub fn new(g: &GpuContext) -> Result<Self> {
        let l2 = g
            .context()
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(|e| anyhow!("reading the L2 cache size: {e:?}"))?
            .max(1 << 20) as usize;
        let buf = g
            .stream()
            .alloc_zeros::<u8>(2 * l2)
            .map_err(|e| anyhow!("allocating the L2 flush buffer: {e:?}"))?;
        Ok(L2Flush { buf })
    }

    /// Enqueues the flush on the context's stream.
    pub fn flush(&mut self, g: &GpuContext) -> Result<()> {
        g.stream()
            .memset_zeros(&mut self.buf)
            .map_err(|e| anyhow!("flushing L2: {e:?}"))
    }
}

/// [`GPU_PROTOCOL`] with `o`'s counts: warm-up, then the median over `reps` runs of
/// `calls_per_rep` back-to-back calls of `f` between two events (L2 flushed before each run when
/// `o.flush_l2`), in ms per call.
pub fn gpu_median(
    g: &GpuContext,
    o: &AttnBenchOpts,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let mut flush = if o.flush_l2 {
        Some(L2Flush::new(g)?)
    } else {
        None
    };
    for _ in 0..o.warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(o.reps.max(1));
    for _ in 0..o.reps.max(1) {
        if let Some(fl) = flush.as_mut() {
            fl.flush(g)?;
        }
        times.push(cuda_time_ms(g, o.calls_per_rep.max(1) as u64, &mut f)?);
    }
    Ok(median(&mut times))
}

/// Forward and backward (and the deterministic backward when asked) of the GPU kernels on `s`.
pub fn bench_gpu_attention(
    g: &GpuContext,
    s: &AttnShape,
    o: &AttnBenchOpts,
    seed: u64,
) -> Result<Vec<AttnRow>> {
    let mut case =
        GpuAttnCase::new(g, s, seed).with_context(|| format!("setting up {}", shape_label(s)))?;
    let dev = g.description().to_string();
    let mut rows = Vec::new();
    let fwd = gpu_median(g, o, || case.forward(g))?;
    rows.push(AttnRow::new("gpu", "fwd", s, fwd, &dev));
    let bwd = gpu_median(g, o, || case.backward(g, false))?;
    rows.push(AttnRow::new("gpu", "bwd", s, bwd, &dev));
    if o.deterministic {
        let det = gpu_median(g, o, || case.backward(g, true))?;
        rows.push(AttnRow::new("gpu", "bwd_deterministic", s, det, &dev));
    }
    g.synchronize().context("attention bench kernels")?;
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// GPU decode attention.

/// One decode measurement: `B` sequences of one new token each over `past` cached entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeCase {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Cached entries of every sequence (the cache holds `past + 16`).
    pub past: usize,
}

impl DecodeCase {
    /// The launch shape: one new token, a cache with 16 entries of headroom.
    pub fn shape(&self) -> DecodeShape {
        DecodeShape {
            batch: self.batch,
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            n_new: 1,
            capacity: self.past + 16,
        }
    }

    /// Bytes one call must move at least: K and V of every visible key (the cache and the new
    /// token), the queries and the output, fp16.
    pub fn bytes(&self) -> f64 {
        let kv = 2 * self.batch * self.kv_heads * (self.past + 1) * self.head_dim;
        let qo = 2 * self.batch * self.q_heads * self.head_dim;
        2.0 * (kv + qo) as f64
    }
}

/// The decode grid: SmolLM2's heads (9 / 3, D = 64) and a Llama-3-8B-like attention (32 / 8,
/// D = 128), B ∈ {1, 8, 32}, past ∈ {512, 2048, 8192} ({1, 32} × {512, 8192} when `quick`).
pub fn gpu_decode_grid(quick: bool) -> Vec<DecodeCase> {
    let (batches, pasts): (&[usize], &[usize]) = if quick {
        (&[1, 32], &[512, 8192])
    } else {
        (&[1, 8, 32], &[512, 2048, 8192])
    };
    let mut out = Vec::new();
    for (q_heads, kv_heads, head_dim) in [(9, 3, 64), (32, 8, 128)] {
        for &batch in batches {
            for &past in pasts {
                out.push(DecodeCase {
                    batch,
                    q_heads,
                    kv_heads,
                    head_dim,
                    past,
                });
            }
        }
    }
    out
}

/// One measured decode row.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeRow {
    pub bench: &'static str,
    /// `split-kv` (flash-decoding kernels) or `one-warp-per-row`.
    pub implementation: &'static str,
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub past: usize,
    /// Splits of the key range (1 for the one-warp kernel).
    pub splits: usize,
    /// Median microseconds per call.
    pub us: f64,
    /// New tokens per second (one layer's attention).
    pub tokens_per_s: f64,
    /// [`DecodeCase::bytes`] per second, GB/s.
    pub gb_s: f64,
    /// The device's memory bandwidth, GB/s (memory clock × bus width × 2).
    pub bound_gb_s: f64,
    pub device: String,
}

/// The device's memory bandwidth in GB/s from its memory clock and bus width (DDR: two
/// transfers per clock).
pub fn memory_bound_gb_s(g: &GpuContext) -> Result<f64> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let attr = |a| {
        g.context()
            .attribute(a)
            .map_err(|e| anyhow!("reading {a:?}: {e:?}"))
    };
    let khz = attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE)? as f64;
    let bits = attr(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)? as f64;
    Ok(2.0 * khz * 1e3 * bits / 8.0 / 1e9)
}

/// Both decode kernels on case `c` with random inputs (seeded), timed by `o`.
pub fn bench_gpu_decode(
    g: &GpuContext,
    c: &DecodeCase,
    o: &AttnBenchOpts,
    seed: u64,
) -> Result<Vec<DecodeRow>> {
    let s = c.shape();
    let mut rng = StdRng::seed_from_u64(seed);
    let q = random_half(g, &mut rng, s.q_len())?;
    let k_new = random_half(g, &mut rng, s.new_kv_len())?;
    let v_new = random_half(g, &mut rng, s.new_kv_len())?;
    let cache_k = random_half(g, &mut rng, s.cache_len())?;
    let cache_v = random_half(g, &mut rng, s.cache_len())?;
    let up = |x: Vec<i32>| {
        g.stream()
            .clone_htod(&x)
            .map_err(|e| anyhow!("uploading decode lengths: {e:?}"))
    };
    let past = up(vec![c.past as i32; c.batch])?;
    let n_new = up(vec![1; c.batch])?;
    let mut out = g
        .stream()
        .alloc_zeros::<f16>(s.q_len())
        .map_err(|e| anyhow!("allocating the decode output: {e:?}"))?;
    let bufs = DecodeBufs {
        q: &q,
        k_new: &k_new,
        v_new: &v_new,
        cache_k: &cache_k,
        cache_v: &cache_v,
    };
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    let bound = memory_bound_gb_s(g)?;
    let splits = split_plan(&s)?.map_or(1, |p| p.n_splits);
    let mut rows = Vec::new();
    for (name, kernel, splits) in [
        ("split-kv", DecodeKernel::Auto, splits),
        ("one-warp-per-row", DecodeKernel::OneWarpPerRow, 1),
    ] {
        let ms = gpu_median(g, o, || {
            decode::forward_with(g, kernel, &s, scale, &bufs, &past, &n_new, &mut out)
        })?;
        rows.push(DecodeRow {
            bench: "decode",
            implementation: name,
            batch: c.batch,
            q_heads: c.q_heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            past: c.past,
            splits,
            us: ms * 1e3,
            tokens_per_s: c.batch as f64 / (ms * 1e-3),
            gb_s: c.bytes() / (ms * 1e-3) / 1e9,
            bound_gb_s: bound,
            device: g.description().to_string(),
        });
    }
    g.synchronize().context("decode bench kernels")?;
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// CPU attention.

fn wall_median(o: &AttnBenchOpts, mut f: impl FnMut()) -> f64 {
    for _ in 0..o.warmup {
        f();
    }
    let calls = o.calls_per_rep.max(1);
    let mut times: Vec<f64> = (0..o.reps.max(1))
        .map(|_| {
            let t0 = Instant::now();
            for _ in 0..calls {
                f();
            }
            t0.elapsed().as_secs_f64() * 1e3 / calls as f64
        })
        .collect();
    median(&mut times)
}

/// Forward and backward of the CPU reference attention in f32 on `s`: the plain version
/// (`cpu-plain`) and the blockwise, kernel-shaped one (`cpu-blockwise`, 64 × 64 tiles).
pub fn bench_cpu_attention(s: &AttnShape, o: &AttnBenchOpts, seed: u64) -> Vec<AttnRow> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
    let (q, k, v) = (draw(s.q_len()), draw(s.kv_len()), draw(s.kv_len()));
    let (pk, pv, d_o) = (draw(s.bank_len()), draw(s.bank_len()), draw(s.q_len()));
    let prefix_index: Vec<usize> = (0..s.batch).map(|b| b % s.n_prefixes.max(1)).collect();
    let valid_len = vec![s.seq; s.batch];
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
    let dev = format!("CPU ({} threads)", rayon::current_num_threads());
    let bs = BlockSizes::DEFAULT;
    let mut rows = Vec::new();
    let (out, lse) = plain::forward(s, &inp);
    let ms = wall_median(o, || {
        std::hint::black_box(plain::forward(s, &inp));
    });
    rows.push(AttnRow::new("cpu-plain", "fwd", s, ms, &dev));
    let ms = wall_median(o, || {
        std::hint::black_box(plain::backward(s, &inp, &out, &lse, &d_o));
    });
    rows.push(AttnRow::new("cpu-plain", "bwd", s, ms, &dev));
    let ms = wall_median(o, || {
        std::hint::black_box(blockwise::forward(s, &inp, bs));
    });
    rows.push(AttnRow::new("cpu-blockwise", "fwd", s, ms, &dev));
    let ms = wall_median(o, || {
        std::hint::black_box(blockwise::backward(s, &inp, &out, &lse, &d_o, bs));
    });
    rows.push(AttnRow::new("cpu-blockwise", "bwd", s, ms, &dev));
    rows
}

// ---------------------------------------------------------------------------------------------
// Training step.

/// Result of [`bench_train_steps`].
#[derive(Clone, Copy, Debug)]
pub struct TrainTiming {
    /// Median seconds of one step (loss_and_grad + AdamW update).
    pub step_s: f64,
    /// Median seconds of the loss alone (forward, no gradient).
    pub forward_s: f64,
    /// Mean loss of the last timed step.
    pub last_loss: f32,
    /// Steps (warm-up and timed) skipped because the fp16 gradient overflowed
    /// ([`crate::engine::GradOverflow`]: no update in them, the engine lowered its loss scale).
    pub overflow_skips: u64,
}

/// Times `steps` training steps after `warmup` untimed ones on `engine`: each step is
/// `loss_and_grad` of `batch` and an AdamW update (lr 1e-3) of `prefix` through
/// [`Engine::apply_update`] (on the engine's device: the host for the CPU engine); then the
/// loss alone, `steps` times. Step times are medians. A step whose fp16 gradient overflowed is
/// skipped as training skips it (no update; counted, and timed like any other step).
pub fn bench_train_steps(
    engine: &mut dyn Engine,
    prefix: &mut PrefixBank<f32>,
    batch: &Batch,
    warmup: usize,
    steps: usize,
) -> Result<TrainTiming> {
    let opts = RunOptions::default();
    let mut st = StepState::new(engine, prefix)?;
    for _ in 0..warmup {
        st.step(engine, batch)?;
    }
    let mut times = (0..steps.max(1))
        .map(|_| st.step(engine, batch).map(|d| d.as_secs_f64()))
        .collect::<Result<Vec<f64>>>()?;
    let step_s = median(&mut times);
    *prefix = st.prefix(engine)?;
    let mut fwd = (0..steps.max(1))
        .map(|_| {
            let t0 = Instant::now();
            engine.loss(Some(prefix), batch, &opts)?;
            Ok(t0.elapsed().as_secs_f64())
        })
        .collect::<Result<Vec<f64>>>()?;
    Ok(TrainTiming {
        step_s,
        forward_s: median(&mut fwd),
        last_loss: st.last_loss,
        overflow_skips: st.overflow_skips,
    })
}

/// One timed training step of the benchmark: the engine's [`Engine::train_step`] of one
/// micro-batch with AdamW (lr 1e-3, no clipping), the training state where the engine keeps it
/// (the GPU engine: on the device), as `train` runs it.
pub struct StepState {
    state: Box<dyn crate::engine::TrainingState>,
    pub last_loss: f32,
    pub overflow_skips: u64,
}

impl StepState {
    pub fn new(engine: &mut dyn Engine, prefix: &PrefixBank<f32>) -> Result<Self> {
        let n = prefix.n_params();
        let opt = Optimizer::AdamW(AdamW::new(AdamWConfig::default(), n));
        let state = engine.begin_training(crate::prefix::Trainable::Bank(prefix.clone()), opt)?;
        Ok(StepState {
            state,
            last_loss: f32::NAN,
            overflow_skips: 0,
        })
    }

    pub fn step(&mut self, engine: &mut dyn Engine, batch: &Batch) -> Result<Duration> {
        use crate::engine::{StepOutcome, StepRequest};
        let t0 = Instant::now();
        let n_targets: usize = batch.n_targets().iter().sum();
        let outcome = engine.train_step(
            &mut *self.state,
            &StepRequest {
                micro: std::slice::from_ref(batch),
                n_targets,
                opts: &RunOptions::default(),
                lr: 1e-3,
                max_grad_norm: 0.0,
            },
        )?;
        let elapsed = t0.elapsed();
        match outcome {
            StepOutcome::Updated { loss_sum, .. } => {
                self.last_loss = (loss_sum / n_targets.max(1) as f64) as f32
            }
            StepOutcome::Skipped {
                loss_sum,
                n_targets,
                ..
            } => {
                self.overflow_skips += 1;
                self.last_loss = (loss_sum / n_targets.max(1) as f64) as f32;
            }
            StepOutcome::NotFinite {
                loss_sum,
                grad_norm,
            } => {
                bail!("benchmark step: not finite (loss sum {loss_sum}, gradient norm {grad_norm})")
            }
            StepOutcome::DivergedUpdate => bail!("benchmark step: the update diverged"),
        }
        Ok(elapsed)
    }

    /// The prefix as of the last step (read back from the engine).
    pub fn prefix(&mut self, engine: &mut dyn Engine) -> Result<PrefixBank<f32>> {
        engine.training_prefix(&mut *self.state)
    }
}

/// What the simulated device counts for one training step, a prefill and one decoded token.
#[derive(Clone, Debug)]
pub struct SimStepCounts {
    pub step: crate::cuda::context::SimCounts,
    pub prefill: crate::cuda::context::SimCounts,
    /// Over `tokens` decode steps (divide by it for one token).
    pub decode: crate::cuda::context::SimCounts,
    pub tokens: u64,
    pub prompt: usize,
}

/// The simulated device's counts of one training step (as the benchmark times it), then of a
/// prefill of `prompt` tokens per sequence and `tokens` single-token decode steps of the batch's
/// sequences with prefix 0; `None` on a real GPU.
pub fn sim_step_counts(
    engine: &mut dyn Engine,
    prefix: &mut PrefixBank<f32>,
    batch: &Batch,
    prompt: usize,
    tokens: u64,
) -> Result<Option<SimStepCounts>> {
    use crate::cuda::context::{reset_simulator_peak, SimCounts};
    let Some(_) = SimCounts::now() else {
        return Ok(None);
    };
    let mut st = StepState::new(engine, prefix)?;
    st.step(engine, batch)?; // warm: workspaces sized
    reset_simulator_peak();
    let c0 = SimCounts::now().unwrap_or(SimCounts(Vec::new()));
    st.step(engine, batch)?;
    let c1 = SimCounts::now().unwrap_or(SimCounts(Vec::new()));
    *prefix = st.prefix(engine)?;
    let take = prompt.clamp(1, batch.seq.max(1));
    let rows: Vec<Vec<u32>> = (0..batch.batch)
        .map(|b| batch.tokens[b * batch.seq..b * batch.seq + take].to_vec())
        .collect();
    let index: Vec<Option<usize>> = vec![Some(0); rows.len()];
    let opts = RunOptions::default();
    reset_simulator_peak();
    let d0 = SimCounts::now().unwrap_or(SimCounts(Vec::new()));
    let mut cache = engine.begin_decode(Some(prefix), &index, &opts)?;
    engine.decode(cache.as_mut(), &rows)?;
    let d1 = SimCounts::now().unwrap_or(SimCounts(Vec::new()));
    let next: Vec<Vec<u32>> = rows.iter().map(|r| vec![r[0]]).collect();
    for _ in 0..tokens.max(1) {
        engine.decode(cache.as_mut(), &next)?;
    }
    let d2 = SimCounts::now().unwrap_or(SimCounts(Vec::new()));
    Ok(Some(SimStepCounts {
        step: c1.since(&c0),
        prefill: d1.since(&d0),
        decode: d2.since(&d1),
        tokens: tokens.max(1),
        prompt: prompt.max(1),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_follow_the_formula() {
        let s = AttnShape {
            batch: 3,
            q_heads: 5,
            kv_heads: 5,
            seq: 7,
            prefix: 2,
            head_dim: 4,
            n_prefixes: 1,
        };
        // Count the multiply-adds directly: each query row t sees P + t + 1 keys; QKᵀ and PV
        // are D multiply-adds (2 FLOPs) per (row, key). The formula's T/2 is the causal
        // triangle without the diagonal's half row.
        let pairs: usize = (0..s.seq).map(|t| s.prefix + t + 1).sum();
        let exact = 2.0 * 2.0 * (s.batch * s.q_heads * s.head_dim * pairs) as f64;
        let f = attention_fwd_flops(&s);
        let diag = 4.0 * (s.batch * s.q_heads * s.head_dim * s.seq) as f64 * 0.5;
        assert!((exact - (f + diag)).abs() < 1e-9, "{exact} vs {f}");
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn grids_have_the_issue_shapes() {
        let g = gpu_attention_grid(false);
        assert_eq!(g.len(), 28);
        assert!(g.iter().all(|s| s.batch == 8));
        assert_eq!(g.iter().filter(|s| s.q_heads == 16).count(), 24);
        // SmolLM2's GQA shape with P = 10, on every sequence length.
        assert_eq!(
            g.iter()
                .filter(|s| (s.q_heads, s.kv_heads, s.prefix, s.head_dim) == (9, 3, 10, 64))
                .count(),
            4
        );
        assert_eq!(gpu_attention_grid(true).len(), 14);
        assert_eq!(gpu_decode_grid(false).len(), 18);
        assert_eq!(gpu_decode_grid(true).len(), 8);
    }

    #[test]
    fn decode_bytes_count_every_visible_key() {
        let c = DecodeCase {
            batch: 2,
            q_heads: 9,
            kv_heads: 3,
            head_dim: 64,
            past: 10,
        };
        // K and V: 2 x 3 heads x 11 keys x 64 x 2 B each; q and o: 2 x 9 x 64 x 2 B each.
        assert_eq!(
            c.bytes(),
            (2.0 * 2.0 * 3.0 * 11.0 * 64.0 + 2.0 * 2.0 * 9.0 * 64.0) * 2.0
        );
        assert_eq!(c.shape().capacity, 26);
    }
}
