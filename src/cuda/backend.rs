//! What the model engine ([`super::engine`]) needs from a device: buffers, copies, the two GEMM
//! shapes and one method per kernel, with the kernels' ABI structs as parameters, implemented by
//! [`GpuBackend`]: cudarc buffers on the context's stream, cuBLAS, the kernels' launch wrappers
//! ([`super::model_ops`], [`super::attention`]). Without a GPU it runs on the simulated device.
//!
//! Buffers may be longer than a call needs (workspaces are sized for the largest batch); every
//! method checks lengths against its parameters and works on the leading elements.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Instant;

use anyhow::{anyhow, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, PinnedHostSlice, ValidAsZeroBits};
use half::f16;

use super::abi::{
    pt_act_params, pt_ce_params, pt_embedding_params, pt_heads_params, pt_norm_params,
    pt_rows_params,
};
use super::attention::{self as attn, AttnWorkspace, DevAttnGrads, DevAttnInputs};
use super::context::GpuContext;
use super::decode::{self as dec, DecodeBufs, DecodeShape};
use super::gemm::Gemm;
use super::model_ops::{self as ops, NormFwdBufs, RopeArgs};
use crate::types::AttnShape;

/// Element types of device buffers.
pub trait Elem: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static {}
impl Elem for f16 {}
impl Elem for f32 {}
impl Elem for i32 {}

/// Buffers of one residual add + norm launch (see `pt_add_norm_fwd`).
pub struct NormBufs<'a, B: Backend + ?Sized> {
    pub x: &'a mut B::Buf<f32>,
    pub y: Option<&'a B::Buf<f16>>,
    pub y_bias: Option<&'a B::Buf<f16>>,
    pub w: &'a B::Buf<f16>,
    pub b: Option<&'a B::Buf<f16>>,
    pub x_save: Option<&'a mut B::Buf<f16>>,
    pub h: &'a mut B::Buf<f16>,
    pub mean: Option<&'a mut B::Buf<f32>>,
    pub rstd: &'a mut B::Buf<f32>,
}

/// RoPE inputs of a layout change.
pub struct RopeBufs<'a, B: Backend + ?Sized> {
    pub pos_offset: &'a B::Buf<i32>,
    pub cos: &'a B::Buf<f32>,
    pub sin: &'a B::Buf<f32>,
}

/// Inputs of one prefix-attention call (layouts of `reference::attention`).
pub struct AttnBufs<'a, B: Backend + ?Sized> {
    pub q: &'a B::Buf<f16>,
    pub k: &'a B::Buf<f16>,
    pub v: &'a B::Buf<f16>,
    pub prefix_k: &'a B::Buf<f16>,
    pub prefix_v: &'a B::Buf<f16>,
    pub prefix_index: &'a B::Buf<i32>,
    pub valid_len: &'a B::Buf<i32>,
}

/// The attention backward's outputs, held by the backend's scratch.
pub struct AttnGradBufs<'a, B: Backend + ?Sized> {
    pub dq: &'a B::Buf<f16>,
    pub dk: &'a B::Buf<f16>,
    pub dv: &'a B::Buf<f16>,
    pub d_prefix_k: &'a B::Buf<f32>,
    pub d_prefix_v: &'a B::Buf<f32>,
}

/// A device the model engine runs on.
#[allow(clippy::too_many_arguments)]
pub trait Backend {
    type Buf<T: Elem>;
    /// Page-locked host memory (the target of an asynchronous read).
    type Pinned<T: Elem>;
    /// Attention backward scratch and gradient buffers.
    type AttnScratch;

    fn describe(&self) -> String;
    /// Device memory in use, when the device can say.
    fn memory_in_use(&self) -> Option<usize>;
    fn len<T: Elem>(b: &Self::Buf<T>) -> usize;
    /// `n` zeroed elements (at least one); errors say what was asked and what to reduce.
    fn alloc<T: Elem>(&self, what: &str, n: usize) -> Result<Self::Buf<T>>;
    /// `src` into the leading elements of `dst`.
    fn write<T: Elem>(&self, what: &str, src: &[T], dst: &mut Self::Buf<T>) -> Result<()>;
    /// Elements `range` of `src` to the host (waits for the device).
    fn read<T: Elem>(&self, what: &str, src: &Self::Buf<T>, range: Range<usize>) -> Result<Vec<T>>;
    /// `n` elements of page-locked host memory, for [`Backend::read_pinned`].
    fn alloc_pinned<T: Elem>(&self, what: &str, n: usize) -> Result<Self::Pinned<T>>;
    /// Elements `range` of `src` into the leading elements of `dst` (page-locked: the copy is
    /// queued), then one wait for it: a single host synchronisation.
    fn read_pinned<'a, T: Elem>(
        &self,
        what: &str,
        src: &Self::Buf<T>,
        range: Range<usize>,
        dst: &'a mut Self::Pinned<T>,
    ) -> Result<&'a [T]>;
    /// Elements `range` of `src` into `dst` from element `at`.
    fn copy<T: Elem>(
        &self,
        what: &str,
        src: &Self::Buf<T>,
        range: Range<usize>,
        dst: &mut Self::Buf<T>,
        at: usize,
    ) -> Result<()>;
    fn zero<T: Elem>(&self, what: &str, dst: &mut Self::Buf<T>) -> Result<()>;
    /// Elements `range` of `src` rounded to fp16 (nearest even) into `dst` from element `at`.
    fn to_f16(
        &self,
        src: &Self::Buf<f32>,
        range: Range<usize>,
        dst: &mut Self::Buf<f16>,
        at: usize,
    ) -> Result<()>;
    /// `dst[at..at + range.len()] += src[range]` (fp32).
    fn accumulate(
        &self,
        src: &Self::Buf<f32>,
        range: Range<usize>,
        dst: &mut Self::Buf<f32>,
        at: usize,
    ) -> Result<()>;

    /// Row-major `C[m,n] = A[m,k]·B[n,k]ᵀ`.
    fn gemm_a_bt(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &Self::Buf<f16>,
        b: &Self::Buf<f16>,
        c: &mut Self::Buf<f16>,
    ) -> Result<()>;
    /// Row-major `C[m,n] = A[m,k]·B[k,n]`.
    fn gemm_a_b(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &Self::Buf<f16>,
        b: &Self::Buf<f16>,
        c: &mut Self::Buf<f16>,
    ) -> Result<()>;

    fn embedding(
        &self,
        p: &pt_embedding_params,
        tokens: &Self::Buf<i32>,
        pos_offset: &Self::Buf<i32>,
        tok_emb: &Self::Buf<f16>,
        pos_emb: Option<&Self::Buf<f16>>,
        x: &mut Self::Buf<f32>,
    ) -> Result<()>;
    fn add_norm(&self, p: &pt_norm_params, bufs: NormBufs<'_, Self>) -> Result<()>;
    fn norm_bwd(
        &self,
        p: &pt_norm_params,
        dy: &Self::Buf<f16>,
        x: &Self::Buf<f16>,
        w: &Self::Buf<f16>,
        mean: Option<&Self::Buf<f32>>,
        rstd: &Self::Buf<f32>,
        dx: &mut Self::Buf<f32>,
        dx16: Option<&mut Self::Buf<f16>>,
    ) -> Result<()>;
    fn gelu_fwd(
        &self,
        p: &pt_act_params,
        a: &mut Self::Buf<f16>,
        bias: Option<&Self::Buf<f16>>,
        out: &mut Self::Buf<f16>,
    ) -> Result<()>;
    fn gelu_bwd(
        &self,
        p: &pt_act_params,
        dy: &Self::Buf<f16>,
        a: &Self::Buf<f16>,
        da: &mut Self::Buf<f16>,
    ) -> Result<()>;
    fn swiglu_fwd(
        &self,
        p: &pt_act_params,
        gu: &Self::Buf<f16>,
        out: &mut Self::Buf<f16>,
    ) -> Result<()>;
    fn swiglu_bwd(
        &self,
        p: &pt_act_params,
        dy: &Self::Buf<f16>,
        gu: &Self::Buf<f16>,
        dgu: &mut Self::Buf<f16>,
    ) -> Result<()>;
    fn rows_to_heads(
        &self,
        p: &pt_heads_params,
        src: &Self::Buf<f16>,
        bias: Option<&Self::Buf<f16>>,
        rope: Option<RopeBufs<'_, Self>>,
        dst: &mut Self::Buf<f16>,
    ) -> Result<()>;
    fn heads_to_rows(
        &self,
        p: &pt_heads_params,
        src: &Self::Buf<f16>,
        rope: Option<RopeBufs<'_, Self>>,
        dst: &mut Self::Buf<f16>,
    ) -> Result<()>;
    fn gather_rows(
        &self,
        p: &pt_rows_params,
        src_rows: usize,
        src: &Self::Buf<f16>,
        index: &Self::Buf<i32>,
        dst: &mut Self::Buf<f16>,
    ) -> Result<()>;
    fn scatter_rows(
        &self,
        p: &pt_rows_params,
        dst_rows: usize,
        src: &Self::Buf<f16>,
        index: &Self::Buf<i32>,
        dst: &mut Self::Buf<f16>,
    ) -> Result<()>;
    fn cross_entropy(
        &self,
        p: &pt_ce_params,
        logits: &mut Self::Buf<f16>,
        targets: &Self::Buf<i32>,
        loss: &mut Self::Buf<f32>,
    ) -> Result<()>;

    /// Scratch for attention backward calls of shapes up to `cap`.
    fn attn_scratch(&self, cap: &AttnShape) -> Result<Self::AttnScratch>;
    fn attn_fwd(
        &self,
        s: &AttnShape,
        scale: f32,
        inp: AttnBufs<'_, Self>,
        o: &mut Self::Buf<f16>,
        lse: &mut Self::Buf<f32>,
    ) -> Result<()>;
    /// Writes the gradients into the scratch ([`Backend::attn_grads`]).
    fn attn_bwd(
        &self,
        s: &AttnShape,
        scale: f32,
        deterministic: bool,
        inp: AttnBufs<'_, Self>,
        o: &Self::Buf<f16>,
        lse: &Self::Buf<f32>,
        d_o: &Self::Buf<f16>,
        scratch: &mut Self::AttnScratch,
    ) -> Result<()>;
    fn attn_grads(scratch: &Self::AttnScratch) -> AttnGradBufs<'_, Self>;
    /// KV-cache decode attention (`kernels/decode_attention.cu`): `past`/`n_new` `[B]` hold
    /// lengths the caller checked with [`dec::check_lengths`].
    fn decode_attn(
        &self,
        s: &DecodeShape,
        scale: f32,
        bufs: DecodeBufs<'_, Self::Buf<f16>>,
        past: &Self::Buf<i32>,
        n_new: &Self::Buf<i32>,
        o: &mut Self::Buf<f16>,
    ) -> Result<()>;
}

// ---------------------------------------------------------------------------------------------

/// The CUDA device: cudarc buffers, cuBLAS and the kernels.
pub struct GpuBackend {
    pub gpu: GpuContext,
    gemm: Gemm,
    /// Per-category time when profiling (see [`GpuBackend::enable_profile`]).
    profile: Option<RefCell<BTreeMap<&'static str, (f64, u64)>>>,
    /// The split-KV decode's partials, kept between decode steps.
    decode_scratch: RefCell<dec::DecodeScratch>,
}

impl GpuBackend {
    /// Opens GPU 0 and cuBLAS.
    pub fn new() -> Result<Self> {
        let gpu = GpuContext::new(0)?;
        let gemm = Gemm::new(&gpu)?;
        Ok(GpuBackend {
            gpu,
            gemm,
            profile: None,
            decode_scratch: RefCell::default(),
        })
    }

    /// From now on, every operation waits for the device before and after itself and adds its
    /// time to a category (GEMM, attention forward, ...): the per-op breakdown of a step. It
    /// slows the run a little (one synchronisation per operation).
    pub fn enable_profile(&mut self) {
        self.profile = Some(RefCell::new(BTreeMap::new()));
    }

    /// The time per category since profiling was enabled or last taken: (seconds, calls).
    pub fn take_profile(&self) -> Vec<(&'static str, f64, u64)> {
        self.profile.as_ref().map_or_else(Vec::new, |p| {
            std::mem::take(&mut *p.borrow_mut())
                .into_iter()
                .map(|(k, (t, n))| (k, t, n))
                .collect()
        })
    }

    fn timed(&self, category: &'static str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let Some(profile) = &self.profile else {
            return f();
        };
        self.gpu.synchronize()?;
        let t0 = Instant::now();
        f()?;
        self.gpu.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        let mut p = profile.borrow_mut();
        let e = p.entry(category).or_insert((0.0, 0));
        e.0 += dt;
        e.1 += 1;
        Ok(())
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn dev<T>(what: &str, r: Result<T, cudarc::driver::DriverError>) -> Result<T> {
    r.map_err(|e| anyhow!("{what}: {e:?}"))
}

fn rope_args<'a>(r: Option<RopeBufs<'a, GpuBackend>>) -> Option<RopeArgs<'a>> {
    r.map(|r| RopeArgs {
        pos_offset: r.pos_offset,
        cos: r.cos,
        sin: r.sin,
    })
}

fn dev_inputs<'a>(i: &AttnBufs<'a, GpuBackend>) -> DevAttnInputs<'a> {
    DevAttnInputs {
        q: i.q,
        k: i.k,
        v: i.v,
        prefix_k: i.prefix_k,
        prefix_v: i.prefix_v,
        prefix_index: i.prefix_index,
        valid_len: i.valid_len,
    }
}

impl Backend for GpuBackend {
    type Buf<T: Elem> = CudaSlice<T>;
    type Pinned<T: Elem> = PinnedHostSlice<T>;
    type AttnScratch = (AttnWorkspace, DevAttnGrads);

    fn describe(&self) -> String {
        self.gpu.description().to_string()
    }

    fn memory_in_use(&self) -> Option<usize> {
        self.gpu
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, total)| total.saturating_sub(free))
    }

    fn len<T: Elem>(b: &CudaSlice<T>) -> usize {
        b.len()
    }

    fn alloc<T: Elem>(&self, what: &str, n: usize) -> Result<CudaSlice<T>> {
        let n = n.max(1);
        self.gpu.stream().alloc_zeros::<T>(n).map_err(|e| {
            let bytes = n * std::mem::size_of::<T>();
            let free = self
                .gpu
                .context()
                .mem_get_info()
                .map(|(f, t)| format!("{:.1} MiB free of {:.1} MiB", mib(f), mib(t)))
                .unwrap_or_else(|_| "free memory unknown".into());
            if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                anyhow!(
                    "out of GPU memory: allocating {what} ({:.1} MiB) failed ({free}). Reduce \
                     the batch size (--batch-size) or the sequence length (--max-len), or use \
                     --device cpu",
                    mib(bytes)
                )
            } else {
                // Not a lack of memory: an earlier kernel's error surfacing here, say.
                anyhow!(
                    "allocating {what} ({:.1} MiB) on the GPU failed: {e:?} ({free})",
                    mib(bytes)
                )
            }
        })
    }

    fn write<T: Elem>(&self, what: &str, src: &[T], dst: &mut CudaSlice<T>) -> Result<()> {
        if src.len() > dst.len() {
            anyhow::bail!(
                "{what}: {} elements into a buffer of {}",
                src.len(),
                dst.len()
            );
        }
        self.timed("uploads", || {
            dev(what, self.gpu.stream().memcpy_htod(src, dst))
        })
    }

    fn read<T: Elem>(&self, what: &str, src: &CudaSlice<T>, range: Range<usize>) -> Result<Vec<T>> {
        if range.end > src.len() || range.start > range.end {
            anyhow::bail!("{what}: range {range:?} of a buffer of {}", src.len());
        }
        let v = dev(what, self.gpu.stream().clone_dtoh(&src.slice(range)))?;
        self.gpu.synchronize()?;
        Ok(v)
    }

    fn alloc_pinned<T: Elem>(&self, what: &str, n: usize) -> Result<PinnedHostSlice<T>> {
        // SAFETY: the memory is only read after the copies into it completed (`as_slice` waits
        // on the slice's event). Flags 0: cached memory, as the host reads it (write-combined
        // memory, cudarc's default, is slow to read).
        let p = unsafe { self.gpu.context().alloc_pinned_with_flags::<T>(n.max(1), 0) };
        dev(what, p)
    }

    fn read_pinned<'a, T: Elem>(
        &self,
        what: &str,
        src: &CudaSlice<T>,
        range: Range<usize>,
        dst: &'a mut PinnedHostSlice<T>,
    ) -> Result<&'a [T]> {
        let n = range.len();
        if range.end > src.len() || range.start > range.end || n > dst.len() {
            anyhow::bail!(
                "{what}: range {range:?} of a buffer of {} into {} pinned elements",
                src.len(),
                dst.len()
            );
        }
        dev(what, self.gpu.stream().memcpy_dtoh(&src.slice(range), dst))?;
        // The one wait. (cudarc records the pinned slice's event only in multi-stream mode, so
        // `as_slice`'s own wait on it does not wait for the copy on our one stream: found by the
        // simulator, which poisons a pinned destination until the copy really runs.)
        self.gpu.synchronize()?;
        let all = dev(what, dst.as_slice())?;
        Ok(&all[..n])
    }

    fn copy<T: Elem>(
        &self,
        what: &str,
        src: &CudaSlice<T>,
        range: Range<usize>,
        dst: &mut CudaSlice<T>,
        at: usize,
    ) -> Result<()> {
        let n = range.len();
        if range.end > src.len() || at + n > dst.len() {
            anyhow::bail!("{what}: copy {range:?} to {at} out of bounds");
        }
        if n == 0 {
            return Ok(());
        }
        let mut d = dst.slice_mut(at..at + n);
        self.timed("copies", || {
            dev(
                what,
                self.gpu.stream().memcpy_dtod(&src.slice(range), &mut d),
            )
        })
    }

    fn zero<T: Elem>(&self, what: &str, dst: &mut CudaSlice<T>) -> Result<()> {
        self.timed("copies", || dev(what, self.gpu.stream().memset_zeros(dst)))
    }

    fn to_f16(
        &self,
        src: &CudaSlice<f32>,
        range: Range<usize>,
        dst: &mut CudaSlice<f16>,
        at: usize,
    ) -> Result<()> {
        let n = range.len();
        if range.end > src.len() || at + n > dst.len() {
            anyhow::bail!("fp16 conversion: {range:?} to {at} out of bounds");
        }
        let mut d = dst.slice_mut(at..at + n);
        self.timed("elementwise", || {
            crate::cuda::ops::convert_f32_to_f16(&self.gpu, &src.slice(range), &mut d)
        })
    }

    fn accumulate(
        &self,
        src: &CudaSlice<f32>,
        range: Range<usize>,
        dst: &mut CudaSlice<f32>,
        at: usize,
    ) -> Result<()> {
        let n = range.len();
        if range.end > src.len() || at + n > dst.len() {
            anyhow::bail!("accumulation: {range:?} to {at} out of bounds");
        }
        let mut d = dst.slice_mut(at..at + n);
        self.timed("elementwise", || {
            crate::cuda::ops::axpy(&self.gpu, 1.0, &src.slice(range), &mut d)
        })
    }

    fn gemm_a_bt(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &CudaSlice<f16>,
        b: &CudaSlice<f16>,
        c: &mut CudaSlice<f16>,
    ) -> Result<()> {
        self.timed("GEMM", || self.gemm.a_bt(m, n, k, a, b, c, 0.0))
    }

    fn gemm_a_b(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &CudaSlice<f16>,
        b: &CudaSlice<f16>,
        c: &mut CudaSlice<f16>,
    ) -> Result<()> {
        self.timed("GEMM", || self.gemm.a_b(m, n, k, a, b, c, 0.0))
    }

    fn embedding(
        &self,
        p: &pt_embedding_params,
        tokens: &CudaSlice<i32>,
        pos_offset: &CudaSlice<i32>,
        tok_emb: &CudaSlice<f16>,
        pos_emb: Option<&CudaSlice<f16>>,
        x: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.timed("embedding", || {
            ops::embedding_forward(&self.gpu, p, tokens, pos_offset, tok_emb, pos_emb, x)
        })
    }

    fn add_norm(&self, p: &pt_norm_params, b: NormBufs<'_, Self>) -> Result<()> {
        self.timed("residual + norm", || {
            ops::add_norm_forward(
                &self.gpu,
                p,
                NormFwdBufs {
                    x: b.x,
                    y: b.y,
                    y_bias: b.y_bias,
                    w: b.w,
                    b: b.b,
                    x_save: b.x_save,
                    h: b.h,
                    mean: b.mean,
                    rstd: b.rstd,
                },
            )
        })
    }

    fn norm_bwd(
        &self,
        p: &pt_norm_params,
        dy: &CudaSlice<f16>,
        x: &CudaSlice<f16>,
        w: &CudaSlice<f16>,
        mean: Option<&CudaSlice<f32>>,
        rstd: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        dx16: Option<&mut CudaSlice<f16>>,
    ) -> Result<()> {
        self.timed("norm backward", || {
            ops::norm_backward(&self.gpu, p, dy, x, w, mean, rstd, dx, dx16)
        })
    }

    fn gelu_fwd(
        &self,
        p: &pt_act_params,
        a: &mut CudaSlice<f16>,
        bias: Option<&CudaSlice<f16>>,
        out: &mut CudaSlice<f16>,
    ) -> Result<()> {
        self.timed("activation", || {
            ops::gelu_forward(&self.gpu, p, a, bias, out)
        })
    }

    fn gelu_bwd(
        &self,
        p: &pt_act_params,
        dy: &CudaSlice<f16>,
        a: &CudaSlice<f16>,
        da: &mut CudaSlice<f16>,
    ) -> Result<()> {
        self.timed("activation backward", || {
            ops::gelu_backward(&self.gpu, p, dy, a, da)
        })
    }

    fn swiglu_fwd(
        &self,
        p: &pt_act_params,
        gu: &CudaSlice<f16>,
        out: &mut CudaSlice<f16>,
    ) -> Result<()> {
        self.timed("activation", || ops::swiglu_forward(&self.gpu, p, gu, out))
    }

    fn swiglu_bwd(
        &self,
        p: &pt_act_params,
        dy: &CudaSlice<f16>,
        gu: &CudaSlice<f16>,
        dgu: &mut CudaSlice<f16>,
    ) -> Result<()> {
        self.timed("activation backward", || {
            ops::swiglu_backward(&self.gpu, p, dy, gu, dgu)
        })
    }

    fn rows_to_heads(
        &self,
        p: &pt_heads_params,
        src: &CudaSlice<f16>,
        bias: Option<&CudaSlice<f16>>,
        rope: Option<RopeBufs<'_, Self>>,
        dst: &mut CudaSlice<f16>,
    ) -> Result<()> {
        self.timed("layout + RoPE", || {
            ops::rows_to_heads(&self.gpu, p, src, bias, rope_args(rope), dst)
        })
    }

    fn heads_to_rows(
        &self,
        p: &pt_heads_params,
        src: &CudaSlice<f16>,
        rope: Option<RopeBufs<'_, Self>>,
        dst: &mut CudaSlice<f16>,
    ) -> Result<()> {
        self.timed("layout + RoPE", || {
            ops::heads_to_rows(&self.gpu, p, src, rope_args(rope), dst)
        })
    }

    fn gather_rows(
        &self,
        p: &pt_rows_params,
        src_rows: usize,
        src: &CudaSlice<f16>,
        index: &CudaSlice<i32>,
        dst: &mut CudaSlice<f16>,
    ) -> Result<()> {
        self.timed("head gather/scatter", || {
            ops::gather_rows(&self.gpu, p, src_rows, src, index, dst)
        })
    }

    fn scatter_rows(
        &self,
        p: &pt_rows_params,
        dst_rows: usize,
        src: &CudaSlice<f16>,
        index: &CudaSlice<i32>,
        dst: &mut CudaSlice<f16>,
    ) -> Result<()> {
        self.timed("head gather/scatter", || {
            ops::scatter_rows(&self.gpu, p, dst_rows, src, index, dst)
        })
    }

    fn cross_entropy(
        &self,
        p: &pt_ce_params,
        logits: &mut CudaSlice<f16>,
        targets: &CudaSlice<i32>,
        loss: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.timed("cross-entropy", || {
            ops::cross_entropy(&self.gpu, p, logits, targets, loss)
        })
    }

    fn attn_scratch(&self, cap: &AttnShape) -> Result<Self::AttnScratch> {
        Ok((
            AttnWorkspace::new(&self.gpu, cap, true)?,
            DevAttnGrads::new(&self.gpu, cap)?,
        ))
    }

    fn attn_fwd(
        &self,
        s: &AttnShape,
        scale: f32,
        inp: AttnBufs<'_, Self>,
        o: &mut CudaSlice<f16>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.timed("attention forward", || {
            attn::forward(&self.gpu, s, scale, &dev_inputs(&inp), o, lse)
        })
    }

    fn attn_bwd(
        &self,
        s: &AttnShape,
        scale: f32,
        deterministic: bool,
        inp: AttnBufs<'_, Self>,
        o: &CudaSlice<f16>,
        lse: &CudaSlice<f32>,
        d_o: &CudaSlice<f16>,
        scratch: &mut Self::AttnScratch,
    ) -> Result<()> {
        let (ws, grads) = scratch;
        self.timed("attention backward", || {
            attn::backward(
                &self.gpu,
                s,
                scale,
                deterministic,
                &dev_inputs(&inp),
                o,
                lse,
                d_o,
                ws,
                grads,
            )
        })
    }

    fn decode_attn(
        &self,
        s: &DecodeShape,
        scale: f32,
        bufs: DecodeBufs<'_, CudaSlice<f16>>,
        past: &CudaSlice<i32>,
        n_new: &CudaSlice<i32>,
        o: &mut CudaSlice<f16>,
    ) -> Result<()> {
        self.timed("decode attention", || {
            dec::forward_into(
                &self.gpu,
                dec::DecodeKernel::Auto,
                s,
                scale,
                &bufs,
                past,
                n_new,
                o,
                &mut self.decode_scratch.borrow_mut(),
            )
        })
    }

    fn attn_grads(scratch: &Self::AttnScratch) -> AttnGradBufs<'_, Self> {
        let g = &scratch.1;
        AttnGradBufs {
            dq: &g.dq,
            dk: &g.dk,
            dv: &g.dv,
            d_prefix_k: &g.d_prefix_k,
            d_prefix_v: &g.d_prefix_v,
        }
    }
}
