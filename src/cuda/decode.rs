//! The KV-cache decode attention (`kernels/decode_attention.cu`, ABI `kernels/abi/decode.h`):
//! the parameter builder and checks shared by the GPU launch (here) and the host emulation
//! (`crate::emu::decode`).
//!
//! Layouts: queries and the new keys/values `[B, H, T, D]` (T new-token slots per sequence),
//! the cache `[B, Hkv, capacity, D]` whose first `past[b]` entries of sequence `b` are its prefix
//! then its cached tokens. Query row `t < n_new[b]` attends over the cache entries then the new
//! entries `0..=t`; rows past `n_new[b]` are zeros.

use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use half::f16;

use super::abi::{pt_decode_params, PT_DECODE_MAX_HEAD_DIM, PT_DECODE_THREADS};
use super::context::GpuContext;
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

/// The launch shape of abi/decode.h, as the host emulation uses it: grid `(T, Hq, B)`, one warp
/// per query row, no shared memory.
pub fn launch_config(s: &DecodeShape) -> Result<LaunchConfig> {
    check_grid(s)?;
    Ok(LaunchConfig {
        grid_dim: (s.n_new as u32, s.q_heads as u32, s.batch as u32),
        block_dim: (PT_DECODE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
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
    let f = gpu.function("decode_attention", "pt_decode_attention")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&p)
        .arg(bufs.q)
        .arg(bufs.k_new)
        .arg(bufs.v_new)
        .arg(bufs.cache_k)
        .arg(bufs.cache_v)
        .arg(past)
        .arg(n_new)
        .arg(o);
    let cfg = launch_config(s)?;
    // SAFETY: buffer lengths checked against the shape; the caller checked past/n_new.
    unsafe { b.launch(cfg) }
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("launching pt_decode_attention: {e:?}"))
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
    fn grid_limits_are_an_error_not_a_failed_launch() {
        assert!(launch_config(&shape(65535, 9, 1)).is_ok());
        let e = launch_config(&shape(65536, 9, 1)).unwrap_err().to_string();
        assert!(e.contains("65535"), "{e}");
        assert!(launch_config(&shape(1, 65536, 1)).is_err());
        // The parameter builder (shared with the host emulation) refuses the same shapes.
        assert!(decode_params(&shape(65535, 1, 1), 0.125).is_ok());
        assert!(decode_params(&shape(65536, 1, 1), 0.125).is_err());
    }
}
