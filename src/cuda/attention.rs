//! Launch wrappers for the fused prefix-attention kernels (`kernels/prefix_attention.cu`):
//! forward (O, natural-log LSE) and the FlashAttention-2 style backward (dQ, dK, dV and the prefix
//! gradients summed over the sequences using each prefix), on fp16 device buffers.
//!
//! [`attn_params`] validates a shape and fills the ABI struct; it is shared with the host
//! simulated device (sim/), which runs the same kernel sources on the CPU.

use anyhow::{bail, Result};
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use half::f16;

use super::abi::{
    pt_attn_params, PT_ATTN_BWD_BLOCK_M_D128, PT_ATTN_BWD_BLOCK_M_D64, PT_ATTN_BWD_BLOCK_N,
    PT_ATTN_BWD_THREADS, PT_ATTN_DKDV_SMEM_D128, PT_ATTN_DKDV_SMEM_D64, PT_ATTN_DQ_BLOCK_M,
    PT_ATTN_DQ_BLOCK_N, PT_ATTN_DQ_SMEM_D128, PT_ATTN_DQ_SMEM_D64, PT_ATTN_FWD_BLOCK_M,
    PT_ATTN_FWD_BLOCK_N_D128, PT_ATTN_FWD_BLOCK_N_D64, PT_ATTN_FWD_SMEM_D128, PT_ATTN_FWD_SMEM_D64,
    PT_ATTN_PRE_ROWS, PT_ATTN_ROW_PAD, PT_ATTN_THREADS,
};
use super::context::{launched, GpuContext};

use crate::types::AttnShape;

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

/// Device inputs of one call, in the layouts of `reference::attention`. The bank
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
    /// fp32: the reduced prefix gradient (the trained quantity) is never rounded to fp16.
    pub d_prefix_k: CudaSlice<f32>,
    pub d_prefix_v: CudaSlice<f32>,
}

/// fp32 scratch of the backward (abi/attention.h): lse2 and delta on padded rows, the dQ
/// accumulator (atomic mode), the per-(sequence, query head) prefix-gradient partials and, with
/// GQA, the per-query-head dK/dV partials.
pub struct AttnWorkspace {
    lse2: CudaSlice<f32>,
    delta: CudaSlice<f32>,
    dq_accum: CudaSlice<f32>,
    dpk_partial: CudaSlice<f32>,
    dpv_partial: CudaSlice<f32>,
    dk_partial: CudaSlice<f32>,
    dv_partial: CudaSlice<f32>,
}

/// Rows of the lse2 / delta scratch per (sequence, query head): T rounded up to
/// `PT_ATTN_ROW_PAD` (whole query steps of every backward kernel, 16-byte aligned rows).
pub fn padded_rows(seq: usize) -> usize {
    seq.div_ceil(PT_ATTN_ROW_PAD as usize) * PT_ATTN_ROW_PAD as usize
}

/// Elements of the backward's scratch buffers for shape `s`:
/// `(lse2 and delta, dq_accum, prefix partials, GQA dK/dV partials)` (0: not needed).
pub fn workspace_lens(s: &AttnShape, atomic_dq: bool) -> (usize, usize, usize, usize) {
    let bh = s.batch * s.q_heads;
    let gqa = s.q_heads > s.kv_heads;
    (
        bh * padded_rows(s.seq),
        if atomic_dq { s.q_len() } else { 0 },
        bh * s.prefix * s.head_dim,
        if gqa { bh * s.seq * s.head_dim } else { 0 },
    )
}

fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    gpu: &GpuContext,
    what: &str,
    len: usize,
) -> Result<CudaSlice<T>> {
    gpu.stream().alloc_zeros::<T>(len.max(1)).map_err(|e| {
        let oom = e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY;
        anyhow::anyhow!(
            "allocating the attention {what} ({:.1} MiB) failed: {e:?}{}",
            (len.max(1) * std::mem::size_of::<T>()) as f64 / (1u64 << 20) as f64,
            if oom {
                " (out of GPU memory: reduce the batch size (--batch-size) or the sequence \
                 length (--max-len), or use --device cpu)"
            } else {
                ""
            }
        )
    })
}

impl AttnWorkspace {
    /// Scratch for shape `s` (the dQ accumulator only when `atomic_dq`).
    pub fn new(gpu: &GpuContext, s: &AttnShape, atomic_dq: bool) -> Result<Self> {
        let (rows, dq, prefix, kv) = workspace_lens(s, atomic_dq);
        Ok(Self {
            lse2: alloc(gpu, "lse2", rows)?,
            delta: alloc(gpu, "delta", rows)?,
            dq_accum: alloc(gpu, "dq_accum", dq)?,
            dpk_partial: alloc(gpu, "dpk_partial", prefix)?,
            dpv_partial: alloc(gpu, "dpv_partial", prefix)?,
            dk_partial: alloc(gpu, "dk_partial", kv)?,
            dv_partial: alloc(gpu, "dv_partial", kv)?,
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

/// Kernel `name`, allowed `smem` bytes of dynamic shared memory (the opt-in above 48 KB, set
/// once per function by the context).
fn kernel(gpu: &GpuContext, l: &Launch) -> Result<CudaFunction> {
    gpu.function_with_smem(MODULE, l.kernel, l.smem)
        .map_err(|e| {
            if l.kernel.contains("bwd_dq_d") && l.smem > DEFAULT_SMEM_LIMIT {
                e.context(
                "the deterministic backward's dQ kernel; the default, atomic backward needs less",
            )
            } else {
                e
            }
        })
}

fn cfg(l: &Launch) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (l.grid.0, l.grid.1, 1),
        block_dim: (l.threads, 1, 1),
        shared_mem_bytes: l.smem,
    }
}

fn cdiv(a: usize, b: u32) -> u32 {
    a.div_ceil(b as usize) as u32
}

/// Dynamic shared memory up to which no opt-in is needed.
pub const DEFAULT_SMEM_LIMIT: u32 = super::context::SMEM_WITHOUT_OPT_IN;

/// One kernel launch of the family: its name (head-dim suffix included), grid `(x, y)` of
/// `threads`-thread blocks and dynamic shared memory (above [`DEFAULT_SMEM_LIMIT`] the wrapper
/// opts in with `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub kernel: &'static str,
    pub grid: (u32, u32),
    pub threads: u32,
    pub smem: u32,
}

/// The launches of a backward, in order (abi/attention.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackwardLaunches {
    pub preprocess: Launch,
    pub dkdv: Launch,
    /// `prefix_attn_bwd_dq_dD` (deterministic) or `prefix_attn_bwd_dq_convert` (atomic).
    pub dq: Launch,
    /// `prefix_attn_bwd_kv_reduce`: the GQA sum of dK/dV; `None` when `Hq == Hkv`.
    pub kv_reduce: Option<Launch>,
    /// `None` without a prefix.
    pub prefix_reduce: Option<Launch>,
}

/// The forward's launch for a shape [`attn_params`] accepted (head dim 64 or 128).
pub fn forward_launch(s: &AttnShape) -> Launch {
    let (kernel, smem) = match s.head_dim {
        64 => ("prefix_attn_fwd_d64", PT_ATTN_FWD_SMEM_D64),
        _ => ("prefix_attn_fwd_d128", PT_ATTN_FWD_SMEM_D128),
    };
    Launch {
        kernel,
        grid: (
            cdiv(s.seq, PT_ATTN_FWD_BLOCK_M),
            (s.batch * s.q_heads) as u32,
        ),
        threads: PT_ATTN_THREADS,
        smem,
    }
}

/// The backward's launches for a shape [`attn_params`] accepted.
pub fn backward_launches(s: &AttnShape, deterministic: bool) -> BackwardLaunches {
    let bh = (s.batch * s.q_heads) as u32;
    let d64 = s.head_dim == 64;
    let dq = if deterministic {
        Launch {
            kernel: if d64 {
                "prefix_attn_bwd_dq_d64"
            } else {
                "prefix_attn_bwd_dq_d128"
            },
            grid: (cdiv(s.seq, PT_ATTN_DQ_BLOCK_M), bh),
            threads: PT_ATTN_THREADS,
            smem: if d64 {
                PT_ATTN_DQ_SMEM_D64
            } else {
                PT_ATTN_DQ_SMEM_D128
            },
        }
    } else {
        Launch {
            kernel: "prefix_attn_bwd_dq_convert",
            grid: (cdiv(s.q_len(), PT_ATTN_THREADS * 4), 1),
            threads: PT_ATTN_THREADS,
            smem: 0,
        }
    };
    BackwardLaunches {
        preprocess: Launch {
            kernel: "prefix_attn_bwd_preprocess",
            grid: (cdiv(padded_rows(s.seq), PT_ATTN_PRE_ROWS), bh),
            threads: PT_ATTN_THREADS,
            smem: 0,
        },
        // One CTA per (query head, key block): the heads fastest, so the CTAs with the most
        // query steps (the prefix blocks, then the first sequence blocks) start first.
        dkdv: Launch {
            kernel: if d64 {
                "prefix_attn_bwd_dkdv_d64"
            } else {
                "prefix_attn_bwd_dkdv_d128"
            },
            grid: (
                bh,
                cdiv(s.prefix, PT_ATTN_BWD_BLOCK_N) + cdiv(s.seq, PT_ATTN_BWD_BLOCK_N),
            ),
            threads: PT_ATTN_BWD_THREADS,
            smem: if d64 {
                PT_ATTN_DKDV_SMEM_D64
            } else {
                PT_ATTN_DKDV_SMEM_D128
            },
        },
        dq,
        kv_reduce: (s.q_heads > s.kv_heads).then(|| Launch {
            kernel: "prefix_attn_bwd_kv_reduce",
            grid: (cdiv(s.kv_len(), PT_ATTN_THREADS * 4), 1),
            threads: PT_ATTN_THREADS,
            smem: 0,
        }),
        prefix_reduce: (s.prefix > 0 && s.n_prefixes > 0).then(|| Launch {
            kernel: "prefix_attn_bwd_prefix_reduce",
            grid: (cdiv(s.bank_len(), PT_ATTN_THREADS), 1),
            threads: PT_ATTN_THREADS,
            smem: 0,
        }),
    }
}

/// HMMA instructions (m16n8k16, 4096 FLOPs each) one warp issues per tile of a kernel's main
/// loop: `gemms` products of a `bm` × `bn` tile at head dim `d`, shared by the `threads / 32`
/// warps of the CTA (the kernel report's barriers per tile).
fn tile_hmma(gemms: u32, bm: u32, bn: u32, d: u32, threads: u32) -> u32 {
    gemms * bm * bn * d / 2048 / (threads / 32) // 16 x 8 x 16 multiply-adds each
}

/// The attention kernels as the kernel report sees them (`kernel_report`): each kernel
/// named by [`forward_launch`] and [`backward_launches`] (both head dims, both backward modes,
/// with a prefix), with its threads and dynamic shared memory from those launches.
pub fn report_configs() -> Vec<(&'static str, Vec<super::modules::KernelConfig>)> {
    use super::modules::KernelConfig;
    let mut out: Vec<KernelConfig> = Vec::new();
    let mut add = |l: Launch, tile: Option<u32>| {
        if out.iter().all(|c| c.symbol != l.kernel) {
            out.push(KernelConfig {
                label: l.kernel.to_string(),
                symbol: l.kernel.to_string(),
                threads: l.threads,
                dynamic_smem: l.smem,
                tile_hmma: tile,
            });
        }
    };
    for d in SUPPORTED_HEAD_DIMS {
        let s = AttnShape {
            batch: 2,
            q_heads: 4,
            kv_heads: 2,
            seq: 256,
            prefix: 16,
            head_dim: d,
            n_prefixes: 1,
        };
        let d32 = d as u32;
        let bwd_m = if d == 64 {
            PT_ATTN_BWD_BLOCK_M_D64
        } else {
            PT_ATTN_BWD_BLOCK_M_D128
        };
        let fwd_n = if d == 64 {
            PT_ATTN_FWD_BLOCK_N_D64
        } else {
            PT_ATTN_FWD_BLOCK_N_D128
        };
        let fwd = forward_launch(&s);
        add(
            fwd,
            Some(tile_hmma(2, PT_ATTN_FWD_BLOCK_M, fwd_n, d32, fwd.threads)),
        );
        let atomic = backward_launches(&s, false);
        let det = backward_launches(&s, true);
        add(
            atomic.dkdv,
            Some(tile_hmma(
                5,
                bwd_m,
                PT_ATTN_BWD_BLOCK_N,
                d32,
                atomic.dkdv.threads,
            )),
        );
        add(
            det.dq,
            Some(tile_hmma(
                3,
                PT_ATTN_DQ_BLOCK_M,
                PT_ATTN_DQ_BLOCK_N,
                d32,
                det.dq.threads,
            )),
        );
        add(atomic.preprocess, None);
        add(atomic.dq, None);
        for r in [atomic.kv_reduce, atomic.prefix_reduce]
            .into_iter()
            .flatten()
        {
            add(r, None);
        }
    }
    vec![(MODULE, out)]
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
    let l = forward_launch(s);
    let f = kernel(gpu, &l)?;
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
    launched(l.kernel, unsafe { b.launch(cfg(&l)) })
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
    let (rows, dq_len, prefix_len, kv_len) = workspace_lens(s, !deterministic);
    check_len("workspace lse2", ws.lse2.len(), rows)?;
    check_len("workspace delta", ws.delta.len(), rows)?;
    check_len("workspace dq_accum", ws.dq_accum.len(), dq_len)?;
    check_len(
        "workspace prefix partials",
        ws.dpk_partial.len(),
        prefix_len,
    )?;
    check_len(
        "workspace prefix partials",
        ws.dpv_partial.len(),
        prefix_len,
    )?;
    check_len("workspace dK/dV partials", ws.dk_partial.len(), kv_len)?;
    check_len("workspace dK/dV partials", ws.dv_partial.len(), kv_len)?;
    check_len("dq", grads.dq.len(), s.q_len())?;
    check_len("dk", grads.dk.len(), s.kv_len())?;
    check_len("dv", grads.dv.len(), s.kv_len())?;
    check_len("d_prefix_k", grads.d_prefix_k.len(), s.bank_len())?;
    check_len("d_prefix_v", grads.d_prefix_v.len(), s.bank_len())?;
    let plan = backward_launches(s, deterministic);
    let stream = gpu.stream();

    // 1. lse2 = lse log2(e), delta = rowsum(dO * O) on padded rows; zero the dQ accumulator.
    let l = plan.preprocess;
    let f = kernel(gpu, &l)?;
    let mut b = stream.launch_builder(&f);
    b.arg(&p)
        .arg(inp.valid_len)
        .arg(o)
        .arg(d_o)
        .arg(lse)
        .arg(&mut ws.lse2)
        .arg(&mut ws.delta)
        .arg(&mut ws.dq_accum);
    // SAFETY: lengths checked above.
    launched(l.kernel, unsafe { b.launch(cfg(&l)) })?;

    // 2. dK, dV (or their GQA partials), prefix partials (and dQ atomics).
    let l = plan.dkdv;
    let f = kernel(gpu, &l)?;
    let mut b = stream.launch_builder(&f);
    b.arg(&p)
        .arg(inp.q)
        .arg(inp.k)
        .arg(inp.v)
        .arg(inp.prefix_k)
        .arg(inp.prefix_v)
        .arg(inp.prefix_index)
        .arg(inp.valid_len)
        .arg(&ws.lse2)
        .arg(d_o)
        .arg(&ws.delta)
        .arg(&mut ws.dq_accum)
        .arg(&mut ws.dpk_partial)
        .arg(&mut ws.dpv_partial)
        .arg(&mut ws.dk_partial)
        .arg(&mut ws.dv_partial)
        .arg(&mut grads.dk)
        .arg(&mut grads.dv);
    // SAFETY: lengths checked above.
    launched(l.kernel, unsafe { b.launch(cfg(&l)) })?;

    // 3. dQ.
    let l = plan.dq;
    let f = kernel(gpu, &l)?;
    if deterministic {
        let mut b = stream.launch_builder(&f);
        b.arg(&p)
            .arg(inp.q)
            .arg(inp.k)
            .arg(inp.v)
            .arg(inp.prefix_k)
            .arg(inp.prefix_v)
            .arg(inp.prefix_index)
            .arg(inp.valid_len)
            .arg(&ws.lse2)
            .arg(d_o)
            .arg(&ws.delta)
            .arg(&mut grads.dq);
        // SAFETY: lengths checked above.
        launched(l.kernel, unsafe { b.launch(cfg(&l)) })?;
    } else {
        let mut b = stream.launch_builder(&f);
        b.arg(&p).arg(&ws.dq_accum).arg(&mut grads.dq);
        // SAFETY: lengths checked above.
        launched(l.kernel, unsafe { b.launch(cfg(&l)) })?;
    }

    // 4. GQA: dK/dV = the sum of the group's per-query-head partials.
    if let Some(l) = plan.kv_reduce {
        let f = kernel(gpu, &l)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&p)
            .arg(&ws.dk_partial)
            .arg(&ws.dv_partial)
            .arg(&mut grads.dk)
            .arg(&mut grads.dv);
        // SAFETY: lengths checked above.
        launched(l.kernel, unsafe { b.launch(cfg(&l)) })?;
    }

    // 5. Prefix gradients: sum of the partials over the sequences using each prefix and the
    // query heads of each kv head.
    if let Some(l) = plan.prefix_reduce {
        let f = kernel(gpu, &l)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&p)
            .arg(inp.prefix_index)
            .arg(&ws.dpk_partial)
            .arg(&ws.dpv_partial)
            .arg(&mut grads.d_prefix_k)
            .arg(&mut grads.d_prefix_v);
        // SAFETY: lengths checked above.
        launched(l.kernel, unsafe { b.launch(cfg(&l)) })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::abi::{PT_ATTN_BWD_BLOCK_N, PT_ATTN_DQ_BLOCK_M, PT_ATTN_FWD_BLOCK_M};

    fn shapes() -> Vec<AttnShape> {
        let mut v = Vec::new();
        for &head_dim in &SUPPORTED_HEAD_DIMS {
            for &seq in &[1, 63, 64, 65, 200] {
                for &prefix in &[0, 1, 64, 100] {
                    v.push(AttnShape {
                        batch: 3,
                        q_heads: 6,
                        kv_heads: 2,
                        seq,
                        prefix,
                        head_dim,
                        n_prefixes: if prefix > 0 { 2 } else { 0 },
                    });
                }
            }
        }
        v
    }

    /// Rows `0..n` covered by the blocks of a launch, each block covering `rows(block)`: every
    /// row exactly once, and no block without a row.
    fn assert_exact_cover(what: &str, n: usize, blocks: u32, rows: impl Fn(u32) -> Vec<usize>) {
        let mut seen = vec![0u32; n];
        for x in 0..blocks {
            let r: Vec<usize> = rows(x).into_iter().filter(|&r| r < n).collect();
            assert!(
                !r.is_empty(),
                "{what}: block {x} of {blocks} has no row of {n}"
            );
            for i in r {
                seen[i] += 1;
            }
        }
        assert!(
            seen.iter().all(|&c| c == 1),
            "{what}: rows covered {seen:?} times"
        );
    }

    /// The query blocks of the forward (BM = PT_ATTN_FWD_BLOCK_M) and the deterministic dQ
    /// kernel (PT_ATTN_DQ_BLOCK_M): block x holds rows m0 .. m0 + BM with
    /// m0 = (gridDim.x - 1 - x) * BM (the longest rows first).
    fn query_blocks(grid_x: u32, bm: u32) -> impl Fn(u32) -> Vec<usize> {
        move |x| {
            let m0 = ((grid_x - 1 - x) * bm) as usize;
            (m0..m0 + bm as usize).collect()
        }
    }

    #[test]
    fn launches_cover_every_query_row_and_key_once() {
        for s in shapes() {
            attn_params(&s, 0.125, false).unwrap();
            let bh = (s.batch * s.q_heads) as u32;
            let f = forward_launch(&s);
            assert_eq!(f.grid.1, bh, "{s:?}");
            assert_exact_cover(
                "forward",
                s.seq,
                f.grid.0,
                query_blocks(f.grid.0, PT_ATTN_FWD_BLOCK_M),
            );
            for det in [false, true] {
                let b = backward_launches(&s, det);
                let pre = b.preprocess;
                assert_eq!(pre.grid.1, bh);
                // lse2 / delta rows: every padded row once (the backward kernels read whole
                // query steps of them without bounds checks).
                let tp = padded_rows(s.seq);
                assert!(tp >= s.seq && tp % PT_ATTN_ROW_PAD as usize == 0);
                assert_eq!(tp % PT_ATTN_BWD_BLOCK_M_D64 as usize, 0);
                assert_eq!(tp % PT_ATTN_BWD_BLOCK_M_D128 as usize, 0);
                assert_eq!(tp % PT_ATTN_DQ_BLOCK_M as usize, 0);
                assert_exact_cover("preprocess", tp, pre.grid.0, |x| {
                    let r0 = (x * PT_ATTN_PRE_ROWS) as usize;
                    (r0..r0 + PT_ATTN_PRE_ROWS as usize).collect()
                });
                // dK/dV: grid (B*Hq, key blocks); the kernel takes blocks y < ceil(P / BN) as
                // prefix key blocks, the others as sequence key blocks; for every query head,
                // every prefix key and sequence key once.
                let kv = b.dkdv;
                assert_eq!(kv.grid.0, bh);
                assert_eq!(kv.threads, PT_ATTN_BWD_THREADS);
                let bn = PT_ATTN_BWD_BLOCK_N as usize;
                let n_pre = s.prefix.div_ceil(bn);
                let keys = |y: u32| -> Vec<usize> {
                    let y = y as usize;
                    if y < n_pre {
                        (y * bn..(y + 1) * bn).filter(|&k| k < s.prefix).collect()
                    } else {
                        let n0 = (y - n_pre) * bn;
                        (n0..n0 + bn)
                            .filter(|&k| k < s.seq)
                            .map(|k| s.prefix + k)
                            .collect()
                    }
                };
                assert_exact_cover("dK/dV keys", s.prefix + s.seq, kv.grid.1, keys);
                match b.kv_reduce {
                    None => assert_eq!(s.q_heads, s.kv_heads, "{s:?}: no GQA reduction"),
                    Some(r) => {
                        let per = (r.threads * 4) as usize;
                        assert_exact_cover("kv reduce", s.kv_len(), r.grid.0, |x| {
                            (x as usize * per..(x as usize + 1) * per).collect()
                        });
                    }
                }
                if det {
                    assert_eq!(b.dq.grid.1, bh);
                    assert_exact_cover(
                        "dQ",
                        s.seq,
                        b.dq.grid.0,
                        query_blocks(b.dq.grid.0, PT_ATTN_DQ_BLOCK_M),
                    );
                } else {
                    assert_eq!(b.dq.kernel, "prefix_attn_bwd_dq_convert");
                    assert_eq!(b.dq.grid.1, 1);
                    let per = (PT_ATTN_THREADS * 4) as usize;
                    assert_exact_cover("dQ convert", s.q_len(), b.dq.grid.0, |x| {
                        (x as usize * per..(x as usize + 1) * per).collect()
                    });
                }
                match b.prefix_reduce {
                    None => assert_eq!(s.prefix, 0, "{s:?}: no prefix reduction"),
                    Some(r) => {
                        let per = r.threads as usize;
                        assert_exact_cover("prefix reduce", s.bank_len(), r.grid.0, |x| {
                            (x as usize * per..(x as usize + 1) * per).collect()
                        });
                    }
                }
            }
        }
    }

    #[test]
    fn launches_use_the_head_dims_kernel_and_shared_memory() {
        for s in shapes() {
            let d = s.head_dim;
            let b = backward_launches(&s, true);
            let per_d = [forward_launch(&s), b.dkdv, b.dq];
            for l in per_d {
                assert!(
                    l.kernel.ends_with(&format!("_d{d}")),
                    "{} for head dim {d}",
                    l.kernel
                );
            }
            let (fwd, dkdv, dq) = if d == 64 {
                (
                    PT_ATTN_FWD_SMEM_D64,
                    PT_ATTN_DKDV_SMEM_D64,
                    PT_ATTN_DQ_SMEM_D64,
                )
            } else {
                (
                    PT_ATTN_FWD_SMEM_D128,
                    PT_ATTN_DKDV_SMEM_D128,
                    PT_ATTN_DQ_SMEM_D128,
                )
            };
            assert_eq!(per_d.map(|l| l.smem), [fwd, dkdv, dq]);
            assert_eq!(b.preprocess.smem, 0);
            let a = backward_launches(&s, false);
            assert_eq!(a.dq.smem, 0);
            // Every kernel named here is compiled into the module the wrapper loads from.
            if crate::cuda::modules::KERNELS_BUILT {
                let m = crate::cuda::modules::module(MODULE).expect("prefix_attention module");
                let all = [Some(b.preprocess), Some(b.dkdv), Some(b.dq), Some(a.dq)]
                    .into_iter()
                    .chain([Some(forward_launch(&s)), b.prefix_reduce, b.kv_reduce])
                    .flatten();
                for l in all {
                    assert!(m.entries.contains(&l.kernel), "{} not compiled", l.kernel);
                }
            }
        }
        // The kernels above 48 KB (the wrapper opts in for them): every one but the D=64 forward.
        const { assert!(PT_ATTN_FWD_SMEM_D64 <= DEFAULT_SMEM_LIMIT) };
        for big in [
            PT_ATTN_FWD_SMEM_D128,
            PT_ATTN_DQ_SMEM_D64,
            PT_ATTN_DQ_SMEM_D128,
            PT_ATTN_DKDV_SMEM_D64,
            PT_ATTN_DKDV_SMEM_D128,
        ] {
            assert!(big > DEFAULT_SMEM_LIMIT);
        }
    }

    #[test]
    fn grid_y_limit_is_checked_before_any_launch() {
        let mut s = shapes()[0];
        s.q_heads = 6;
        s.kv_heads = 2;
        s.batch = 65535 / 6;
        let ok = backward_launches(&s, true);
        attn_params(&s, 0.125, true).unwrap();
        assert!(ok.dq.grid.1 <= 65535 && forward_launch(&s).grid.1 <= 65535);
        assert!(ok.dkdv.grid.1 <= 65535, "key blocks on grid.y");
        s.batch += 1;
        let e = attn_params(&s, 0.125, true).unwrap_err().to_string();
        assert!(e.contains("65535"), "{e}");
    }
}
