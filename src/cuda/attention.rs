//! Launch wrappers for the fused prefix-attention kernels (`kernels/prefix_attention.cu`):
//! forward (O, natural-log LSE) and the FlashAttention-2 style backward (dQ, dK, dV and the prefix
//! gradients summed over the sequences using each prefix), on fp16 device buffers.
//!
//! [`attn_params`] validates a shape and fills the ABI struct; it is shared with the host
//! emulation (`crate::emu`), which runs the same kernel sources on the CPU.

use anyhow::{bail, Result};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use half::f16;

use super::abi::{
    pt_attn_params, PT_ATTN_BWD_BLOCK_N, PT_ATTN_DKDV_SMEM_D128, PT_ATTN_DKDV_SMEM_D64,
    PT_ATTN_DQ_SMEM_D128, PT_ATTN_DQ_SMEM_D64, PT_ATTN_FWD_BLOCK_M, PT_ATTN_FWD_SMEM_D128,
    PT_ATTN_FWD_SMEM_D64, PT_ATTN_PRE_ROWS, PT_ATTN_THREADS,
};
use super::context::GpuContext;

use crate::reference::attention::AttnShape;

/// Head dims with a compiled kernel.
pub const SUPPORTED_HEAD_DIMS: [usize; 2] = [64, 128];

/// Checks `s` against what the kernels support and fills the launch parameters.
pub fn attn_params(s: &AttnShape, scale: f32, deterministic: bool) -> Result<pt_attn_params> {
    if !SUPPORTED_HEAD_DIMS.contains(&s.head_dim) {
        bail!(
            "prefix attention kernels support head dims {SUPPORTED_HEAD_DIMS:?}, not {}",
            s.head_dim
        );
    }
    if s.kv_heads == 0 || s.q_heads % s.kv_heads != 0 {
        bail!(
            "q_heads ({}) must be a positive multiple of kv_heads ({})",
            s.q_heads,
            s.kv_heads
        );
    }
    if s.batch == 0 || s.seq == 0 {
        bail!("empty batch or sequence: {s:?}");
    }
    if s.prefix > 0 && s.n_prefixes == 0 {
        bail!("prefix length {} but an empty prefix bank", s.prefix);
    }
    // Element counts must fit the kernels' size_t offsets and grid dims; sizes must fit i32.
    let fits = |v: usize| i32::try_from(v).is_ok();
    if ![
        s.batch,
        s.q_heads,
        s.kv_heads,
        s.seq,
        s.prefix,
        s.head_dim,
        s.n_prefixes,
    ]
    .into_iter()
    .all(fits)
        || !fits(s.batch * s.q_heads)
    {
        bail!("prefix attention shape too large: {s:?}");
    }
    // grid.y of the launches is B*Hq (forward, dQ) or B*Hkv (dK/dV): at most 65535.
    if s.batch * s.q_heads > 65535 {
        bail!(
            "batch x query heads = {} exceeds the kernels' grid limit of 65535",
            s.batch * s.q_heads
        );
    }
    if !scale.is_finite() {
        bail!("softmax scale must be finite, got {scale}");
    }
    Ok(pt_attn_params {
        batch: s.batch as i32,
        q_heads: s.q_heads as i32,
        kv_heads: s.kv_heads as i32,
        seq: s.seq as i32,
        prefix: s.prefix as i32,
        head_dim: s.head_dim as i32,
        n_prefixes: s.n_prefixes as i32,
        scale,
        deterministic: deterministic as i32,
    })
}

/// A prefix index meaning "this sequence sees no prefix" (the kernels' negative index): its
/// rows attend over their own keys only and it adds nothing to the prefix gradient. The
/// KV-cache prefill uses it for requests without a prefix in a batch with prefixes.
pub const NO_PREFIX: usize = usize::MAX;

/// Checks the per-sequence prefix indices and valid lengths; returns them as the kernels' int32
/// ([`NO_PREFIX`] becomes -1).
pub fn index_arrays(
    s: &AttnShape,
    prefix_index: &[usize],
    valid_len: &[usize],
) -> Result<(Vec<i32>, Vec<i32>)> {
    if prefix_index.len() != s.batch || valid_len.len() != s.batch {
        bail!(
            "prefix_index ({}) and valid_len ({}) need one entry per sequence ({})",
            prefix_index.len(),
            valid_len.len(),
            s.batch
        );
    }
    for (b, (&pi, &vl)) in prefix_index.iter().zip(valid_len).enumerate() {
        if s.prefix > 0 && pi != NO_PREFIX && pi >= s.n_prefixes {
            bail!(
                "sequence {b}: prefix index {pi} out of range ({} prefixes)",
                s.n_prefixes
            );
        }
        if vl > s.seq {
            bail!(
                "sequence {b}: valid length {vl} > sequence length {}",
                s.seq
            );
        }
    }
    let pi = prefix_index
        .iter()
        .map(|&p| match p {
            NO_PREFIX => -1,
            _ if s.prefix > 0 => p as i32,
            _ => 0,
        })
        .collect();
    Ok((pi, valid_len.iter().map(|&v| v as i32).collect()))
}

// ---------------------------------------------------------------------------------------------
// GPU launches.

/// The embedded module holding the kernels (`kernels/prefix_attention.cu`).
const MODULE: &str = "prefix_attention";

/// Device inputs of one call, in the layouts of [`crate::reference::attention`]. The bank
/// buffers may hold a single dummy element when P = 0 (CUDA cannot allocate zero bytes).
pub struct DevAttnInputs<'a> {
    /// `[B, Hq, T, D]`.
    pub q: &'a CudaSlice<f16>,
    /// `[B, Hkv, T, D]`.
    pub k: &'a CudaSlice<f16>,
    /// `[B, Hkv, T, D]`.
    pub v: &'a CudaSlice<f16>,
    /// `[n_prefixes, Hkv, P, D]`.
    pub prefix_k: &'a CudaSlice<f16>,
    /// `[n_prefixes, Hkv, P, D]`.
    pub prefix_v: &'a CudaSlice<f16>,
    /// `[B]` from [`upload_indices`] (checked there: the kernels trust them).
    pub prefix_index: &'a CudaSlice<i32>,
    /// `[B]` from [`upload_indices`].
    pub valid_len: &'a CudaSlice<i32>,
}

/// Device gradients of one call.
pub struct DevAttnGrads {
    pub dq: CudaSlice<f16>,
    pub dk: CudaSlice<f16>,
    pub dv: CudaSlice<f16>,
    pub d_prefix_k: CudaSlice<f16>,
    pub d_prefix_v: CudaSlice<f16>,
}

/// fp32 scratch of the backward: delta, the dQ accumulator (atomic mode) and the per-sequence
/// prefix-gradient partials.
pub struct AttnWorkspace {
    delta: CudaSlice<f32>,
    dq_accum: CudaSlice<f32>,
    dpk_partial: CudaSlice<f32>,
    dpv_partial: CudaSlice<f32>,
}

fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    gpu: &GpuContext,
    what: &str,
    len: usize,
) -> Result<CudaSlice<T>> {
    gpu.stream()
        .alloc_zeros::<T>(len.max(1))
        .map_err(|e| anyhow::anyhow!("allocating {what} ({len} elements): {e:?}"))
}

impl AttnWorkspace {
    /// Scratch for shape `s` (the dQ accumulator only when `atomic_dq`).
    pub fn new(gpu: &GpuContext, s: &AttnShape, atomic_dq: bool) -> Result<Self> {
        let partial = s.batch * s.kv_heads * s.prefix * s.head_dim;
        Ok(Self {
            delta: alloc(gpu, "delta", s.lse_len())?,
            dq_accum: alloc(gpu, "dq_accum", if atomic_dq { s.q_len() } else { 0 })?,
            dpk_partial: alloc(gpu, "dpk_partial", partial)?,
            dpv_partial: alloc(gpu, "dpv_partial", partial)?,
        })
    }
}

impl DevAttnGrads {
    /// Zeroed gradient buffers for shape `s`.
    pub fn new(gpu: &GpuContext, s: &AttnShape) -> Result<Self> {
        Ok(Self {
            dq: alloc(gpu, "dq", s.q_len())?,
            dk: alloc(gpu, "dk", s.kv_len())?,
            dv: alloc(gpu, "dv", s.kv_len())?,
            d_prefix_k: alloc(gpu, "d_prefix_k", s.bank_len())?,
            d_prefix_v: alloc(gpu, "d_prefix_v", s.bank_len())?,
        })
    }
}

/// Checks and uploads the per-sequence prefix indices and valid lengths.
pub fn upload_indices(
    gpu: &GpuContext,
    s: &AttnShape,
    prefix_index: &[usize],
    valid_len: &[usize],
) -> Result<(CudaSlice<i32>, CudaSlice<i32>)> {
    let (pi, vl) = index_arrays(s, prefix_index, valid_len)?;
    let up = |x: &[i32]| {
        gpu.stream()
            .clone_htod(x)
            .map_err(|e| anyhow::anyhow!("uploading attention indices: {e:?}"))
    };
    Ok((up(&pi)?, up(&vl)?))
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got < want.max(1) {
        bail!("{what}: buffer holds {got} elements, the shape needs {want}");
    }
    Ok(())
}

fn check_inputs(s: &AttnShape, inp: &DevAttnInputs<'_>) -> Result<()> {
    check_len("q", inp.q.len(), s.q_len())?;
    check_len("k", inp.k.len(), s.kv_len())?;
    check_len("v", inp.v.len(), s.kv_len())?;
    check_len("prefix_k", inp.prefix_k.len(), s.bank_len())?;
    check_len("prefix_v", inp.prefix_v.len(), s.bank_len())?;
    check_len("prefix_index", inp.prefix_index.len(), s.batch)?;
    check_len("valid_len", inp.valid_len.len(), s.batch)
}

/// Kernel `name`, allowed `smem` bytes of dynamic shared memory (the opt-in above 48 KB).
fn kernel(gpu: &GpuContext, name: &str, smem: u32) -> Result<CudaFunction> {
    let f = gpu.function(MODULE, name)?;
    if smem > 48 * 1024 {
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(|e| {
            anyhow::anyhow!("{name}: the device refuses {smem} B of shared memory per block: {e:?}")
        })?;
    }
    Ok(f)
}

fn cfg(grid: (u32, u32), smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (PT_ATTN_THREADS, 1, 1),
        shared_mem_bytes: smem,
    }
}

fn launched<T>(name: &str, r: Result<T, cudarc::driver::DriverError>) -> Result<()> {
    r.map(|_| ())
        .map_err(|e| anyhow::anyhow!("launching {name}: {e:?}"))
}

fn cdiv(a: usize, b: u32) -> u32 {
    a.div_ceil(b as usize) as u32
}

/// Forward on the GPU: writes `o` (`[B,Hq,T,D]` fp16) and `lse` (`[B,Hq,T]`, natural log; 0 on
/// padding rows). Asynchronous on the context's stream.
pub fn forward(
    gpu: &GpuContext,
    s: &AttnShape,
    scale: f32,
    inp: &DevAttnInputs<'_>,
    o: &mut CudaSlice<f16>,
    lse: &mut CudaSlice<f32>,
) -> Result<()> {
    let p = attn_params(s, scale, false)?;
    check_inputs(s, inp)?;
    check_len("o", o.len(), s.q_len())?;
    check_len("lse", lse.len(), s.lse_len())?;
    let (name, smem) = match s.head_dim {
        64 => ("prefix_attn_fwd_d64", PT_ATTN_FWD_SMEM_D64),
        _ => ("prefix_attn_fwd_d128", PT_ATTN_FWD_SMEM_D128),
    };
    let f = kernel(gpu, name, smem)?;
    let grid = (
        cdiv(s.seq, PT_ATTN_FWD_BLOCK_M),
        (s.batch * s.q_heads) as u32,
    );
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&p)
        .arg(inp.q)
        .arg(inp.k)
        .arg(inp.v)
        .arg(inp.prefix_k)
        .arg(inp.prefix_v)
        .arg(inp.prefix_index)
        .arg(inp.valid_len)
        .arg(o)
        .arg(lse);
    // SAFETY: buffer lengths checked against the shape; indices checked by upload_indices.
    launched(name, unsafe { b.launch(cfg(grid, smem)) })
}

/// Backward on the GPU from the forward's `o`, `lse` and the output gradient `d_o`: writes every
/// element of `grads` (prefix gradients summed over the sequences using each prefix). With
/// `deterministic`, dQ is computed without float atomics (bitwise reproducible).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &GpuContext,
    s: &AttnShape,
    scale: f32,
    deterministic: bool,
    inp: &DevAttnInputs<'_>,
    o: &CudaSlice<f16>,
    lse: &CudaSlice<f32>,
    d_o: &CudaSlice<f16>,
    ws: &mut AttnWorkspace,
    grads: &mut DevAttnGrads,
) -> Result<()> {
    let p = attn_params(s, scale, deterministic)?;
    check_inputs(s, inp)?;
    check_len("o", o.len(), s.q_len())?;
    check_len("d_o", d_o.len(), s.q_len())?;
    check_len("lse", lse.len(), s.lse_len())?;
    check_len("workspace delta", ws.delta.len(), s.lse_len())?;
    if !deterministic {
        check_len("workspace dq_accum", ws.dq_accum.len(), s.q_len())?;
    }
    let partial = s.batch * s.kv_heads * s.prefix * s.head_dim;
    check_len("workspace prefix partials", ws.dpk_partial.len(), partial)?;
    check_len("dq", grads.dq.len(), s.q_len())?;
    check_len("dk", grads.dk.len(), s.kv_len())?;
    check_len("dv", grads.dv.len(), s.kv_len())?;
    check_len("d_prefix_k", grads.d_prefix_k.len(), s.bank_len())?;
    check_len("d_prefix_v", grads.d_prefix_v.len(), s.bank_len())?;
    let bh = (s.batch * s.q_heads) as u32;
    let stream = gpu.stream();

    // 1. delta = rowsum(dO * O); zero the dQ accumulator.
    let name = "prefix_attn_bwd_preprocess";
    let f = kernel(gpu, name, 0)?;
    let mut b = stream.launch_builder(&f);
    b.arg(&p)
        .arg(inp.valid_len)
        .arg(o)
        .arg(d_o)
        .arg(&mut ws.delta)
        .arg(&mut ws.dq_accum);
    // SAFETY: lengths checked above.
    launched(name, unsafe {
        b.launch(cfg((cdiv(s.seq, PT_ATTN_PRE_ROWS), bh), 0))
    })?;

    // 2. dK, dV, prefix partials (and dQ atomics).
    let (name, smem) = match s.head_dim {
        64 => ("prefix_attn_bwd_dkdv_d64", PT_ATTN_DKDV_SMEM_D64),
        _ => ("prefix_attn_bwd_dkdv_d128", PT_ATTN_DKDV_SMEM_D128),
    };
    let f = kernel(gpu, name, smem)?;
    let grid = (
        cdiv(s.prefix, PT_ATTN_BWD_BLOCK_N) + cdiv(s.seq, PT_ATTN_BWD_BLOCK_N),
        (s.batch * s.kv_heads) as u32,
    );
    let mut b = stream.launch_builder(&f);
    b.arg(&p)
        .arg(inp.q)
        .arg(inp.k)
        .arg(inp.v)
        .arg(inp.prefix_k)
        .arg(inp.prefix_v)
        .arg(inp.prefix_index)
        .arg(inp.valid_len)
        .arg(lse)
        .arg(d_o)
        .arg(&ws.delta)
        .arg(&mut ws.dq_accum)
        .arg(&mut ws.dpk_partial)
        .arg(&mut ws.dpv_partial)
        .arg(&mut grads.dk)
        .arg(&mut grads.dv);
    // SAFETY: lengths checked above.
    launched(name, unsafe { b.launch(cfg(grid, smem)) })?;

    // 3. dQ.
    if deterministic {
        let (name, smem) = match s.head_dim {
            64 => ("prefix_attn_bwd_dq_d64", PT_ATTN_DQ_SMEM_D64),
            _ => ("prefix_attn_bwd_dq_d128", PT_ATTN_DQ_SMEM_D128),
        };
        let f = kernel(gpu, name, smem)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&p)
            .arg(inp.q)
            .arg(inp.k)
            .arg(inp.v)
            .arg(inp.prefix_k)
            .arg(inp.prefix_v)
            .arg(inp.prefix_index)
            .arg(inp.valid_len)
            .arg(lse)
            .arg(d_o)
            .arg(&ws.delta)
            .arg(&mut grads.dq);
        let grid = (cdiv(s.seq, PT_ATTN_FWD_BLOCK_M), bh);
        // SAFETY: lengths checked above.
        launched(name, unsafe { b.launch(cfg(grid, smem)) })?;
    } else {
        let name = "prefix_attn_bwd_dq_convert";
        let f = kernel(gpu, name, 0)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&p).arg(&ws.dq_accum).arg(&mut grads.dq);
        let grid = (cdiv(s.q_len(), PT_ATTN_THREADS * 4), 1);
        // SAFETY: lengths checked above.
        launched(name, unsafe { b.launch(cfg(grid, 0)) })?;
    }

    // 4. Prefix gradients: sum of the partials over the sequences using each prefix.
    if s.prefix > 0 && s.n_prefixes > 0 {
        let name = "prefix_attn_bwd_prefix_reduce";
        let f = kernel(gpu, name, 0)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&p)
            .arg(inp.prefix_index)
            .arg(&ws.dpk_partial)
            .arg(&ws.dpv_partial)
            .arg(&mut grads.d_prefix_k)
            .arg(&mut grads.d_prefix_v);
        let grid = (cdiv(s.bank_len(), PT_ATTN_THREADS), 1);
        // SAFETY: lengths checked above.
        launched(name, unsafe { b.launch(cfg(grid, 0)) })?;
    }
    Ok(())
}
