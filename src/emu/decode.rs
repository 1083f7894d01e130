//! The host emulation of the KV-cache decode attention (`kernels/decode_attention.cu`, compiled
//! for the CPU from `kernels/host/emulation_decode.cpp`): a safe wrapper taking host buffers, so
//! the kernel runs in tests and in the emulated engine without a GPU. Outputs are filled with NaN
//! before the launch so an element the kernel forgot shows up.

use anyhow::{bail, Result};
use half::f16;

use crate::cuda::abi::pt_decode_params;
use crate::cuda::decode::{check_bufs, check_lengths, decode_params, DecodeBufs, DecodeShape};

#[cfg(prefix_tune_emulation)]
mod ffi {
    use super::pt_decode_params;
    extern "C" {
        #[allow(clippy::too_many_arguments)]
        pub fn pt_emu_decode_attention(
            p: *const pt_decode_params,
            q: *const u16,
            k_new: *const u16,
            v_new: *const u16,
            cache_k: *const u16,
            cache_v: *const u16,
            past: *const i32,
            n_new: *const i32,
            o: *mut u16,
        ) -> i32;
    }
}

#[cfg(not(prefix_tune_emulation))]
mod ffi {
    use super::pt_decode_params;
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn pt_emu_decode_attention(
        _p: *const pt_decode_params,
        _q: *const u16,
        _k_new: *const u16,
        _v_new: *const u16,
        _cache_k: *const u16,
        _cache_v: *const u16,
        _past: *const i32,
        _n_new: *const i32,
        _o: *mut u16,
    ) -> i32 {
        -1
    }
}

fn h(x: &[f16]) -> *const u16 {
    x.as_ptr().cast()
}

/// The emulated decode attention into `o` (its first `[B, Hq, T, D]` elements).
pub fn forward_into(
    s: &DecodeShape,
    scale: f32,
    bufs: &DecodeBufs<'_, [f16]>,
    past: &[i32],
    n_new: &[i32],
    o: &mut [f16],
) -> Result<()> {
    if !crate::emu::ops::available() {
        bail!("this build has no host emulation of the kernels (CUDA headers not found)");
    }
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
    check_lengths(s, past, n_new)?;
    o[..s.q_len()].fill(f16::NAN);
    // SAFETY: every buffer holds what the shape says (checked above), the lengths are in range.
    let rc = unsafe {
        ffi::pt_emu_decode_attention(
            &p,
            h(bufs.q),
            h(bufs.k_new),
            h(bufs.v_new),
            h(bufs.cache_k),
            h(bufs.cache_v),
            past.as_ptr(),
            n_new.as_ptr(),
            o.as_mut_ptr().cast(),
        )
    };
    match rc {
        0 => Ok(()),
        rc => bail!("emulated decode attention failed (code {rc})"),
    }
}

/// The emulated decode attention: `o [B, Hq, T, D]`.
pub fn forward(
    s: &DecodeShape,
    scale: f32,
    bufs: &DecodeBufs<'_, [f16]>,
    past: &[i32],
    n_new: &[i32],
) -> Result<Vec<f16>> {
    let mut o = vec![f16::NAN; s.q_len()];
    forward_into(s, scale, bufs, past, n_new, &mut o)?;
    Ok(o)
}
