//! Launch wrappers for the frozen model's layer kernels (`kernels/{embedding,norm,activation,rope,
//! cross_entropy}.cu`, ABI in `kernels/abi/model_ops.h`): embedding, residual add + norm, norm
//! backward, GELU/SwiGLU forward and backward, the row/head layout changes with bias and RoPE,
//! and the chunked LM head's gather/scatter and cross-entropy.
//!
//! The `*_params` functions validate sizes and fill the ABI structs; they are shared with the
//! simulated device (sim/), which runs the same kernel sources on the CPU. The launch
//! functions check every buffer against the parameters (a buffer may be longer than needed, for
//! workspaces sized for the largest chunk) and run asynchronously on the context's stream.

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};
use half::f16;

use super::abi::{
    pt_act_params, pt_ce_params, pt_embedding_params, pt_heads_params, pt_norm_params,
    pt_rows_params, PT_CE_SMEM, PT_CE_THREADS, PT_EW_THREADS, PT_NORM_LAYER, PT_NORM_RMS,
    PT_NORM_ROWS_PER_BLOCK, PT_NORM_THREADS,
};
use super::context::{launched, GpuContext};

// SAFETY: bindgen-generated `#[repr(C)]` structs of plain integers and floats, with the same
// layout as the C definitions the kernels take by value.
unsafe impl DeviceRepr for pt_embedding_params {}
unsafe impl DeviceRepr for pt_norm_params {}
unsafe impl DeviceRepr for pt_act_params {}
unsafe impl DeviceRepr for pt_heads_params {}
unsafe impl DeviceRepr for pt_rows_params {}
unsafe impl DeviceRepr for pt_ce_params {}

/// Which normalisation a norm kernel computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// LayerNorm (GPT-2): mean and variance, weight and bias.
    Layer,
    /// RMSNorm (Llama): root mean square, weight only.
    Rms,
}

fn i32_of(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow!("{what} = {v} does not fit the kernels' int32 sizes"))
}

/// Checks that a buffer of `got` elements holds the `want` a kernel will touch.
pub fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got < want {
        bail!("{what}: buffer holds {got} elements, the launch needs {want}");
    }
    Ok(())
}

/// `[B·T, d]` rows of `seq`-token sequences; positions come from a per-sequence offset.
pub fn embedding_params(
    batch: usize,
    seq: usize,
    d_model: usize,
    vocab: usize,
    n_positions: usize,
) -> Result<pt_embedding_params> {
    i32_of("B·T", batch * seq)?;
    Ok(pt_embedding_params {
        batch: i32_of("batch", batch)?,
        seq: i32_of("seq", seq)?,
        d_model: i32_of("d_model", d_model)?,
        vocab: i32_of("vocab", vocab)?,
        n_positions: i32_of("n_positions", n_positions)?,
    })
}

/// A norm over `rows` rows of `d` features.
pub fn norm_params(
    rows: usize,
    d: usize,
    eps: f64,
    kind: NormKind,
    accumulate: bool,
) -> Result<pt_norm_params> {
    if d == 0 {
        bail!("norm over rows of 0 features");
    }
    Ok(pt_norm_params {
        rows: i32_of("rows", rows)?,
        d: i32_of("d", d)?,
        eps: eps as f32,
        kind: match kind {
            NormKind::Layer => PT_NORM_LAYER as i32,
            NormKind::Rms => PT_NORM_RMS as i32,
        },
        accumulate: accumulate as i32,
    })
}

/// An activation over `[rows, width]`.
pub fn act_params(rows: usize, width: usize) -> Result<pt_act_params> {
    Ok(pt_act_params {
        rows: rows as i64,
        width: i32_of("width", width)?,
    })
}

/// The layout change of one tensor of `heads` heads between rows (`row_stride` elements per row,
/// the tensor starting at column `col_offset`) and `[B, heads, T, D]`.
#[allow(clippy::too_many_arguments)]
pub fn heads_params(
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    row_stride: usize,
    col_offset: usize,
    rope: bool,
    n_positions: usize,
) -> Result<pt_heads_params> {
    if head_dim == 0 || head_dim % 2 != 0 {
        bail!("head dim must be even and positive, got {head_dim}");
    }
    if col_offset + heads * head_dim > row_stride {
        bail!(
            "columns {col_offset}..{} do not fit rows of {row_stride}",
            col_offset + heads * head_dim
        );
    }
    i32_of("B·T", batch * seq)?;
    Ok(pt_heads_params {
        batch: i32_of("batch", batch)?,
        seq: i32_of("seq", seq)?,
        heads: i32_of("heads", heads)?,
        head_dim: i32_of("head_dim", head_dim)?,
        row_stride: i32_of("row_stride", row_stride)?,
        col_offset: i32_of("col_offset", col_offset)?,
        rope: rope as i32,
        n_positions: i32_of("n_positions", n_positions)?,
    })
}

/// `n` rows of `d` features picked by an index list.
pub fn rows_params(n: usize, d: usize) -> Result<pt_rows_params> {
    Ok(pt_rows_params {
        n: i32_of("rows", n)?,
        d: i32_of("d", d)?,
    })
}

/// Cross-entropy over `rows` rows of `vocab` logits; `grad_scale`: the gradient written in place
/// (`None`: loss only).
pub fn ce_params(rows: usize, vocab: usize, grad_scale: Option<f32>) -> Result<pt_ce_params> {
    if vocab == 0 {
        bail!("cross-entropy over an empty vocabulary");
    }
    Ok(pt_ce_params {
        rows: i32_of("rows", rows)?,
        vocab: i32_of("vocab", vocab)?,
        grad_scale: grad_scale.unwrap_or(0.0),
        write_grad: grad_scale.is_some() as i32,
    })
}

/// Element counts of the buffers of each kernel (shared by the wrappers and `cuda::host`).
pub mod sizes {
    use super::*;

    /// (rows, d) of an embedding launch.
    pub fn embedding(p: &pt_embedding_params) -> (usize, usize) {
        ((p.batch * p.seq) as usize, p.d_model as usize)
    }

    /// Elements of the row-major side of a layout change: rows · row_stride.
    pub fn heads_rows(p: &pt_heads_params) -> usize {
        (p.batch as usize) * (p.seq as usize) * (p.row_stride as usize)
    }

    /// Elements of the head side `[B, H, T, D]`.
    pub fn heads(p: &pt_heads_params) -> usize {
        (p.batch * p.heads) as usize * (p.seq * p.head_dim) as usize
    }

    /// cos/sin table elements.
    pub fn rope_table(p: &pt_heads_params) -> usize {
        p.n_positions as usize * (p.head_dim / 2) as usize
    }
}

// ---------------------------------------------------------------------------------------------
// GPU launches.

fn grid_stride(gpu: &GpuContext, work: usize) -> LaunchConfig {
    let wanted = work.div_ceil(PT_EW_THREADS as usize).max(1);
    let cap = (gpu.sm_count() * 8) as usize;
    LaunchConfig {
        grid_dim: (wanted.min(cap) as u32, 1, 1),
        block_dim: (PT_EW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The norm kernels' launch (abi/model_ops.h): one warp per row, `PT_NORM_ROWS_PER_BLOCK` rows
/// per block of `PT_NORM_THREADS` threads.
pub fn norm_launch(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(PT_NORM_ROWS_PER_BLOCK as usize) as u32, 1, 1),
        block_dim: (PT_NORM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The cross-entropy's launch: one block per row, with the block reductions' scratch.
pub fn ce_launch(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (PT_CE_THREADS, 1, 1),
        shared_mem_bytes: PT_CE_SMEM,
    }
}

/// The null device pointer, pushed for an absent optional buffer.
static NULL: u64 = 0;

fn opt_arg<'a, T>(b: &mut LaunchArgs<'a>, x: Option<&'a CudaSlice<T>>) {
    match x {
        Some(s) => b.arg(s),
        None => b.arg(&NULL),
    };
}

fn opt_arg_mut<'a, T>(b: &mut LaunchArgs<'a>, x: Option<&'a mut CudaSlice<T>>) {
    match x {
        Some(s) => b.arg(s),
        None => b.arg(&NULL),
    };
}

/// `x[b·T + t] = tok_emb[tokens] (+ pos_emb[pos_offset[b] + t])`, fp32 out.
pub fn embedding_forward(
    gpu: &GpuContext,
    p: &pt_embedding_params,
    tokens: &CudaSlice<i32>,
    pos_offset: &CudaSlice<i32>,
    tok_emb: &CudaSlice<f16>,
    pos_emb: Option<&CudaSlice<f16>>,
    x: &mut CudaSlice<f32>,
) -> Result<()> {
    let (rows, d) = sizes::embedding(p);
    check_len("tokens", tokens.len(), rows)?;
    check_len("pos_offset", pos_offset.len(), p.batch as usize)?;
    check_len("tok_emb", tok_emb.len(), p.vocab as usize * d)?;
    match pos_emb {
        Some(pe) => check_len("pos_emb", pe.len(), p.n_positions as usize * d)?,
        None if p.n_positions > 0 => bail!("embedding: n_positions > 0 but no position table"),
        None => {}
    }
    check_len("x", x.len(), rows * d)?;
    if rows * d == 0 {
        return Ok(());
    }
    let f = gpu.function("embedding", "pt_embedding_fwd")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(p).arg(tokens).arg(pos_offset).arg(tok_emb);
    opt_arg(&mut b, pos_emb);
    b.arg(x);
    // SAFETY: every buffer is at least as long as the kernel indexes for `p` (checked above).
    launched("pt_embedding_fwd", unsafe {
        b.launch(grid_stride(gpu, rows * d))
    })
}

/// Buffers of [`add_norm_forward`].
pub struct NormFwdBufs<'a> {
    /// Residual stream `[rows, d]` fp32, updated in place when `y` is given.
    pub x: &'a mut CudaSlice<f32>,
    /// Branch output to add first `[rows, d]`, and its bias `[d]`.
    pub y: Option<&'a CudaSlice<f16>>,
    pub y_bias: Option<&'a CudaSlice<f16>>,
    pub w: &'a CudaSlice<f16>,
    pub b: Option<&'a CudaSlice<f16>>,
    /// fp16 copy of the (updated) residual for the backward.
    pub x_save: Option<&'a mut CudaSlice<f16>>,
    /// Norm output `[rows, d]`.
    pub h: &'a mut CudaSlice<f16>,
    /// `[rows]` (LayerNorm).
    pub mean: Option<&'a mut CudaSlice<f32>>,
    /// `[rows]`.
    pub rstd: &'a mut CudaSlice<f32>,
}

/// Residual add + LayerNorm/RMSNorm forward (see `pt_add_norm_fwd` in the ABI header).
pub fn add_norm_forward(gpu: &GpuContext, p: &pt_norm_params, bufs: NormFwdBufs<'_>) -> Result<()> {
    let (rows, d) = (p.rows as usize, p.d as usize);
    check_len("x", bufs.x.len(), rows * d)?;
    if let Some(y) = bufs.y {
        check_len("y", y.len(), rows * d)?;
    }
    if bufs.y_bias.is_some() && bufs.y.is_none() {
        // The kernel would ignore it: refused.
        bail!("a bias without a branch output");
    }
    if let Some(yb) = bufs.y_bias {
        check_len("y_bias", yb.len(), d)?;
    }
    check_len("w", bufs.w.len(), d)?;
    if let Some(b) = bufs.b {
        check_len("b", b.len(), d)?;
    }
    if let Some(xs) = &bufs.x_save {
        check_len("x_save", xs.len(), rows * d)?;
    }
    check_len("h", bufs.h.len(), rows * d)?;
    if let Some(m) = &bufs.mean {
        check_len("mean", m.len(), rows)?;
    }
    check_len("rstd", bufs.rstd.len(), rows)?;
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function("norm", "pt_add_norm_fwd")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(p).arg(bufs.x);
    opt_arg(&mut b, bufs.y);
    opt_arg(&mut b, bufs.y_bias);
    b.arg(bufs.w);
    opt_arg(&mut b, bufs.b);
    opt_arg_mut(&mut b, bufs.x_save);
    b.arg(bufs.h);
    opt_arg_mut(&mut b, bufs.mean);
    b.arg(bufs.rstd);
    // SAFETY: buffer lengths checked against `p` above.
    launched("pt_add_norm_fwd", unsafe { b.launch(norm_launch(rows)) })
}

/// Norm backward to the input, into the fp32 residual gradient `dx` (added when
/// `p.accumulate`), with an fp16 copy in `dx16`.
#[allow(clippy::too_many_arguments)]
pub fn norm_backward(
    gpu: &GpuContext,
    p: &pt_norm_params,
    dy: &CudaSlice<f16>,
    x: &CudaSlice<f16>,
    w: &CudaSlice<f16>,
    mean: Option<&CudaSlice<f32>>,
    rstd: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
    dx16: Option<&mut CudaSlice<f16>>,
) -> Result<()> {
    let (rows, d) = (p.rows as usize, p.d as usize);
    check_len("dy", dy.len(), rows * d)?;
    check_len("x", x.len(), rows * d)?;
    check_len("w", w.len(), d)?;
    match mean {
        Some(m) => check_len("mean", m.len(), rows)?,
        None if p.kind == PT_NORM_LAYER as i32 => bail!("LayerNorm backward needs the row means"),
        None => {}
    }
    check_len("rstd", rstd.len(), rows)?;
    check_len("dx", dx.len(), rows * d)?;
    if let Some(h) = &dx16 {
        check_len("dx16", h.len(), rows * d)?;
    }
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function("norm", "pt_norm_bwd")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(p).arg(dy).arg(x).arg(w);
    opt_arg(&mut b, mean);
    b.arg(rstd).arg(dx);
    opt_arg_mut(&mut b, dx16);
    // SAFETY: buffer lengths checked against `p` above.
    launched("pt_norm_bwd", unsafe { b.launch(norm_launch(rows)) })
}

/// `a += bias` (written back), `out = gelu_tanh(a)` over `[rows, width]`.
pub fn gelu_forward(
    gpu: &GpuContext,
    p: &pt_act_params,
    a: &mut CudaSlice<f16>,
    bias: Option<&CudaSlice<f16>>,
    out: &mut CudaSlice<f16>,
) -> Result<()> {
    let n = p.rows as usize * p.width as usize;
    check_len("a", a.len(), n)?;
    if let Some(bias) = bias {
        check_len("bias", bias.len(), p.width as usize)?;
    }
    check_len("out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("activation", "pt_gelu_fwd")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(p).arg(a);
    opt_arg(&mut b, bias);
    b.arg(out);
    // SAFETY: lengths checked above.
    launched("pt_gelu_fwd", unsafe { b.launch(grid_stride(gpu, n)) })
}

/// `da = dy · gelu_tanh'(a)`.
pub fn gelu_backward(
    gpu: &GpuContext,
    p: &pt_act_params,
    dy: &CudaSlice<f16>,
    a: &CudaSlice<f16>,
    da: &mut CudaSlice<f16>,
) -> Result<()> {
    let n = p.rows as usize * p.width as usize;
    check_len("dy", dy.len(), n)?;
    check_len("a", a.len(), n)?;
    check_len("da", da.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("activation", "pt_gelu_bwd")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(p).arg(dy).arg(a).arg(da);
    // SAFETY: lengths checked above.
    launched("pt_gelu_bwd", unsafe { b.launch(grid_stride(gpu, n)) })
}

/// `out = silu(gate) · up` from the fused `[rows, 2·width]` (gate | up) projection.
pub fn swiglu_forward(
    gpu: &GpuContext,
    p: &pt_act_params,
    gu: &CudaSlice<f16>,
    out: &mut CudaSlice<f16>,
) -> Result<()> {
    let n = p.rows as usize * p.width as usize;
    check_len("gu", gu.len(), 2 * n)?;
    check_len("out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("activation", "pt_swiglu_fwd")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(p).arg(gu).arg(out);
    // SAFETY: lengths checked above.
    launched("pt_swiglu_fwd", unsafe { b.launch(grid_stride(gpu, n)) })
}

/// SwiGLU backward into the fused `[rows, 2·width]` (d_gate | d_up) layout.
pub fn swiglu_backward(
    gpu: &GpuContext,
    p: &pt_act_params,
    dy: &CudaSlice<f16>,
    gu: &CudaSlice<f16>,
    dgu: &mut CudaSlice<f16>,
) -> Result<()> {
    let n = p.rows as usize * p.width as usize;
    check_len("dy", dy.len(), n)?;
    check_len("gu", gu.len(), 2 * n)?;
    check_len("dgu", dgu.len(), 2 * n)?;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("activation", "pt_swiglu_bwd")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(p).arg(dy).arg(gu).arg(dgu);
    // SAFETY: lengths checked above.
    launched("pt_swiglu_bwd", unsafe { b.launch(grid_stride(gpu, n)) })
}

/// RoPE tables and per-sequence position offsets of a layout change (`None` without RoPE).
pub struct RopeArgs<'a> {
    pub pos_offset: &'a CudaSlice<i32>,
    /// `[n_positions, D/2]` each.
    pub cos: &'a CudaSlice<f32>,
    pub sin: &'a CudaSlice<f32>,
}

fn check_rope(p: &pt_heads_params, rope: &Option<RopeArgs<'_>>) -> Result<()> {
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

fn push_rope<'a>(b: &mut LaunchArgs<'a>, rope: &Option<RopeArgs<'a>>) {
    match rope {
        Some(r) => {
            b.arg(r.pos_offset).arg(r.cos).arg(r.sin);
        }
        None => {
            b.arg(&NULL).arg(&NULL).arg(&NULL);
        }
    }
}

/// Rows → `[B, H, T, D]` (+ bias, + RoPE).
pub fn rows_to_heads<'a>(
    gpu: &GpuContext,
    p: &pt_heads_params,
    src: &'a CudaSlice<f16>,
    bias: Option<&'a CudaSlice<f16>>,
    rope: Option<RopeArgs<'a>>,
    dst: &'a mut CudaSlice<f16>,
) -> Result<()> {
    check_len("src", src.len(), sizes::heads_rows(p))?;
    if let Some(bias) = bias {
        check_len("bias", bias.len(), (p.heads * p.head_dim) as usize)?;
    }
    check_rope(p, &rope)?;
    check_len("dst", dst.len(), sizes::heads(p))?;
    let n = sizes::heads(p) / 2;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("rope", "pt_rows_to_heads")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(p).arg(src);
    opt_arg(&mut b, bias);
    push_rope(&mut b, &rope);
    b.arg(dst);
    // SAFETY: lengths checked above; positions are checked in-kernel against n_positions.
    launched("pt_rows_to_heads", unsafe { b.launch(grid_stride(gpu, n)) })
}

/// `[B, H, T, D]` → rows (with the inverse RoPE rotation when `p.rope`).
pub fn heads_to_rows<'a>(
    gpu: &GpuContext,
    p: &pt_heads_params,
    src: &'a CudaSlice<f16>,
    rope: Option<RopeArgs<'a>>,
    dst: &'a mut CudaSlice<f16>,
) -> Result<()> {
    check_len("src", src.len(), sizes::heads(p))?;
    check_rope(p, &rope)?;
    check_len("dst", dst.len(), sizes::heads_rows(p))?;
    let n = sizes::heads(p) / 2;
    if n == 0 {
        return Ok(());
    }
    let f = gpu.function("rope", "pt_heads_to_rows")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(p).arg(src);
    push_rope(&mut b, &rope);
    b.arg(dst);
    // SAFETY: lengths checked above.
    launched("pt_heads_to_rows", unsafe { b.launch(grid_stride(gpu, n)) })
}

/// `dst[i] = src[index[i]]` for `p.n` rows of `p.d` (the caller checks `index` < rows of src).
pub fn gather_rows(
    gpu: &GpuContext,
    p: &pt_rows_params,
    src_rows: usize,
    src: &CudaSlice<f16>,
    index: &CudaSlice<i32>,
    dst: &mut CudaSlice<f16>,
) -> Result<()> {
    let (n, d) = (p.n as usize, p.d as usize);
    check_len("src", src.len(), src_rows * d)?;
    check_len("index", index.len(), n)?;
    check_len("dst", dst.len(), n * d)?;
    if n * d == 0 {
        return Ok(());
    }
    let f = gpu.function("cross_entropy", "pt_gather_rows")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(p).arg(src).arg(index).arg(dst);
    // SAFETY: lengths checked; the caller guarantees every index < src_rows.
    launched("pt_gather_rows", unsafe {
        b.launch(grid_stride(gpu, n * d))
    })
}

/// `dst[index[i]] = src[i]` (the caller checks `index` < rows of dst, distinct).
pub fn scatter_rows(
    gpu: &GpuContext,
    p: &pt_rows_params,
    dst_rows: usize,
    src: &CudaSlice<f16>,
    index: &CudaSlice<i32>,
    dst: &mut CudaSlice<f16>,
) -> Result<()> {
    let (n, d) = (p.n as usize, p.d as usize);
    check_len("src", src.len(), n * d)?;
    check_len("index", index.len(), n)?;
    check_len("dst", dst.len(), dst_rows * d)?;
    if n * d == 0 {
        return Ok(());
    }
    let f = gpu.function("cross_entropy", "pt_scatter_rows")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(p).arg(src).arg(index).arg(dst);
    // SAFETY: lengths checked; the caller guarantees every index < dst_rows.
    launched("pt_scatter_rows", unsafe {
        b.launch(grid_stride(gpu, n * d))
    })
}

/// Per-row cross-entropy into `loss[..rows]`; with `p.write_grad` the logits become their
/// gradient. `targets[r] < 0` marks a row without a target.
pub fn cross_entropy(
    gpu: &GpuContext,
    p: &pt_ce_params,
    logits: &mut CudaSlice<f16>,
    targets: &CudaSlice<i32>,
    loss: &mut CudaSlice<f32>,
) -> Result<()> {
    let (rows, vocab) = (p.rows as usize, p.vocab as usize);
    check_len("logits", logits.len(), rows * vocab)?;
    check_len("targets", targets.len(), rows)?;
    check_len("loss", loss.len(), rows)?;
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function("cross_entropy", "pt_cross_entropy")?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(p).arg(logits).arg(targets).arg(loss);
    // SAFETY: lengths checked above; targets out of range are handled in-kernel.
    launched("pt_cross_entropy", unsafe { b.launch(ce_launch(rows)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_launch_gives_every_row_one_warp() {
        // The kernels' mapping (norm.cu): row = blockIdx.x * PT_NORM_ROWS_PER_BLOCK + warp.
        assert_eq!(PT_NORM_THREADS, 32 * PT_NORM_ROWS_PER_BLOCK);
        for rows in [1usize, 3, 4, 5, 127, 128, 1000] {
            let c = norm_launch(rows);
            assert_eq!(c.block_dim, (PT_NORM_THREADS, 1, 1));
            assert_eq!(c.shared_mem_bytes, 0);
            let mut seen = vec![0; rows];
            for bx in 0..c.grid_dim.0 as usize {
                let mut any = false;
                for warp in 0..(c.block_dim.0 / 32) as usize {
                    let row = bx * PT_NORM_ROWS_PER_BLOCK as usize + warp;
                    if row < rows {
                        seen[row] += 1;
                        any = true;
                    }
                }
                assert!(any, "rows {rows}: block {bx} has no row");
            }
            assert!(seen.iter().all(|&n| n == 1), "rows {rows}: {seen:?}");
        }
    }

    #[test]
    fn cross_entropy_launch_has_the_block_reductions_scratch() {
        let c = ce_launch(7);
        assert_eq!(c.grid_dim, (7, 1, 1));
        // block_lse (model_ops.cuh) keeps a max and a sum per warp: 2 x 32 floats, for a block
        // of whole warps, at most 32 of them.
        assert!(c.shared_mem_bytes as usize >= 2 * 32 * std::mem::size_of::<f32>());
        assert_eq!(c.block_dim.0 % 32, 0);
        assert!(c.block_dim.0 <= 1024);
    }
}
