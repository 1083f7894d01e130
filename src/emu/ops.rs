//! Safe wrappers over the host emulation of the model-layer kernels (`kernels/{embedding,norm,
//! activation,rope,cross_entropy}.cu`, compiled for the CPU by `build/emulation.rs` from
//! `kernels/host/emulation_model_ops.cpp`), next to [`crate::emu`] for the attention kernels.
//! Tests run them against the CPU reference layers without a GPU.
//!
//! Each wrapper takes the ABI struct from the same `*_params` builders as the GPU launches
//! ([`crate::cuda::model_ops`]), checks every buffer's length against it (the emulation trusts
//! them like the GPU does), and fills its outputs with NaN before the launch so an element the
//! kernel forgot to write shows up.

use anyhow::{bail, Result};
use half::f16;

use crate::cuda::abi::{
    pt_act_params, pt_ce_params, pt_embedding_params, pt_heads_params, pt_norm_params,
    pt_rows_params, PT_NORM_LAYER,
};
use crate::cuda::model_ops::{check_len, sizes};

/// True when this build contains the host emulation (the CUDA headers were found at build time).
pub fn available() -> bool {
    cfg!(prefix_tune_emulation)
}

/// Declares the emulation's launchers: the real extern functions when the emulation is built,
/// stubs (never called: [`run`] checks [`available`] first) otherwise.
macro_rules! emu_ffi {
    ($(pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> i32;)*) => {
        #[cfg(prefix_tune_emulation)]
        mod ffi {
            #[allow(unused_imports)]
            use super::*;
            extern "C" {
                $(pub fn $name($($arg: $ty),*) -> i32;)*
            }
        }
        #[cfg(not(prefix_tune_emulation))]
        #[allow(unused_variables, clippy::too_many_arguments)]
        mod ffi {
            #[allow(unused_imports)]
            use super::*;
            $(pub unsafe fn $name($($arg: $ty),*) -> i32 { -1 })*
        }
    };
}

emu_ffi! {
    pub fn pt_emu_embedding_fwd(
        p: *const pt_embedding_params,
        tokens: *const i32,
        pos_offset: *const i32,
        tok_emb: *const u16,
        pos_emb: *const u16,
        x: *mut f32,
    ) -> i32;
    pub fn pt_emu_add_norm_fwd(
        p: *const pt_norm_params,
        x: *mut f32,
        y: *const u16,
        y_bias: *const u16,
        w: *const u16,
        b: *const u16,
        x_save: *mut u16,
        h: *mut u16,
        mean: *mut f32,
        rstd: *mut f32,
    ) -> i32;
    pub fn pt_emu_norm_bwd(
        p: *const pt_norm_params,
        dy: *const u16,
        x: *const u16,
        w: *const u16,
        mean: *const f32,
        rstd: *const f32,
        dx: *mut f32,
        dx16: *mut u16,
    ) -> i32;
    pub fn pt_emu_gelu_fwd(
        p: *const pt_act_params,
        a: *mut u16,
        bias: *const u16,
        out: *mut u16,
    ) -> i32;
    pub fn pt_emu_gelu_bwd(
        p: *const pt_act_params,
        dy: *const u16,
        a: *const u16,
        da: *mut u16,
    ) -> i32;
    pub fn pt_emu_swiglu_fwd(p: *const pt_act_params, gu: *const u16, out: *mut u16) -> i32;
    pub fn pt_emu_swiglu_bwd(
        p: *const pt_act_params,
        dy: *const u16,
        gu: *const u16,
        dgu: *mut u16,
    ) -> i32;
    pub fn pt_emu_rows_to_heads(
        p: *const pt_heads_params,
        src: *const u16,
        bias: *const u16,
        pos_offset: *const i32,
        cos: *const f32,
        sin: *const f32,
        dst: *mut u16,
    ) -> i32;
    pub fn pt_emu_heads_to_rows(
        p: *const pt_heads_params,
        src: *const u16,
        pos_offset: *const i32,
        cos: *const f32,
        sin: *const f32,
        dst: *mut u16,
    ) -> i32;
    pub fn pt_emu_gather_rows(
        p: *const pt_rows_params,
        src: *const u16,
        index: *const i32,
        dst: *mut u16,
    ) -> i32;
    pub fn pt_emu_scatter_rows(
        p: *const pt_rows_params,
        src: *const u16,
        index: *const i32,
        dst: *mut u16,
    ) -> i32;
    pub fn pt_emu_cross_entropy(
        p: *const pt_ce_params,
        logits: *mut u16,
        targets: *const i32,
        loss: *mut f32,
    ) -> i32;
}

/// Runs one emulated launch (or says the build has none).
fn run(what: &str, f: impl FnOnce() -> i32) -> Result<()> {
    if !available() {
        bail!(
            "{what}: this build has no host emulation of the kernels (CUDA headers not found at \
             build time)"
        );
    }
    match f() {
        0 => Ok(()),
        rc => bail!("{what}: host emulation failed (code {rc})"),
    }
}

// Pointer helpers: fp16 as bits, absent optionals as null.
fn h(x: &[f16]) -> *const u16 {
    x.as_ptr().cast()
}
fn hm(x: &mut [f16]) -> *mut u16 {
    x.as_mut_ptr().cast()
}
fn oh(x: Option<&[f16]>) -> *const u16 {
    x.map_or(std::ptr::null(), h)
}

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
    check_len("pos_offset", pos_offset.len(), p.batch as usize)?;
    check_len("tok_emb", tok_emb.len(), p.vocab as usize * d)?;
    match pos_emb {
        Some(pe) => check_len("pos_emb", pe.len(), p.n_positions as usize * d)?,
        None if p.n_positions > 0 => bail!("embedding: n_positions > 0 but no position table"),
        None => {}
    }
    let mut x = vec![f32::NAN; rows * d];
    // SAFETY: every buffer holds what the kernel indexes for `p` (checked above).
    run("emulated embedding", || unsafe {
        ffi::pt_emu_embedding_fwd(
            p,
            tokens.as_ptr(),
            pos_offset.as_ptr(),
            h(tok_emb),
            oh(pos_emb),
            x.as_mut_ptr(),
        )
    })?;
    Ok(x)
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
    if let Some(y) = y {
        check_len("y", y.len(), rows * d)?;
    }
    if y_bias.is_some() && y.is_none() {
        bail!("a bias without a branch output");
    }
    if let Some(yb) = y_bias {
        check_len("y_bias", yb.len(), d)?;
    }
    check_len("w", w.len(), d)?;
    if let Some(b) = b {
        check_len("b", b.len(), d)?;
    }
    let layer = p.kind == PT_NORM_LAYER as i32;
    let mut out = NormOut {
        h: vec![f16::NAN; rows * d],
        x_save: save_x.then(|| vec![f16::NAN; rows * d]),
        mean: vec![f32::NAN; if layer { rows } else { 0 }],
        rstd: vec![f32::NAN; rows],
    };
    let x_save = out.x_save.as_mut().map_or(std::ptr::null_mut(), |v| hm(v));
    let mean = if layer {
        out.mean.as_mut_ptr()
    } else {
        std::ptr::null_mut()
    };
    // SAFETY: lengths checked above; the kernel writes x, x_save, h, mean, rstd within them.
    run("emulated add + norm", || unsafe {
        ffi::pt_emu_add_norm_fwd(
            p,
            x.as_mut_ptr(),
            oh(y),
            oh(y_bias),
            h(w),
            oh(b),
            x_save,
            hm(&mut out.h),
            mean,
            out.rstd.as_mut_ptr(),
        )
    })?;
    Ok(out)
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
    check_len("dy", dy.len(), rows * d)?;
    check_len("x", x.len(), rows * d)?;
    check_len("w", w.len(), d)?;
    let layer = p.kind == PT_NORM_LAYER as i32;
    if layer {
        check_len("mean", mean.len(), rows)?;
    }
    check_len("rstd", rstd.len(), rows)?;
    check_len("dx", dx.len(), rows * d)?;
    let mut dx16 = vec![f16::NAN; rows * d];
    // SAFETY: lengths checked above.
    run("emulated norm backward", || unsafe {
        ffi::pt_emu_norm_bwd(
            p,
            h(dy),
            h(x),
            h(w),
            if layer {
                mean.as_ptr()
            } else {
                std::ptr::null()
            },
            rstd.as_ptr(),
            dx.as_mut_ptr(),
            hm(&mut dx16),
        )
    })?;
    Ok(dx16)
}

fn act_len(p: &pt_act_params) -> usize {
    p.rows as usize * p.width as usize
}

/// `a += bias` (in place), returns `gelu_tanh(a)`.
pub fn gelu_forward(p: &pt_act_params, a: &mut [f16], bias: Option<&[f16]>) -> Result<Vec<f16>> {
    let n = act_len(p);
    check_len("a", a.len(), n)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), p.width as usize)?;
    }
    let mut out = vec![f16::NAN; n];
    // SAFETY: lengths checked above.
    run("emulated GELU", || unsafe {
        ffi::pt_emu_gelu_fwd(p, hm(a), oh(bias), hm(&mut out))
    })?;
    Ok(out)
}

/// `dy · gelu_tanh'(a)`.
pub fn gelu_backward(p: &pt_act_params, dy: &[f16], a: &[f16]) -> Result<Vec<f16>> {
    let n = act_len(p);
    check_len("dy", dy.len(), n)?;
    check_len("a", a.len(), n)?;
    let mut da = vec![f16::NAN; n];
    // SAFETY: lengths checked above.
    run("emulated GELU backward", || unsafe {
        ffi::pt_emu_gelu_bwd(p, h(dy), h(a), hm(&mut da))
    })?;
    Ok(da)
}

/// `silu(gate) · up` from `gu [rows, 2·width]` (gate | up per row).
pub fn swiglu_forward(p: &pt_act_params, gu: &[f16]) -> Result<Vec<f16>> {
    let n = act_len(p);
    check_len("gu", gu.len(), 2 * n)?;
    let mut out = vec![f16::NAN; n];
    // SAFETY: lengths checked above.
    run("emulated SwiGLU", || unsafe {
        ffi::pt_emu_swiglu_fwd(p, h(gu), hm(&mut out))
    })?;
    Ok(out)
}

/// SwiGLU backward: `[rows, 2·width]` (d_gate | d_up per row).
pub fn swiglu_backward(p: &pt_act_params, dy: &[f16], gu: &[f16]) -> Result<Vec<f16>> {
    let n = act_len(p);
    check_len("dy", dy.len(), n)?;
    check_len("gu", gu.len(), 2 * n)?;
    let mut dgu = vec![f16::NAN; 2 * n];
    // SAFETY: lengths checked above.
    run("emulated SwiGLU backward", || unsafe {
        ffi::pt_emu_swiglu_bwd(p, h(dy), h(gu), hm(&mut dgu))
    })?;
    Ok(dgu)
}

/// RoPE inputs of a layout change on the host: per-sequence offsets and `[n_positions, D/2]`
/// tables.
#[derive(Clone, Copy, Debug)]
pub struct HostRope<'a> {
    pub pos_offset: &'a [i32],
    pub cos: &'a [f32],
    pub sin: &'a [f32],
}

fn check_rope(p: &pt_heads_params, rope: Option<&HostRope<'_>>) -> Result<()> {
    match rope {
        Some(r) => {
            check_len("pos_offset", r.pos_offset.len(), p.batch as usize)?;
            check_len("cos", r.cos.len(), sizes::rope_table(p))?;
            check_len("sin", r.sin.len(), sizes::rope_table(p))
        }
        None if p.rope != 0 => bail!("RoPE requested without tables"),
        None => Ok(()),
    }
}

type RopePtrs = (*const i32, *const f32, *const f32);

fn rope_ptrs(rope: Option<&HostRope<'_>>) -> RopePtrs {
    rope.map_or(
        (std::ptr::null(), std::ptr::null(), std::ptr::null()),
        |r| (r.pos_offset.as_ptr(), r.cos.as_ptr(), r.sin.as_ptr()),
    )
}

/// Rows → `[B, H, T, D]` with bias and RoPE.
pub fn rows_to_heads(
    p: &pt_heads_params,
    src: &[f16],
    bias: Option<&[f16]>,
    rope: Option<&HostRope<'_>>,
) -> Result<Vec<f16>> {
    check_len("src", src.len(), sizes::heads_rows(p))?;
    if let Some(b) = bias {
        check_len("bias", b.len(), (p.heads * p.head_dim) as usize)?;
    }
    check_rope(p, rope)?;
    let mut dst = vec![f16::NAN; sizes::heads(p)];
    let (po, c, s) = rope_ptrs(rope);
    // SAFETY: lengths checked above.
    run("emulated rows → heads", || unsafe {
        ffi::pt_emu_rows_to_heads(p, h(src), oh(bias), po, c, s, hm(&mut dst))
    })?;
    Ok(dst)
}

/// `[B, H, T, D]` → the tensor's columns of `dst` rows (inverse RoPE when `p.rope`).
pub fn heads_to_rows(
    p: &pt_heads_params,
    src: &[f16],
    rope: Option<&HostRope<'_>>,
    dst: &mut [f16],
) -> Result<()> {
    check_len("src", src.len(), sizes::heads(p))?;
    check_rope(p, rope)?;
    check_len("dst", dst.len(), sizes::heads_rows(p))?;
    let (po, c, s) = rope_ptrs(rope);
    // SAFETY: lengths checked above.
    run("emulated heads → rows", || unsafe {
        ffi::pt_emu_heads_to_rows(p, h(src), po, c, s, hm(dst))
    })
}

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
    let mut dst = vec![f16::NAN; n * d];
    // SAFETY: every index is a row of src (checked above); dst holds n·d.
    run("emulated gather", || unsafe {
        ffi::pt_emu_gather_rows(p, h(src), index.as_ptr(), hm(&mut dst))
    })?;
    Ok(dst)
}

/// `dst[index[i]] = src[i]`.
pub fn scatter_rows(p: &pt_rows_params, src: &[f16], index: &[i32], dst: &mut [f16]) -> Result<()> {
    let (n, d) = (p.n as usize, p.d as usize);
    check_len("src", src.len(), n * d)?;
    check_index(index, n, dst.len() / d.max(1))?;
    // SAFETY: every index is a row of dst (checked above); src holds n·d.
    run("emulated scatter", || unsafe {
        ffi::pt_emu_scatter_rows(p, h(src), index.as_ptr(), hm(dst))
    })
}

/// Per-row cross-entropy (`targets[r] < 0`: no target); with `p.write_grad` the logits become
/// their gradient in place.
pub fn cross_entropy(p: &pt_ce_params, logits: &mut [f16], targets: &[i32]) -> Result<Vec<f32>> {
    let (rows, vocab) = (p.rows as usize, p.vocab as usize);
    check_len("logits", logits.len(), rows * vocab)?;
    check_len("targets", targets.len(), rows)?;
    let mut loss = vec![f32::NAN; rows];
    // SAFETY: lengths checked above; out-of-range targets are handled in the kernel.
    run("emulated cross-entropy", || unsafe {
        ffi::pt_emu_cross_entropy(p, hm(logits), targets.as_ptr(), loss.as_mut_ptr())
    })?;
    Ok(loss)
}
