//! Safe wrappers over the host emulation of the optimizer kernels (`kernels/optim.cu`: AdamW,
//! SGD with and without momentum, the two-stage sum of squares), compiled for the CPU by
//! `build/emulation.rs` from `kernels/host/emulation_optim.cpp`. Tests run them against
//! [`crate::optim`] without a GPU; the emulated engine's optimizer step uses them.
//!
//! Each wrapper takes the ABI struct from the same builders as the GPU launches
//! ([`crate::cuda::ops::adamw_params`], [`sgd_params`]) and checks every buffer's length
//! against it (the emulation trusts them like the GPU does).

use anyhow::{bail, Result};
use half::f16;

use crate::cuda::abi::{pt_adamw_params, pt_sgd_params};
use crate::cuda::model_ops::check_len;
use crate::optim::SgdConfig;

#[cfg(prefix_tune_emulation)]
mod ffi {
    use crate::cuda::abi::{pt_adamw_params, pt_sgd_params};
    extern "C" {
        pub fn pt_emu_adamw_step(
            p: *const pt_adamw_params,
            param: *mut f32,
            grad: *const f32,
            m: *mut f32,
            v: *mut f32,
            param_f16: *mut u16,
        ) -> i32;
        pub fn pt_emu_sgd_step(
            p: *const pt_sgd_params,
            param: *mut f32,
            grad: *const f32,
            momentum_buf: *mut f32,
            param_f16: *mut u16,
        ) -> i32;
        pub fn pt_emu_sum_squares(n: i64, x: *const f32, out: *mut f32, accumulate: i32) -> i32;
    }
}

/// Stubs, never called: [`run`] checks [`crate::emu::ops::available`] first.
#[cfg(not(prefix_tune_emulation))]
#[allow(unused_variables)]
mod ffi {
    use crate::cuda::abi::{pt_adamw_params, pt_sgd_params};
    pub unsafe fn pt_emu_adamw_step(
        p: *const pt_adamw_params,
        param: *mut f32,
        grad: *const f32,
        m: *mut f32,
        v: *mut f32,
        param_f16: *mut u16,
    ) -> i32 {
        -1
    }
    pub unsafe fn pt_emu_sgd_step(
        p: *const pt_sgd_params,
        param: *mut f32,
        grad: *const f32,
        momentum_buf: *mut f32,
        param_f16: *mut u16,
    ) -> i32 {
        -1
    }
    pub unsafe fn pt_emu_sum_squares(n: i64, x: *const f32, out: *mut f32, accumulate: i32) -> i32 {
        -1
    }
}

fn run(what: &str, f: impl FnOnce() -> i32) -> Result<()> {
    if !crate::emu::ops::available() {
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

fn n_of(n: i64) -> Result<usize> {
    usize::try_from(n).map_err(|_| anyhow::anyhow!("negative element count {n}"))
}

/// The ABI struct of SGD update number `step` (1-based), as the GPU launch builds it.
pub fn sgd_params(
    config: &SgdConfig,
    step: u64,
    lr: f64,
    grad_scale: f32,
    n: usize,
) -> Result<pt_sgd_params> {
    if step == 0 {
        bail!("SGD step numbers start at 1");
    }
    Ok(pt_sgd_params {
        n: n as i64,
        lr: lr as f32,
        weight_decay: config.weight_decay as f32,
        grad_scale,
        momentum: config.momentum as f32,
        first_step: (step == 1) as i32,
    })
}

/// One AdamW update (`pt_adamw_step`, or `pt_adamw_step_f16` with `param_f16`).
pub fn adamw_step(
    p: &pt_adamw_params,
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    param_f16: Option<&mut [f16]>,
) -> Result<()> {
    let n = n_of(p.n)?;
    check_len("emulated adamw param", param.len(), n)?;
    check_len("emulated adamw grad", grad.len(), n)?;
    check_len("emulated adamw m", m.len(), n)?;
    check_len("emulated adamw v", v.len(), n)?;
    if let Some(h) = &param_f16 {
        check_len("emulated adamw fp16 copy", h.len(), n)?;
    }
    let h = param_f16.map_or(std::ptr::null_mut(), |h| h.as_mut_ptr().cast::<u16>());
    // SAFETY: every buffer holds p.n elements (checked above); h is null or holds p.n halves.
    run("emulated AdamW step", || unsafe {
        ffi::pt_emu_adamw_step(
            p,
            param.as_mut_ptr(),
            grad.as_ptr(),
            m.as_mut_ptr(),
            v.as_mut_ptr(),
            h,
        )
    })
}

/// One SGD update: with `momentum_buf` the momentum kernels (`p.momentum` must then be
/// non-zero), with `param_f16` the fp16-writing variants.
pub fn sgd_step(
    p: &pt_sgd_params,
    param: &mut [f32],
    grad: &[f32],
    momentum_buf: Option<&mut [f32]>,
    param_f16: Option<&mut [f16]>,
) -> Result<()> {
    let n = n_of(p.n)?;
    check_len("emulated sgd param", param.len(), n)?;
    check_len("emulated sgd grad", grad.len(), n)?;
    match (&momentum_buf, p.momentum != 0.0) {
        (Some(b), true) => check_len("emulated sgd momentum buffer", b.len(), n)?,
        (None, false) => {}
        (None, true) => bail!("emulated SGD: momentum {} needs a buffer", p.momentum),
        (Some(_), false) => bail!("emulated SGD: a momentum buffer without momentum"),
    }
    if let Some(h) = &param_f16 {
        check_len("emulated sgd fp16 copy", h.len(), n)?;
    }
    let b = momentum_buf.map_or(std::ptr::null_mut(), |b| b.as_mut_ptr());
    let h = param_f16.map_or(std::ptr::null_mut(), |h| h.as_mut_ptr().cast::<u16>());
    // SAFETY: every buffer holds p.n elements (checked above); b and h are null or hold p.n.
    run("emulated SGD step", || unsafe {
        ffi::pt_emu_sgd_step(p, param.as_mut_ptr(), grad.as_ptr(), b, h)
    })
}

/// `out = Σ x²` (or `out += Σ x²` with `accumulate`), through both reduction kernels with the
/// GPU wrapper's grid.
pub fn sum_squares(x: &[f32], out: &mut f32, accumulate: bool) -> Result<()> {
    // SAFETY: the kernels read x.len() floats of x and write one float to out.
    run("emulated sum of squares", || unsafe {
        ffi::pt_emu_sum_squares(x.len() as i64, x.as_ptr(), out, accumulate as i32)
    })
}
