//! Safe wrappers over the host emulation of the reparameterization kernels
//! (`kernels/reparam.cu`: the fp32 matmul with epilogue, the column sums), compiled for the CPU by
//! `build/emulation.rs` from `kernels/host/emulation_reparam.cpp`. The emulated engine's
//! reparameterization ([`crate::cuda::reparam`]) runs through them.

use anyhow::{bail, Result};

use crate::cuda::reparam::GemmSpec;

#[cfg(prefix_tune_emulation)]
mod ffi {
    extern "C" {
        #[allow(clippy::too_many_arguments)]
        pub fn pt_emu_reparam_gemm(
            m: i32,
            n: i32,
            k: i32,
            ta: i32,
            tb: i32,
            epilogue: i32,
            a: *const f32,
            b: *const f32,
            bias: *const f32,
            h: *const f32,
            c: *mut f32,
        ) -> i32;
        pub fn pt_emu_reparam_col_sum(rows: i32, cols: i32, x: *const f32, out: *mut f32) -> i32;
    }
}

/// Stubs, never called: [`run`] checks [`crate::emu::ops::available`] first.
#[cfg(not(prefix_tune_emulation))]
#[allow(unused_variables, clippy::too_many_arguments)]
mod ffi {
    pub unsafe fn pt_emu_reparam_gemm(
        m: i32,
        n: i32,
        k: i32,
        ta: i32,
        tb: i32,
        epilogue: i32,
        a: *const f32,
        b: *const f32,
        bias: *const f32,
        h: *const f32,
        c: *mut f32,
    ) -> i32 {
        -1
    }
    pub unsafe fn pt_emu_reparam_col_sum(
        rows: i32,
        cols: i32,
        x: *const f32,
        out: *mut f32,
    ) -> i32 {
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

/// `pt_reparam_gemm` (lengths checked by [`GemmSpec::check`]).
pub fn gemm(
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
    let (m, n, k) = s.dims()?;
    run("emulated reparam gemm", || unsafe {
        ffi::pt_emu_reparam_gemm(
            m,
            n,
            k,
            s.ta as i32,
            s.tb as i32,
            s.epilogue as i32,
            a.as_ptr(),
            b.as_ptr(),
            bias.map_or(std::ptr::null(), <[f32]>::as_ptr),
            h.map_or(std::ptr::null(), <[f32]>::as_ptr),
            c.as_mut_ptr(),
        )
    })
}

/// `pt_reparam_col_sum`: `out[j] = Σ_r x[r, j]` over `x`'s `out.len()` columns.
pub fn col_sum(x: &[f32], out: &mut [f32]) -> Result<()> {
    let (rows, cols) = crate::cuda::reparam::col_sum_dims(x.len(), out.len())?;
    run("emulated reparam col_sum", || unsafe {
        ffi::pt_emu_reparam_col_sum(rows, cols, x.as_ptr(), out.as_mut_ptr())
    })
}
