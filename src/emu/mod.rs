//! The CUDA kernels executed on the CPU: the real `kernels/*.cu` sources compiled for the host by
//! `build/emulation.rs` with the shim in `kernels/host/` (every thread of a block an OS thread,
//! warp operations emulated with the PTX fragment layouts). Tests use it to check the kernels, and
//! the whole GPU engine (through [`backend`]), against the CPU reference without a GPU.
//!
//! This file wraps the fused prefix-attention kernels; [`ops`] the model ops (embedding, norms,
//! RoPE, activations, cross-entropy), [`decode`] the KV-cache decode attention, [`optim`] the
//! optimizer kernels, and [`backend`] implements the GPU engine's backend with all of them.
//!
//! Inputs and outputs are fp16 (`half::f16`) in the layouts of
//! [`crate::reference::attention`]; LSE comes back in natural log. Every output is filled with
//! NaN before the launch, so an element the kernels forgot to write shows up as NaN.

pub mod backend;
pub mod decode;
pub mod ops;
pub mod optim;
pub mod reparam;

use anyhow::{bail, Result};
use half::f16;

use crate::cuda::abi::pt_attn_params;
use crate::cuda::attention::{attn_params, index_arrays};
use crate::reference::attention::AttnShape;

/// True when this build contains the host emulation (the CUDA headers were found at build time).
pub fn available() -> bool {
    cfg!(prefix_tune_emulation)
}

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

/// fp16 gradients of one prefix-attention call.
#[derive(Clone, Debug)]
pub struct HalfGrads {
    pub dq: Vec<f16>,
    pub dk: Vec<f16>,
    pub dv: Vec<f16>,
    pub d_prefix_k: Vec<f16>,
    pub d_prefix_v: Vec<f16>,
}

impl HalfInputs {
    fn check(&self, s: &AttnShape) -> Result<(Vec<i32>, Vec<i32>)> {
        let lens = [
            ("q", self.q.len(), s.q_len()),
            ("k", self.k.len(), s.kv_len()),
            ("v", self.v.len(), s.kv_len()),
            ("prefix_k", self.prefix_k.len(), s.bank_len()),
            ("prefix_v", self.prefix_v.len(), s.bank_len()),
        ];
        for (what, got, want) in lens {
            if got != want {
                bail!("{what}: expected {want} elements for {s:?}, got {got}");
            }
        }
        index_arrays(s, &self.prefix_index, &self.valid_len)
    }
}

#[cfg(prefix_tune_emulation)]
mod ffi {
    use crate::cuda::abi::pt_attn_params;
    extern "C" {
        pub fn pt_emu_attn_fwd(
            p: *const pt_attn_params,
            q: *const u16,
            k: *const u16,
            v: *const u16,
            prefix_k: *const u16,
            prefix_v: *const u16,
            prefix_index: *const i32,
            valid_len: *const i32,
            o: *mut u16,
            lse: *mut f32,
        ) -> i32;
        pub fn pt_emu_attn_bwd(
            p: *const pt_attn_params,
            q: *const u16,
            k: *const u16,
            v: *const u16,
            prefix_k: *const u16,
            prefix_v: *const u16,
            prefix_index: *const i32,
            valid_len: *const i32,
            o: *const u16,
            lse: *const f32,
            d_o: *const u16,
            delta: *mut f32,
            dq_accum: *mut f32,
            dpk_partial: *mut f32,
            dpv_partial: *mut f32,
            dq: *mut u16,
            dk: *mut u16,
            dv: *mut u16,
            d_prefix_k: *mut u16,
            d_prefix_v: *mut u16,
        ) -> i32;
        pub fn pt_emu_ldmatrix_bank_conflicts() -> u64;
    }
}

/// Number of emulated `ldmatrix` matrices so far (all launches of this process) whose 8 row
/// addresses hit the same shared-memory bank group twice (a conflict on the GPU); 0 without the
/// emulation.
pub fn ldmatrix_bank_conflicts() -> u64 {
    #[cfg(prefix_tune_emulation)]
    {
        // SAFETY: reads an atomic counter.
        unsafe { ffi::pt_emu_ldmatrix_bank_conflicts() }
    }
    #[cfg(not(prefix_tune_emulation))]
    {
        0
    }
}

fn bits(x: &[f16]) -> *const u16 {
    x.as_ptr().cast()
}

fn bits_mut(x: &mut [f16]) -> *mut u16 {
    x.as_mut_ptr().cast()
}

fn status(what: &str, rc: i32) -> Result<()> {
    match rc {
        0 => Ok(()),
        1 => bail!("{what}: unsupported head dim"),
        _ => bail!("{what}: host emulation failed (code {rc})"),
    }
}

#[cfg(not(prefix_tune_emulation))]
fn missing<T>() -> Result<T> {
    bail!("this build has no host emulation of the kernels (CUDA headers not found at build time)")
}

/// Forward through the emulated kernels: `(O [B,Hq,T,D], LSE [B,Hq,T] natural log)`.
pub fn forward(s: &AttnShape, inp: &HalfInputs) -> Result<(Vec<f16>, Vec<f32>)> {
    let p: pt_attn_params = attn_params(s, inp.scale, false)?;
    let (pi, vl) = inp.check(s)?;
    let mut o = vec![f16::NAN; s.q_len()];
    let mut lse = vec![f32::NAN; s.lse_len()];
    #[cfg(prefix_tune_emulation)]
    {
        // SAFETY: every buffer has the length the kernels index for shape `s` (checked above);
        // the emulation only reads the inputs and writes `o` and `lse`.
        let rc = unsafe {
            ffi::pt_emu_attn_fwd(
                &p,
                bits(&inp.q),
                bits(&inp.k),
                bits(&inp.v),
                bits(&inp.prefix_k),
                bits(&inp.prefix_v),
                pi.as_ptr(),
                vl.as_ptr(),
                bits_mut(&mut o),
                lse.as_mut_ptr(),
            )
        };
        status("emulated prefix attention forward", rc)?;
        Ok((o, lse))
    }
    #[cfg(not(prefix_tune_emulation))]
    {
        let _ = (p, pi, vl, &mut o, &mut lse, bits, bits_mut, status);
        missing()
    }
}

/// Backward through the emulated kernels, from the forward's `O`, `LSE` (natural log) and `dO`.
/// `deterministic` selects the atomic-free dQ path.
pub fn backward(
    s: &AttnShape,
    inp: &HalfInputs,
    o: &[f16],
    lse: &[f32],
    d_o: &[f16],
    deterministic: bool,
) -> Result<HalfGrads> {
    let p: pt_attn_params = attn_params(s, inp.scale, deterministic)?;
    let (pi, vl) = inp.check(s)?;
    if o.len() != s.q_len() || d_o.len() != s.q_len() || lse.len() != s.lse_len() {
        bail!("o/d_o/lse lengths do not match {s:?}");
    }
    let partial_len = s.batch * s.kv_heads * s.prefix * s.head_dim;
    let mut delta = vec![f32::NAN; s.lse_len()];
    let mut dq_accum = vec![f32::NAN; if deterministic { 0 } else { s.q_len() }];
    let mut dpk_partial = vec![f32::NAN; partial_len];
    let mut dpv_partial = vec![f32::NAN; partial_len];
    let mut g = HalfGrads {
        dq: vec![f16::NAN; s.q_len()],
        dk: vec![f16::NAN; s.kv_len()],
        dv: vec![f16::NAN; s.kv_len()],
        d_prefix_k: vec![f16::NAN; s.bank_len()],
        d_prefix_v: vec![f16::NAN; s.bank_len()],
    };
    #[cfg(prefix_tune_emulation)]
    {
        // SAFETY: all buffers are sized for shape `s` as the kernels index them (checked above);
        // dq_accum is only touched in atomic mode, where it holds B*Hq*T*D floats.
        let rc = unsafe {
            ffi::pt_emu_attn_bwd(
                &p,
                bits(&inp.q),
                bits(&inp.k),
                bits(&inp.v),
                bits(&inp.prefix_k),
                bits(&inp.prefix_v),
                pi.as_ptr(),
                vl.as_ptr(),
                bits(o),
                lse.as_ptr(),
                bits(d_o),
                delta.as_mut_ptr(),
                if deterministic {
                    std::ptr::null_mut()
                } else {
                    dq_accum.as_mut_ptr()
                },
                dpk_partial.as_mut_ptr(),
                dpv_partial.as_mut_ptr(),
                bits_mut(&mut g.dq),
                bits_mut(&mut g.dk),
                bits_mut(&mut g.dv),
                bits_mut(&mut g.d_prefix_k),
                bits_mut(&mut g.d_prefix_v),
            )
        };
        status("emulated prefix attention backward", rc)?;
        Ok(g)
    }
    #[cfg(not(prefix_tune_emulation))]
    {
        let _ = (
            p,
            pi,
            vl,
            &mut delta,
            &mut dq_accum,
            &mut dpk_partial,
            &mut dpv_partial,
            &mut g,
        );
        missing()
    }
}
