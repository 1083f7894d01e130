//! The KV-cache decode attention (`kernels/decode_attention.cu`, ABI `kernels/abi/decode.h`):
//! the parameter builder, the checks and the launches (`cuda::host` calls them on host data).
//!
//! Layouts: queries and the new keys/values `[B, H, T, D]` (T new-token slots per sequence),
//! the cache `[B, Hkv, capacity, D]` whose first `past[b]` entries of sequence `b` are its prefix
//! then its cached tokens. Query row `t < n_new[b]` attends over the cache entries then the new
//! entries `0..=t`; rows past `n_new[b]` are zeros.
//!
//! On the GPU, head dims that are a multiple of 8 run the split-KV kernels ([`split_plan`]:
//! 16-byte loads, a CTA per (sequence x kv head, key split, row group) whose query heads share
//! each K/V load, then a combine pass over the splits); other head dims run the one-warp-per-row kernel ([`launch_config`]).

use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use half::f16;

use super::abi::{
    pt_decode_params, PT_DECODE_COMBINE_THREADS, PT_DECODE_MAX_HEAD_DIM, PT_DECODE_SPLIT_ROWS,
    PT_DECODE_SPLIT_SMEM_D128, PT_DECODE_SPLIT_SMEM_D256, PT_DECODE_SPLIT_SMEM_D64,
    PT_DECODE_SPLIT_THREADS, PT_DECODE_THREADS,
};
use super::context::{launched, GpuContext};
use super::model_ops::check_len;

// SAFETY: a bindgen-generated `#[repr(C)]` struct of plain integers and a float, with the layout
// of the C definition the kernel takes by value.
unsafe impl DeviceRepr for pt_decode_params {}

/// Sizes of one decode-attention launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeShape {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// New-token slots per sequence (T).
    pub n_new: usize,
    /// Cache entries per (sequence, kv head).
    pub capacity: usize,
}

impl DecodeShape {
    /// Elements of `[B, Hq, T, D]`.
    pub fn q_len(&self) -> usize {
        self.batch * self.q_heads * self.n_new * self.head_dim
    }
    /// Elements of `[B, Hkv, T, D]`.
    pub fn new_kv_len(&self) -> usize {
        self.batch * self.kv_heads * self.n_new * self.head_dim
    }
    /// Elements of the cache `[B, Hkv, capacity, D]`.
    pub fn cache_len(&self) -> usize {
        self.batch * self.kv_heads * self.capacity * self.head_dim
    }
}

fn i32_of(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow::anyhow!("{what} = {v} does not fit the kernel's int32"))
}

/// The ABI struct of a launch, after checking the shape.
pub fn decode_params(s: &DecodeShape, scale: f32) -> Result<pt_decode_params> {
    if s.head_dim == 0 || s.head_dim > PT_DECODE_MAX_HEAD_DIM as usize {
        bail!(
            "decode attention: head dim {} outside 1..={PT_DECODE_MAX_HEAD_DIM}",
            s.head_dim
        );
    }
    if s.kv_heads == 0 || s.q_heads % s.kv_heads != 0 {
        bail!(
            "decode attention: {} query heads are not a multiple of {} kv heads",
            s.q_heads,
            s.kv_heads
        );
    }
    i32_of("cache elements", s.cache_len())?;
    check_grid(s)?;
    Ok(pt_decode_params {
        batch: i32_of("batch", s.batch)?,
        q_heads: i32_of("query heads", s.q_heads)?,
        kv_heads: i32_of("kv heads", s.kv_heads)?,
        head_dim: i32_of("head dim", s.head_dim)?,
        n_new: i32_of("new tokens", s.n_new)?,
        capacity: i32_of("cache capacity", s.capacity)?,
        scale,
        keys_per_split: 0,
        n_splits: 0,
    })
}

/// Checks the per-sequence lengths the kernel trusts: `n_new[b] <= T`, `past[b] <= capacity`.
pub fn check_lengths(s: &DecodeShape, past: &[i32], n_new: &[i32]) -> Result<()> {
    check_len("past lengths", past.len(), s.batch)?;
    check_len("new-token counts", n_new.len(), s.batch)?;
    for b in 0..s.batch {
        if n_new[b] < 0 || n_new[b] as usize > s.n_new {
            bail!(
                "decode attention: sequence {b} has {} new tokens of {} slots",
                n_new[b],
                s.n_new
            );
        }
        if past[b] < 0 || past[b] as usize > s.capacity {
            bail!(
                "decode attention: sequence {b} has {} cached entries, the cache holds {}",
                past[b],
                s.capacity
            );
        }
    }
    Ok(())
}

/// Device buffers of one launch.
pub struct DecodeBufs<'a, K: ?Sized> {
    pub q: &'a K,
    pub k_new: &'a K,
    pub v_new: &'a K,
    pub cache_k: &'a K,
    pub cache_v: &'a K,
}

/// Checks every buffer's length against the shape.
pub fn check_bufs(s: &DecodeShape, lens: [usize; 5], o_len: usize) -> Result<()> {
    let names = [
        "queries",
        "new keys",
        "new values",
        "cache keys",
        "cache values",
    ];
    let want = [
        s.q_len(),
        s.new_kv_len(),
        s.new_kv_len(),
        s.cache_len(),
        s.cache_len(),
    ];
    for ((name, got), want) in names.iter().zip(lens).zip(want) {
        check_len(name, got, want)?;
    }
    check_len("attention output", o_len, s.q_len())
}

/// CUDA caps grid.y and grid.z at 65535: the decode grid `(T, Hq, B)` refuses more query heads
/// or sequences with a clear error (the launch would fail with `CUDA_ERROR_INVALID_VALUE`).
fn check_grid(s: &DecodeShape) -> Result<()> {
    const MAX_GRID_YZ: usize = 65535;
    if s.q_heads > MAX_GRID_YZ || s.batch > MAX_GRID_YZ {
        bail!(
            "decode attention: {} sequences x {} query heads exceed the launch grid's limit of \
             {MAX_GRID_YZ} each (decode fewer sequences at a time)",
            s.batch,
            s.q_heads
        );
    }
    i32_of("new tokens", s.n_new).map(|_| ())
}

/// The launch shape of the one-warp-per-row kernel (abi/decode.h; the GPU's for head dims that are not a multiple of 8): grid `(T, Hq, B)`, no shared memory.
pub fn launch_config(s: &DecodeShape) -> Result<LaunchConfig> {
    check_grid(s)?;
    Ok(LaunchConfig {
        grid_dim: (s.n_new as u32, s.q_heads as u32, s.batch as u32),
        block_dim: (PT_DECODE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// CTAs the split-KV launch aims for: 4 per SM of an H100 (132 SMs; the split kernels' registers
/// allow 4 CTAs of 128 threads per SM), so the KV length is split until the GPU is covered.
pub const SPLIT_TARGET_CTAS: usize = 4 * 132;
/// The fewest keys a split gets (below that the partials cost more than they save).
pub const MIN_KEYS_PER_SPLIT: usize = 64;

/// The split-KV (flash-decoding) launches of abi/decode.h for one shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitPlan {
    /// `pt_decode_split_d64`, `_d128` or `_d256`.
    pub kernel: &'static str,
    /// `(B * Hkv, n_splits, row groups)`.
    pub grid: (u32, u32, u32),
    pub threads: u32,
    pub smem: u32,
    pub n_splits: usize,
    pub keys_per_split: usize,
    /// `pt_decode_combine`'s grid (one warp per query row), when `n_splits > 1`.
    pub combine_blocks: Option<u32>,
}

impl SplitPlan {
    /// Elements of the fp32 partials `(o_part, lse_part)`; 0 without a combine pass.
    pub fn partial_lens(&self, s: &DecodeShape) -> (usize, usize) {
        if self.combine_blocks.is_none() {
            return (0, 0);
        }
        let rows = s.batch * s.q_heads * s.n_new;
        (self.n_splits * rows * s.head_dim, self.n_splits * rows)
    }
}

/// The split-KV plan for `s`, or `None` when the head dim is not a multiple of 8 (those run the
/// one-warp-per-row kernel of [`launch_config`]). The key range is the cache capacity plus the
/// new tokens (`past` is only known on the device): splits past a sequence's keys return at once.
pub fn split_plan(s: &DecodeShape) -> Result<Option<SplitPlan>> {
    check_grid(s)?;
    if s.head_dim % 8 != 0 || s.head_dim > PT_DECODE_MAX_HEAD_DIM as usize {
        return Ok(None);
    }
    let (kernel, smem) = match s.head_dim {
        d if d <= 64 => ("pt_decode_split_d64", PT_DECODE_SPLIT_SMEM_D64),
        d if d <= 128 => ("pt_decode_split_d128", PT_DECODE_SPLIT_SMEM_D128),
        _ => ("pt_decode_split_d256", PT_DECODE_SPLIT_SMEM_D256),
    };
    let group = s.q_heads / s.kv_heads.max(1);
    let row_groups = (group * s.n_new)
        .div_ceil(PT_DECODE_SPLIT_ROWS as usize)
        .max(1);
    let base = (s.batch * s.kv_heads * row_groups).max(1);
    let keys = (s.capacity + s.n_new).max(1);
    let n_splits = SPLIT_TARGET_CTAS
        .div_ceil(base)
        .min(keys / MIN_KEYS_PER_SPLIT)
        .clamp(1, 65535);
    let keys_per_split = keys.div_ceil(n_splits);
    let n_splits = keys.div_ceil(keys_per_split);
    if s.batch * s.kv_heads > i32::MAX as usize || row_groups > 65535 {
        bail!(
            "decode attention: {} sequences x {} kv heads x {row_groups} row groups exceed the \
             launch grid",
            s.batch,
            s.kv_heads
        );
    }
    let rows = s.batch * s.q_heads * s.n_new;
    i32_of("decode query rows", rows)?;
    let per_block = (PT_DECODE_COMBINE_THREADS / 32) as usize;
    Ok(Some(SplitPlan {
        kernel,
        grid: (
            (s.batch * s.kv_heads) as u32,
            n_splits as u32,
            row_groups as u32,
        ),
        threads: PT_DECODE_SPLIT_THREADS,
        smem,
        n_splits,
        keys_per_split,
        combine_blocks: (n_splits > 1).then(|| rows.div_ceil(per_block) as u32),
    }))
}

/// The decode kernels as the kernel report sees them (`kernel_report`), with the threads
/// and shared memory of [`launch_config`] and [`split_plan`].
pub fn report_configs() -> Vec<(&'static str, Vec<super::modules::KernelConfig>)> {
    use super::modules::KernelConfig;
    let mut s = DecodeShape {
        batch: 1,
        q_heads: 1,
        kv_heads: 1,
        head_dim: 64,
        n_new: 1,
        capacity: 1,
    };
    let c = launch_config(&s).expect("a valid shape");
    let mut out = vec![KernelConfig {
        label: "pt_decode_attention".into(),
        symbol: "pt_decode_attention".into(),
        threads: c.block_dim.0 * c.block_dim.1 * c.block_dim.2,
        dynamic_smem: c.shared_mem_bytes,
        tile_hmma: None,
    }];
    s.capacity = 4096;
    for d in [64, 128, 256] {
        s.head_dim = d;
        let p = split_plan(&s)
            .expect("a valid shape")
            .expect("a split plan");
        out.push(KernelConfig {
            label: p.kernel.into(),
            symbol: p.kernel.into(),
            threads: p.threads,
            dynamic_smem: p.smem,
            tile_hmma: None,
        });
    }
    out.push(KernelConfig {
        label: "pt_decode_combine".into(),
        symbol: "pt_decode_combine".into(),
        threads: PT_DECODE_COMBINE_THREADS,
        dynamic_smem: 0,
        tile_hmma: None,
    });
    vec![("decode_attention", out)]
}

/// Which decode kernel a launch uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeKernel {
    /// The split-KV kernels when the head dim allows ([`split_plan`]), else the one-warp kernel.
    Auto,
    /// Always `pt_decode_attention`, one warp per query row (the benchmark's baseline).
    OneWarpPerRow,
}

/// Launches the decode attention on the GPU. `past`/`n_new` are device copies of host arrays the
/// caller checked with [`check_lengths`].
#[allow(clippy::too_many_arguments)]
pub fn forward(
    gpu: &GpuContext,
    s: &DecodeShape,
    scale: f32,
    bufs: &DecodeBufs<'_, CudaSlice<f16>>,
    past: &CudaSlice<i32>,
    n_new: &CudaSlice<i32>,
    o: &mut CudaSlice<f16>,
) -> Result<()> {
    forward_with(gpu, DecodeKernel::Auto, s, scale, bufs, past, n_new, o)
}

/// The arguments every decode kernel starts with (abi/decode.h): the parameters, Q, the new K/V,
/// the cache, the past lengths and the new-token counts.
fn push_inputs<'a>(
    b: &mut cudarc::driver::LaunchArgs<'a>,
    p: &'a pt_decode_params,
    bufs: &DecodeBufs<'a, CudaSlice<f16>>,
    past: &'a CudaSlice<i32>,
    n_new: &'a CudaSlice<i32>,
) {
    b.arg(p)
        .arg(bufs.q)
        .arg(bufs.k_new)
        .arg(bufs.v_new)
        .arg(bufs.cache_k)
        .arg(bufs.cache_v)
        .arg(past)
        .arg(n_new);
}

/// The split kernels' fp32 partials, kept between calls (grown when a call needs more), so a
/// decode step allocates nothing once warm.
#[derive(Default)]
pub struct DecodeScratch {
    o_part: Option<CudaSlice<f32>>,
    lse_part: Option<CudaSlice<f32>>,
}

fn at_least<'a>(
    gpu: &GpuContext,
    slot: &'a mut Option<CudaSlice<f32>>,
    what: &str,
    n: usize,
) -> Result<&'a mut CudaSlice<f32>> {
    if !slot.as_ref().is_some_and(|b| b.len() >= n.max(1)) {
        // SAFETY: the split kernel writes every element the combine pass reads (each valid row
        // of each split); nothing reads the rest.
        let buf = unsafe { gpu.stream().alloc::<f32>(n.max(1)) }
            .map_err(|e| anyhow::anyhow!("allocating the decode {what} ({n} floats): {e:?}"))?;
        *slot = Some(buf);
    }
    Ok(slot.as_mut().expect("allocated above"))
}

/// [`forward`] with the kernel chosen by `kernel` (scratch allocated for this call).
#[allow(clippy::too_many_arguments)]
pub fn forward_with(
    gpu: &GpuContext,
    kernel: DecodeKernel,
    s: &DecodeShape,
    scale: f32,
    bufs: &DecodeBufs<'_, CudaSlice<f16>>,
    past: &CudaSlice<i32>,
    n_new: &CudaSlice<i32>,
    o: &mut CudaSlice<f16>,
) -> Result<()> {
    let mut scratch = DecodeScratch::default();
    forward_into(gpu, kernel, s, scale, bufs, past, n_new, o, &mut scratch)
}

/// [`forward_with`] with the split kernels' partials in `scratch` (what the GPU engine calls).
#[allow(clippy::too_many_arguments)]
pub fn forward_into(
    gpu: &GpuContext,
    kernel: DecodeKernel,
    s: &DecodeShape,
    scale: f32,
    bufs: &DecodeBufs<'_, CudaSlice<f16>>,
    past: &CudaSlice<i32>,
    n_new: &CudaSlice<i32>,
    o: &mut CudaSlice<f16>,
    scratch: &mut DecodeScratch,
) -> Result<()> {
    let p = decode_params(s, scale)?;
    check_bufs(
        s,
        [
            bufs.q.len(),
            bufs.k_new.len(),
            bufs.v_new.len(),
            bufs.cache_k.len(),
            bufs.cache_v.len(),
        ],
        o.len(),
    )?;
    check_len("past lengths", past.len(), s.batch)?;
    check_len("new-token counts", n_new.len(), s.batch)?;
    if s.batch == 0 || s.n_new == 0 || s.q_heads == 0 {
        return Ok(());
    }
    let stream = gpu.stream();
    let plan = match kernel {
        DecodeKernel::Auto => split_plan(s)?,
        DecodeKernel::OneWarpPerRow => None,
    };
    if let Some(plan) = plan {
        let mut p = p;
        p.keys_per_split = i32_of("keys per split", plan.keys_per_split)?;
        p.n_splits = i32_of("splits", plan.n_splits)?;
        let (o_len, lse_len) = plan.partial_lens(s);
        let DecodeScratch { o_part, lse_part } = scratch;
        let o_part = at_least(gpu, o_part, "partials", o_len)?;
        let lse_part = at_least(gpu, lse_part, "partial LSE", lse_len)?;
        let f = gpu.function("decode_attention", plan.kernel)?;
        let mut b = stream.launch_builder(&f);
        push_inputs(&mut b, &p, bufs, past, n_new);
        b.arg(&mut *o).arg(&mut *o_part).arg(&mut *lse_part);
        let cfg = LaunchConfig {
            grid_dim: plan.grid,
            block_dim: (plan.threads, 1, 1),
            shared_mem_bytes: plan.smem,
        };
        // SAFETY: buffer lengths checked against the shape, the partials sized by the plan; the
        // caller checked past/n_new.
        launched(plan.kernel, unsafe { b.launch(cfg) })?;
        if let Some(blocks) = plan.combine_blocks {
            let f = gpu.function("decode_attention", "pt_decode_combine")?;
            let mut b = stream.launch_builder(&f);
            b.arg(&p).arg(n_new).arg(&*o_part).arg(&*lse_part).arg(o);
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (PT_DECODE_COMBINE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as above.
            launched("pt_decode_combine", unsafe { b.launch(cfg) })?;
        }
        return Ok(());
    }
    let f = gpu.function("decode_attention", "pt_decode_attention")?;
    let mut b = stream.launch_builder(&f);
    push_inputs(&mut b, &p, bufs, past, n_new);
    b.arg(o);
    let cfg = launch_config(s)?;
    // SAFETY: buffer lengths checked against the shape; the caller checked past/n_new.
    launched("pt_decode_attention", unsafe { b.launch(cfg) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(batch: usize, q_heads: usize, n_new: usize) -> DecodeShape {
        DecodeShape {
            batch,
            q_heads,
            kv_heads: 1,
            head_dim: 64,
            n_new,
            capacity: 8,
        }
    }

    #[test]
    fn launch_is_one_warp_per_query_row() {
        let s = shape(3, 9, 5);
        let c = launch_config(&s).unwrap();
        // abi/decode.h: grid (T, Hq, B), PT_DECODE_THREADS threads, no shared memory; the kernel
        // reads t, h, b from blockIdx.x, .y, .z and assumes a single warp.
        assert_eq!(c.grid_dim, (5, 9, 3));
        assert_eq!(c.block_dim, (32, 1, 1));
        assert_eq!(PT_DECODE_THREADS, 32);
        assert_eq!(c.shared_mem_bytes, 0);
        let blocks = (c.grid_dim.0 * c.grid_dim.1 * c.grid_dim.2) as usize;
        assert_eq!(blocks * s.head_dim, s.q_len(), "one block per output row");
    }

    #[test]
    fn split_plan_covers_every_key_and_row_once() {
        for (batch, q_heads, kv_heads, head_dim, n_new, capacity) in [
            (8, 9, 3, 64, 1, 512),
            (1, 4, 2, 128, 5, 13),
            (2, 32, 8, 128, 1, 4000),
            (3, 2, 2, 32, 3, 0),
            (1, 8, 1, 256, 2, 100_000),
        ] {
            let s = DecodeShape {
                batch,
                q_heads,
                kv_heads,
                head_dim,
                n_new,
                capacity,
            };
            let p = split_plan(&s).unwrap().expect("a multiple of 8");
            assert!(p
                .kernel
                .ends_with(&format!("_d{}", head_dim.next_power_of_two().max(64))));
            let keys = capacity + n_new;
            // Splits tile [0, keys): every key in exactly one split, none empty by construction.
            assert!(p.n_splits * p.keys_per_split >= keys, "{s:?} {p:?}");
            assert!((p.n_splits - 1) * p.keys_per_split < keys, "{s:?} {p:?}");
            assert_eq!(p.grid.1 as usize, p.n_splits);
            assert_eq!(p.grid.0 as usize, batch * kv_heads);
            // Row groups: every (token, head of the group) row once.
            let g = q_heads / kv_heads;
            let rows = p.grid.2 as usize * PT_DECODE_SPLIT_ROWS as usize;
            assert!(rows >= g * n_new && rows - g * n_new < PT_DECODE_SPLIT_ROWS as usize);
            assert!(p.keys_per_split >= MIN_KEYS_PER_SPLIT.min(keys));
            assert_eq!(p.combine_blocks.is_some(), p.n_splits > 1);
            if let Some(blocks) = p.combine_blocks {
                let per = (PT_DECODE_COMBINE_THREADS / 32) as usize;
                let all = batch * q_heads * n_new;
                assert!(blocks as usize * per >= all && (blocks as usize - 1) * per < all);
            }
            assert!(p.smem <= 48 * 1024, "no opt-in needed");
        }
        // SmolLM2 decoding 8 sequences over a 512-entry cache: the split fills the GPU.
        let s = DecodeShape {
            batch: 8,
            q_heads: 9,
            kv_heads: 3,
            head_dim: 64,
            n_new: 1,
            capacity: 512,
        };
        let p = split_plan(&s).unwrap().unwrap();
        assert_eq!(p.n_splits, 8, "{p:?}");
        // A head dim that is not a multiple of 8 keeps the one-warp-per-row kernel.
        let odd = DecodeShape { head_dim: 36, ..s };
        assert!(split_plan(&odd).unwrap().is_none());
    }

    #[test]
    fn grid_limits_are_an_error_not_a_failed_launch() {
        assert!(launch_config(&shape(65535, 9, 1)).is_ok());
        let e = launch_config(&shape(65536, 9, 1)).unwrap_err().to_string();
        assert!(e.contains("65535"), "{e}");
        assert!(launch_config(&shape(1, 65536, 1)).is_err());
        // The parameter builder refuses the same shapes.
        assert!(decode_params(&shape(65535, 1, 1), 0.125).is_ok());
        assert!(decode_params(&shape(65536, 1, 1), 0.125).is_err());
    }
}
