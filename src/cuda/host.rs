//! One kernel on host data, through the GPU: the inputs are uploaded, the outputs allocated and
//! filled with NaN (so an element a kernel forgot to write shows), the kernel launched through its
//! real wrapper (the code the GPU engine runs), and the results copied back. The kernel tests
//! (`tests/gpu_*.rs`) check every kernel against the CPU reference this way, llm.c-style, on a real
//! card or on the simulated device (`scripts/sim`). All functions share one device (GPU 0, opened
//! on first use and kept for the process); [`device`] says why there is none.

use std::sync::{Mutex, MutexGuard, OnceLock};

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use half::f16;

use super::abi::{
    pt_act_params, pt_ce_params, pt_embedding_params, pt_heads_params, pt_norm_params,
    pt_rows_params, PT_NORM_LAYER,
};
use super::attention::{self as attn, attn_params, AttnWorkspace, DevAttnGrads, DevAttnInputs};
use super::backend::GpuBackend;
use super::context::GpuContext;
use super::decode::{self as dec, DecodeBufs, DecodeShape};
use super::model_ops::{self as ops, check_len, sizes, NormFwdBufs, RopeArgs};
use super::reparam::{GemmSpec, ReparamOps};
use crate::optim::{AdamWConfig, SgdConfig};
use crate::types::AttnShape;

/// The shared device, or why there is none.
pub fn device() -> Result<MutexGuard<'static, GpuBackend>> {
    // The backend holds a RefCell (profiling), so it lives behind a mutex: one kernel test at a
    // time uses it, which is how the device runs them anyway (one stream).
    struct Shared(Mutex<GpuBackend>);
    // SAFETY: the backend is only reached through the mutex; cudarc's handles are thread-safe.
    unsafe impl Sync for Shared {}
    unsafe impl Send for Shared {}
    static DEV: OnceLock<Result<Shared, String>> = OnceLock::new();
    match DEV.get_or_init(|| {
        GpuBackend::new()
            .map(|b| Shared(Mutex::new(b)))
            .map_err(|e| format!("{e:#}"))
    }) {
        Ok(s) => Ok(s.0.lock().unwrap_or_else(|p| p.into_inner())),
        Err(e) => Err(anyhow!("{e}")),
    }
}

fn up<T: DeviceRepr + Copy>(g: &GpuContext, what: &str, x: &[T]) -> Result<CudaSlice<T>> {
    if x.is_empty() {
        bail!("{what}: no elements (a device buffer needs at least one)");
    }
    g.stream()
        .clone_htod(x)
        .map_err(|e| anyhow!("uploading {what}: {e:?}"))
}

/// An upload of `x`, or a one-element buffer when it is empty (the kernels never read it then).
fn up_or_dummy<T: DeviceRepr + Copy + ValidAsZeroBits>(
    g: &GpuContext,
    what: &str,
    x: &[T],
) -> Result<CudaSlice<T>> {
    if x.is_empty() {
        g.stream()
            .alloc_zeros::<T>(1)
            .map_err(|e| anyhow!("allocating {what}: {e:?}"))
    } else {
        up(g, what, x)
    }
}

/// `n` elements (at least one) filled with `poison`.
fn poisoned<T: DeviceRepr + Copy>(
    g: &GpuContext,
    what: &str,
    n: usize,
    poison: T,
) -> Result<CudaSlice<T>> {
    up(g, what, &vec![poison; n.max(1)])
}

fn down<T: DeviceRepr + Copy + Default>(
    g: &GpuContext,
    what: &str,
    x: &CudaSlice<T>,
    n: usize,
) -> Result<Vec<T>> {
    let mut v = g
        .stream()
        .clone_dtoh(x)
        .map_err(|e| anyhow!("downloading {what}: {e:?}"))?;
    v.truncate(n);
    Ok(v)
}

// ------------------------------------------------------------------- fused prefix attention

/// fp16 inputs of one prefix-attention call (owned), in the reference's layouts.
#[derive(Clone, Debug)]
pub struct HalfInputs {
    pub q: Vec<f16>,
    pub k: Vec<f16>,
    pub v: Vec<f16>,
    pub prefix_k: Vec<f16>,
    pub prefix_v: Vec<f16>,
    pub prefix_index: Vec<usize>,
    pub valid_len: Vec<usize>,
    pub scale: f32,
}

/// The gradients of one prefix-attention call: dQ, dK, dV in fp16, the prefix's in fp32.
#[derive(Clone, Debug)]
pub struct HalfGrads {
    pub dq: Vec<f16>,
    pub dk: Vec<f16>,
    pub dv: Vec<f16>,
    pub d_prefix_k: Vec<f32>,
    pub d_prefix_v: Vec<f32>,
}

struct DevInputs {
    q: CudaSlice<f16>,
    k: CudaSlice<f16>,
    v: CudaSlice<f16>,
    pk: CudaSlice<f16>,
    pv: CudaSlice<f16>,
    pi: CudaSlice<i32>,
    vl: CudaSlice<i32>,
}

impl DevInputs {
    fn new(g: &GpuContext, s: &AttnShape, inp: &HalfInputs) -> Result<Self> {
        for (what, got, want) in [
            ("q", inp.q.len(), s.q_len()),
            ("k", inp.k.len(), s.kv_len()),
            ("v", inp.v.len(), s.kv_len()),
            ("prefix_k", inp.prefix_k.len(), s.bank_len()),
            ("prefix_v", inp.prefix_v.len(), s.bank_len()),
        ] {
            if got != want {
                bail!("{what}: expected {want} elements for {s:?}, got {got}");
            }
        }
        let (pi, vl) = attn::upload_indices(g, s, &inp.prefix_index, &inp.valid_len)?;
        Ok(Self {
            q: up(g, "q", &inp.q)?,
            k: up(g, "k", &inp.k)?,
            v: up(g, "v", &inp.v)?,
            pk: up_or_dummy(g, "prefix_k", &inp.prefix_k)?,
            pv: up_or_dummy(g, "prefix_v", &inp.prefix_v)?,
            pi,
            vl,
        })
    }
    fn refs(&self) -> DevAttnInputs<'_> {
        DevAttnInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            prefix_k: &self.pk,
            prefix_v: &self.pv,
            prefix_index: &self.pi,
            valid_len: &self.vl,
        }
    }
}

/// The forward kernel: `(O [B,Hq,T,D], LSE [B,Hq,T] natural log)`.
pub fn attention_forward(s: &AttnShape, inp: &HalfInputs) -> Result<(Vec<f16>, Vec<f32>)> {
    attn_params(s, inp.scale, false)?;
    let be = device()?;
    let g = &be.gpu;
    let d = DevInputs::new(g, s, inp)?;
    let mut o = poisoned(g, "o", s.q_len(), f16::NAN)?;
    let mut lse = poisoned(g, "lse", s.lse_len(), f32::NAN)?;
    attn::forward(g, s, inp.scale, &d.refs(), &mut o, &mut lse)?;
    Ok((
        down(g, "o", &o, s.q_len())?,
        down(g, "lse", &lse, s.lse_len())?,
    ))
}

/// The backward kernels from the forward's `O`, `LSE` (natural log) and `dO`; `deterministic`
/// selects the atomic-free dQ path.
pub fn attention_backward(
    s: &AttnShape,
    inp: &HalfInputs,
    o: &[f16],
    lse: &[f32],
    d_o: &[f16],
    deterministic: bool,
) -> Result<HalfGrads> {
    attn_params(s, inp.scale, deterministic)?;
    if o.len() != s.q_len() || d_o.len() != s.q_len() || lse.len() != s.lse_len() {
        bail!("o/d_o/lse lengths do not match {s:?}");
    }
    let be = device()?;
    let g = &be.gpu;
    let d = DevInputs::new(g, s, inp)?;
    let (o, lse, d_o) = (up(g, "o", o)?, up(g, "lse", lse)?, up(g, "d_o", d_o)?);
    let mut ws = AttnWorkspace::new(g, s, !deterministic)?;
    let mut grads = DevAttnGrads {
        dq: poisoned(g, "dq", s.q_len(), f16::NAN)?,
        dk: poisoned(g, "dk", s.kv_len(), f16::NAN)?,
        dv: poisoned(g, "dv", s.kv_len(), f16::NAN)?,
        d_prefix_k: poisoned(g, "d_prefix_k", s.bank_len(), f32::NAN)?,
        d_prefix_v: poisoned(g, "d_prefix_v", s.bank_len(), f32::NAN)?,
    };
    attn::backward(
        g,
        s,
        inp.scale,
        deterministic,
        &d.refs(),
        &o,
        &lse,
        &d_o,
        &mut ws,
        &mut grads,
    )?;
    Ok(HalfGrads {
        dq: down(g, "dq", &grads.dq, s.q_len())?,
        dk: down(g, "dk", &grads.dk, s.kv_len())?,
        dv: down(g, "dv", &grads.dv, s.kv_len())?,
        d_prefix_k: down(g, "d_prefix_k", &grads.d_prefix_k, s.bank_len())?,
        d_prefix_v: down(g, "d_prefix_v", &grads.d_prefix_v, s.bank_len())?,
    })
}

/// `ldmatrix` operations so far whose 8 row addresses hit a shared-memory bank group twice (a
/// conflict on the GPU), counted by the simulated device; `None` on a real card.
pub fn ldmatrix_bank_conflicts() -> Option<u64> {
    super::context::simulator_counter("ldmatrix_bank_conflicts")
}

// ------------------------------------------------------------------- model ops

/// Embedding lookup: `x [B·T, d]` fp32.
pub fn embedding_forward(
    p: &pt_embedding_params,
    tokens: &[i32],
    pos_offset: &[i32],
    tok_emb: &[f16],
    pos_emb: Option<&[f16]>,
) -> Result<Vec<f32>> {
    let (rows, d) = sizes::embedding(p);
    check_len("tokens", tokens.len(), rows)?;
    let be = device()?;
    let g = &be.gpu;
    let (t, po, te) = (
        up(g, "tokens", tokens)?,
        up(g, "pos_offset", pos_offset)?,
        up(g, "tok_emb", tok_emb)?,
    );
    let pe = pos_emb.map(|x| up(g, "pos_emb", x)).transpose()?;
    let mut x = poisoned(g, "x", rows * d, f32::NAN)?;
    ops::embedding_forward(g, p, &t, &po, &te, pe.as_ref(), &mut x)?;
    down(g, "x", &x, rows * d)
}

/// Outputs of [`add_norm_forward`].
#[derive(Clone, Debug)]
pub struct NormOut {
    /// Norm output `[rows, d]`.
    pub h: Vec<f16>,
    /// fp16 copy of the updated residual (when asked for).
    pub x_save: Option<Vec<f16>>,
    /// `[rows]` (LayerNorm only, else empty).
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
}

/// Residual add (`x += y + y_bias` when `y` is given) then LayerNorm/RMSNorm.
pub fn add_norm_forward(
    p: &pt_norm_params,
    x: &mut [f32],
    y: Option<&[f16]>,
    y_bias: Option<&[f16]>,
    w: &[f16],
    b: Option<&[f16]>,
    save_x: bool,
) -> Result<NormOut> {
    let (rows, d) = (p.rows as usize, p.d as usize);
    check_len("x", x.len(), rows * d)?;
    let layer = p.kind == PT_NORM_LAYER as i32;
    let be = device()?;
    let g = &be.gpu;
    let mut dx = up(g, "x", x)?;
    let dy = y.map(|v| up(g, "y", v)).transpose()?;
    let dyb = y_bias.map(|v| up(g, "y_bias", v)).transpose()?;
    let dw = up(g, "w", w)?;
    let db = b.map(|v| up(g, "b", v)).transpose()?;
    let mut xs = if save_x {
        Some(poisoned(g, "x_save", rows * d, f16::NAN)?)
    } else {
        None
    };
    let mut h = poisoned(g, "h", rows * d, f16::NAN)?;
    let mut mean = if layer {
        Some(poisoned(g, "mean", rows, f32::NAN)?)
    } else {
        None
    };
    let mut rstd = poisoned(g, "rstd", rows, f32::NAN)?;
    ops::add_norm_forward(
        g,
        p,
        NormFwdBufs {
            x: &mut dx,
            y: dy.as_ref(),
            y_bias: dyb.as_ref(),
            w: &dw,
            b: db.as_ref(),
            x_save: xs.as_mut(),
            h: &mut h,
            mean: mean.as_mut(),
            rstd: &mut rstd,
        },
    )?;
    x.copy_from_slice(&down(g, "x", &dx, rows * d)?);
    Ok(NormOut {
        h: down(g, "h", &h, rows * d)?,
        x_save: xs.map(|v| down(g, "x_save", &v, rows * d)).transpose()?,
        mean: mean
            .map(|v| down(g, "mean", &v, rows))
            .transpose()?
            .unwrap_or_default(),
        rstd: down(g, "rstd", &rstd, rows)?,
    })
}

/// Norm backward into `dx` (added to it when `p.accumulate`); returns the fp16 copy of `dx`.
pub fn norm_backward(
    p: &pt_norm_params,
    dy: &[f16],
    x: &[f16],
    w: &[f16],
    mean: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
) -> Result<Vec<f16>> {
    let (rows, d) = (p.rows as usize, p.d as usize);
    check_len("dx", dx.len(), rows * d)?;
    let layer = p.kind == PT_NORM_LAYER as i32;
    let be = device()?;
    let g = &be.gpu;
    let (ddy, dxx, dw) = (up(g, "dy", dy)?, up(g, "x", x)?, up(g, "w", w)?);
    let dmean = if layer {
        Some(up(g, "mean", mean)?)
    } else {
        None
    };
    let drstd = up(g, "rstd", rstd)?;
    let mut ddx = up(g, "dx", dx)?;
    let mut dx16 = poisoned(g, "dx16", rows * d, f16::NAN)?;
    ops::norm_backward(
        g,
        p,
        &ddy,
        &dxx,
        &dw,
        dmean.as_ref(),
        &drstd,
        &mut ddx,
        Some(&mut dx16),
    )?;
    dx.copy_from_slice(&down(g, "dx", &ddx, rows * d)?);
    down(g, "dx16", &dx16, rows * d)
}

fn act_len(p: &pt_act_params) -> usize {
    p.rows as usize * p.width as usize
}

/// `a += bias` (in place), returns `gelu_tanh(a)`.
pub fn gelu_forward(p: &pt_act_params, a: &mut [f16], bias: Option<&[f16]>) -> Result<Vec<f16>> {
    let n = act_len(p);
    check_len("a", a.len(), n)?;
    let be = device()?;
    let g = &be.gpu;
    let mut da = up(g, "a", a)?;
    let db = bias.map(|b| up(g, "bias", b)).transpose()?;
    let mut out = poisoned(g, "out", n, f16::NAN)?;
    ops::gelu_forward(g, p, &mut da, db.as_ref(), &mut out)?;
    a.copy_from_slice(&down(g, "a", &da, n)?);
    down(g, "out", &out, n)
}

/// `dy · gelu_tanh'(a)`.
pub fn gelu_backward(p: &pt_act_params, dy: &[f16], a: &[f16]) -> Result<Vec<f16>> {
    let n = act_len(p);
    let be = device()?;
    let g = &be.gpu;
    let (ddy, da) = (up(g, "dy", dy)?, up(g, "a", a)?);
    let mut out = poisoned(g, "da", n, f16::NAN)?;
    ops::gelu_backward(g, p, &ddy, &da, &mut out)?;
    down(g, "da", &out, n)
}

/// `silu(gate) · up` from `gu [rows, 2·width]` (gate | up per row).
pub fn swiglu_forward(p: &pt_act_params, gu: &[f16]) -> Result<Vec<f16>> {
    let n = act_len(p);
    let be = device()?;
    let g = &be.gpu;
    let dgu = up(g, "gu", gu)?;
    let mut out = poisoned(g, "out", n, f16::NAN)?;
    ops::swiglu_forward(g, p, &dgu, &mut out)?;
    down(g, "out", &out, n)
}

/// SwiGLU backward: `[rows, 2·width]` (d_gate | d_up per row).
pub fn swiglu_backward(p: &pt_act_params, dy: &[f16], gu: &[f16]) -> Result<Vec<f16>> {
    let n = act_len(p);
    let be = device()?;
    let g = &be.gpu;
    let (ddy, dgu) = (up(g, "dy", dy)?, up(g, "gu", gu)?);
    let mut out = poisoned(g, "dgu", 2 * n, f16::NAN)?;
    ops::swiglu_backward(g, p, &ddy, &dgu, &mut out)?;
    down(g, "dgu", &out, 2 * n)
}

/// RoPE inputs of a layout change on the host: per-sequence offsets and `[n_positions, D/2]`
/// tables.
#[derive(Clone, Copy, Debug)]
pub struct HostRope<'a> {
    pub pos_offset: &'a [i32],
    pub cos: &'a [f32],
    pub sin: &'a [f32],
}

struct DevRope {
    pos_offset: CudaSlice<i32>,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
}

impl DevRope {
    fn new(g: &GpuContext, r: &HostRope<'_>) -> Result<Self> {
        Ok(Self {
            pos_offset: up(g, "pos_offset", r.pos_offset)?,
            cos: up(g, "cos", r.cos)?,
            sin: up(g, "sin", r.sin)?,
        })
    }
    fn args(&self) -> RopeArgs<'_> {
        RopeArgs {
            pos_offset: &self.pos_offset,
            cos: &self.cos,
            sin: &self.sin,
        }
    }
}

/// Rows → `[B, H, T, D]` with bias and RoPE.
pub fn rows_to_heads(
    p: &pt_heads_params,
    src: &[f16],
    bias: Option<&[f16]>,
    rope: Option<&HostRope<'_>>,
) -> Result<Vec<f16>> {
    let n = sizes::heads(p);
    let be = device()?;
    let g = &be.gpu;
    let dsrc = up(g, "src", src)?;
    let db = bias.map(|b| up(g, "bias", b)).transpose()?;
    let dr = rope.map(|r| DevRope::new(g, r)).transpose()?;
    let mut dst = poisoned(g, "dst", n, f16::NAN)?;
    ops::rows_to_heads(
        g,
        p,
        &dsrc,
        db.as_ref(),
        dr.as_ref().map(DevRope::args),
        &mut dst,
    )?;
    down(g, "dst", &dst, n)
}

/// `[B, H, T, D]` → the tensor's columns of `dst` rows (inverse RoPE when `p.rope`).
pub fn heads_to_rows(
    p: &pt_heads_params,
    src: &[f16],
    rope: Option<&HostRope<'_>>,
    dst: &mut [f16],
) -> Result<()> {
    let be = device()?;
    let g = &be.gpu;
    let dsrc = up(g, "src", src)?;
    let dr = rope.map(|r| DevRope::new(g, r)).transpose()?;
    let mut ddst = up(g, "dst", dst)?;
    ops::heads_to_rows(g, p, &dsrc, dr.as_ref().map(DevRope::args), &mut ddst)?;
    dst.copy_from_slice(&down(g, "dst", &ddst, dst.len())?);
    Ok(())
}

/// Every one of the first `n` indices names one of `rows` rows (the kernels trust them).
fn check_index(index: &[i32], n: usize, rows: usize) -> Result<()> {
    check_len("index", index.len(), n)?;
    if let Some(&i) = index[..n].iter().find(|&&i| i < 0 || i as usize >= rows) {
        bail!("row index {i} outside 0..{rows}");
    }
    Ok(())
}

/// `dst[i] = src[index[i]]`.
pub fn gather_rows(p: &pt_rows_params, src: &[f16], index: &[i32]) -> Result<Vec<f16>> {
    let (n, d) = (p.n as usize, p.d as usize);
    check_index(index, n, src.len() / d.max(1))?;
    let be = device()?;
    let g = &be.gpu;
    let (dsrc, di) = (up(g, "src", src)?, up(g, "index", index)?);
    let mut dst = poisoned(g, "dst", n * d, f16::NAN)?;
    ops::gather_rows(g, p, src.len() / d.max(1), &dsrc, &di, &mut dst)?;
    down(g, "dst", &dst, n * d)
}

/// `dst[index[i]] = src[i]`.
pub fn scatter_rows(p: &pt_rows_params, src: &[f16], index: &[i32], dst: &mut [f16]) -> Result<()> {
    let d = p.d as usize;
    check_index(index, p.n as usize, dst.len() / d.max(1))?;
    let be = device()?;
    let g = &be.gpu;
    let (dsrc, di) = (up(g, "src", src)?, up(g, "index", index)?);
    let mut ddst = up(g, "dst", dst)?;
    ops::scatter_rows(g, p, dst.len() / d.max(1), &dsrc, &di, &mut ddst)?;
    dst.copy_from_slice(&down(g, "dst", &ddst, dst.len())?);
    Ok(())
}

/// Per-row cross-entropy (`targets[r] < 0`: no target); with `p.write_grad` the logits become
/// their gradient in place.
pub fn cross_entropy(p: &pt_ce_params, logits: &mut [f16], targets: &[i32]) -> Result<Vec<f32>> {
    let rows = p.rows as usize;
    let be = device()?;
    let g = &be.gpu;
    let mut dl = up(g, "logits", logits)?;
    let dt = up(g, "targets", targets)?;
    let mut loss = poisoned(g, "loss", rows, f32::NAN)?;
    ops::cross_entropy(g, p, &mut dl, &dt, &mut loss)?;
    logits.copy_from_slice(&down(g, "logits", &dl, logits.len())?);
    down(g, "loss", &loss, rows)
}

// ------------------------------------------------------------------- decode attention

/// The KV-cache decode attention: `o [B, Hq, T, D]`.
pub fn decode_forward(
    s: &DecodeShape,
    scale: f32,
    bufs: &DecodeBufs<'_, [f16]>,
    past: &[i32],
    n_new: &[i32],
) -> Result<Vec<f16>> {
    dec::check_lengths(s, past, n_new)?;
    let be = device()?;
    let g = &be.gpu;
    let q = up(g, "q", bufs.q)?;
    let kn = up(g, "k_new", bufs.k_new)?;
    let vn = up(g, "v_new", bufs.v_new)?;
    let ck = up(g, "cache_k", bufs.cache_k)?;
    let cv = up(g, "cache_v", bufs.cache_v)?;
    let (dp, dn) = (up(g, "past", past)?, up(g, "n_new", n_new)?);
    let mut o = poisoned(g, "o", s.q_len(), f16::NAN)?;
    let b = DecodeBufs {
        q: &q,
        k_new: &kn,
        v_new: &vn,
        cache_k: &ck,
        cache_v: &cv,
    };
    dec::forward(g, s, scale, &b, &dp, &dn, &mut o)?;
    down(g, "o", &o, s.q_len())
}

// ------------------------------------------------------------------- optimizer

/// One AdamW update through `pt_adamw_step` (`pt_adamw_step_f16` with `param_f16`).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    config: &AdamWConfig,
    step: u64,
    lr: f64,
    grad_scale: f32,
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    param_f16: Option<&mut [f16]>,
) -> Result<()> {
    let n = param.len();
    let be = device()?;
    let g = &be.gpu;
    let (mut dp, dg) = (up(g, "param", param)?, up(g, "grad", grad)?);
    let (mut dm, mut dv) = (up(g, "m", m)?, up(g, "v", v)?);
    let mut dh = param_f16
        .as_ref()
        .map(|h| up(g, "fp16 copy", h))
        .transpose()?;
    let mut hv = dh.as_mut().map(|h| h.as_view_mut());
    super::ops::adamw_step(
        g,
        config,
        step,
        lr,
        grad_scale,
        &mut dp.as_view_mut(),
        &dg.as_view(),
        &mut dm.as_view_mut(),
        &mut dv.as_view_mut(),
        hv.as_mut(),
    )?;
    param.copy_from_slice(&down(g, "param", &dp, n)?);
    m.copy_from_slice(&down(g, "m", &dm, n)?);
    v.copy_from_slice(&down(g, "v", &dv, n)?);
    if let (Some(h), Some(d)) = (param_f16, dh) {
        h.copy_from_slice(&down(g, "fp16 copy", &d, n)?);
    }
    Ok(())
}

/// One AdamW update through `pt_adamw_step_clipped`: `sum_sq` is the gradient's sum of squares
/// as stored (scaled by `1 / unscale²`), the clipping factor is the kernel's, and nothing is
/// written when the norm is not finite.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_clipped(
    config: &AdamWConfig,
    step: u64,
    lr: f64,
    unscale: f32,
    max_grad_norm: f64,
    sum_sq: f32,
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) -> Result<()> {
    let n = param.len();
    let be = device()?;
    let g = &be.gpu;
    let (mut dp, dg) = (up(g, "param", param)?, up(g, "grad", grad)?);
    let (mut dm, mut dv) = (up(g, "m", m)?, up(g, "v", v)?);
    let dsq = up(g, "sum_sq", &[sum_sq])?;
    let clip = super::ops::DeviceClip {
        sum_sq: &dsq.as_view(),
        max_grad_norm,
    };
    super::ops::adamw_step_clipped(
        g,
        config,
        step,
        lr,
        unscale,
        &clip,
        &mut dp.as_view_mut(),
        &dg.as_view(),
        &mut dm.as_view_mut(),
        &mut dv.as_view_mut(),
    )?;
    param.copy_from_slice(&down(g, "param", &dp, n)?);
    m.copy_from_slice(&down(g, "m", &dm, n)?);
    v.copy_from_slice(&down(g, "v", &dv, n)?);
    Ok(())
}

/// One SGD update through `pt_sgd_step_clipped` / `pt_sgd_momentum_step_clipped` (see
/// [`adamw_step_clipped`]).
#[allow(clippy::too_many_arguments)]
pub fn sgd_step_clipped(
    config: &SgdConfig,
    step: u64,
    lr: f64,
    unscale: f32,
    max_grad_norm: f64,
    sum_sq: f32,
    param: &mut [f32],
    grad: &[f32],
    momentum_buf: Option<&mut [f32]>,
) -> Result<()> {
    let n = param.len();
    let be = device()?;
    let g = &be.gpu;
    let (mut dp, dg) = (up(g, "param", param)?, up(g, "grad", grad)?);
    let mut db = momentum_buf
        .as_ref()
        .map(|b| up(g, "momentum", b))
        .transpose()?;
    let dsq = up(g, "sum_sq", &[sum_sq])?;
    let clip = super::ops::DeviceClip {
        sum_sq: &dsq.as_view(),
        max_grad_norm,
    };
    let mut bv = db.as_mut().map(|b| b.as_view_mut());
    super::ops::sgd_step_clipped(
        g,
        config,
        step,
        lr,
        unscale,
        &clip,
        &mut dp.as_view_mut(),
        &dg.as_view(),
        bv.as_mut(),
    )?;
    param.copy_from_slice(&down(g, "param", &dp, n)?);
    if let (Some(b), Some(d)) = (momentum_buf, db) {
        b.copy_from_slice(&down(g, "momentum", &d, n)?);
    }
    Ok(())
}

/// `y += alpha · x` through `pt_axpy`.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) -> Result<()> {
    let be = device()?;
    let g = &be.gpu;
    let (dx, mut dy) = (up(g, "x", x)?, up(g, "y", y)?);
    super::ops::axpy(
        g,
        alpha,
        &dx.slice(0..x.len()),
        &mut dy.slice_mut(0..y.len()),
    )?;
    y.copy_from_slice(&down(g, "y", &dy, y.len())?);
    Ok(())
}

/// One SGD update through the SGD kernels (momentum ones with `momentum_buf`).
#[allow(clippy::too_many_arguments)]
pub fn sgd_step(
    config: &SgdConfig,
    step: u64,
    lr: f64,
    grad_scale: f32,
    param: &mut [f32],
    grad: &[f32],
    momentum_buf: Option<&mut [f32]>,
    param_f16: Option<&mut [f16]>,
) -> Result<()> {
    let n = param.len();
    let be = device()?;
    let g = &be.gpu;
    let (mut dp, dg) = (up(g, "param", param)?, up(g, "grad", grad)?);
    let mut db = momentum_buf
        .as_ref()
        .map(|b| up(g, "momentum", b))
        .transpose()?;
    let mut dh = param_f16
        .as_ref()
        .map(|h| up(g, "fp16 copy", h))
        .transpose()?;
    let mut bv = db.as_mut().map(|b| b.as_view_mut());
    let mut hv = dh.as_mut().map(|h| h.as_view_mut());
    super::ops::sgd_step(
        g,
        config,
        step,
        lr,
        grad_scale,
        &mut dp.as_view_mut(),
        &dg.as_view(),
        bv.as_mut(),
        hv.as_mut(),
    )?;
    param.copy_from_slice(&down(g, "param", &dp, n)?);
    if let (Some(b), Some(d)) = (momentum_buf, db) {
        b.copy_from_slice(&down(g, "momentum", &d, n)?);
    }
    if let (Some(h), Some(d)) = (param_f16, dh) {
        h.copy_from_slice(&down(g, "fp16 copy", &d, n)?);
    }
    Ok(())
}

/// `out = Σ x²` (or `out += Σ x²` with `accumulate`), through both reduction kernels.
pub fn sum_squares(x: &[f32], out: &mut f32, accumulate: bool) -> Result<()> {
    let be = device()?;
    let g = &be.gpu;
    let dx = up_or_dummy(g, "x", x)?;
    let mut o = up(g, "out", &[*out])?;
    super::ops::sum_squares(g, &dx.slice(0..x.len()), &mut o.as_view_mut(), accumulate)?;
    *out = down(g, "out", &o, 1)?[0];
    Ok(())
}

// ------------------------------------------------------------------- reparameterization

/// `pt_reparam_gemm` into `c` (lengths checked by [`GemmSpec::check`]).
pub fn reparam_gemm(
    s: &GemmSpec,
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    h: Option<&[f32]>,
    c: &mut [f32],
) -> Result<()> {
    s.check(
        a.len(),
        b.len(),
        bias.map(<[f32]>::len),
        h.map(<[f32]>::len),
        c.len(),
    )?;
    let be = device()?;
    let g = &be.gpu;
    let (da, db) = (up(g, "A", a)?, up(g, "B", b)?);
    let dbias = bias.map(|x| up(g, "bias", x)).transpose()?;
    let dh = h.map(|x| up(g, "H", x)).transpose()?;
    let mut dc = up(g, "C", c)?;
    be.reparam_gemm(s, &da, &db, dbias.as_ref(), dh.as_ref(), &mut dc)?;
    c.copy_from_slice(&down(g, "C", &dc, c.len())?);
    Ok(())
}

/// `pt_reparam_col_sum`: `out[j] = Σ_r x[r, j]` over `x`'s `out.len()` columns.
pub fn reparam_col_sum(x: &[f32], out: &mut [f32]) -> Result<()> {
    let be = device()?;
    let g = &be.gpu;
    let dx = up(g, "x", x)?;
    let mut dout = up(g, "out", out)?;
    be.col_sum(&dx, &mut dout)?;
    out.copy_from_slice(&down(g, "out", &dout, out.len())?);
    Ok(())
}
