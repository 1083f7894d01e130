//! Launch wrappers for the fused prefix-attention kernels (`kernels/prefix_attention.cu`):
//! forward (O, natural-log LSE) and the FlashAttention-2 style backward (dQ, dK, dV and the prefix
//! gradients summed over the sequences using each prefix), on fp16 device buffers.
//!
//! [`attn_params`] validates a shape and fills the ABI struct; it is shared with the host
//! emulation (`crate::emu`), which runs the same kernel sources on the CPU.

use anyhow::{bail, Result};

use super::abi::pt_attn_params;
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

/// Checks the per-sequence prefix indices and valid lengths; returns them as the kernels' int32.
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
        if s.prefix > 0 && pi >= s.n_prefixes {
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
        .map(|&p| if s.prefix > 0 { p as i32 } else { 0 })
        .collect();
    Ok((pi, valid_len.iter().map(|&v| v as i32).collect()))
}
