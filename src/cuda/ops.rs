//! Typed launch wrappers for the element-wise kernels: precision conversion (kernels/convert.cu),
//! optimizer steps and the sum-of-squares reduction (kernels/optim.cu). Each checks lengths,
//! fills the ABI struct (scalars computed in f64 like `crate::optim`) and picks a grid-stride
//! launch; errors come back as `Err`, never panics. Launches are asynchronous on the context's
//! stream.

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use half::f16;

use super::abi::{
    pt_adamw_params, pt_axpy_params, pt_clip_params, pt_convert_params, pt_reduce_params,
    pt_sgd_params, PT_REDUCE_MAX_BLOCKS, PT_REDUCE_SMEM, PT_REDUCE_THREADS,
};
use super::context::{launched, GpuContext};
use crate::optim::{AdamWConfig, SgdConfig};

/// Threads per block of the element-wise kernels.
const THREADS: u32 = 256;
/// Resident blocks per SM aimed at by grid-stride launches.
const BLOCKS_PER_SM: u32 = 8;

/// A grid-stride launch over `work` items: enough blocks to cover them, at most a few per SM.
fn grid_stride(gpu: &GpuContext, work: usize) -> LaunchConfig {
    let wanted = work.div_ceil(THREADS as usize).max(1);
    let cap = (gpu.sm_count() * BLOCKS_PER_SM) as usize;
    LaunchConfig {
        grid_dim: (wanted.min(cap) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check_len(what: &str, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        bail!("{what}: expected {expected} elements, got {got}");
    }
    Ok(())
}

/// `y = fp16(x)`, round to nearest even (overflow to ±inf).
pub fn convert_f32_to_f16(
    gpu: &GpuContext,
    x: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f16>,
) -> Result<()> {
    check_len("convert_f32_to_f16 output", x.len(), y.len())?;
    if x.is_empty() {
        return Ok(());
    }
    let f = gpu.function("convert", "pt_f32_to_f16")?;
    let p = pt_convert_params {
        n: x.len() as i64,
        scale: 1.0,
    };
    let cfg = grid_stride(gpu, x.len().div_ceil(4));
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&p).arg(x).arg(y);
    // SAFETY: the kernel reads p.n floats from x and writes p.n halves to y; both hold p.n.
    launched("pt_f32_to_f16", unsafe { b.launch(cfg) })
}

/// `y = f32(x) * scale` (`scale` 1: exact widening).
pub fn convert_f16_to_f32(
    gpu: &GpuContext,
    x: &CudaView<'_, f16>,
    y: &mut CudaViewMut<'_, f32>,
    scale: f32,
) -> Result<()> {
    check_len("convert_f16_to_f32 output", x.len(), y.len())?;
    if x.is_empty() {
        return Ok(());
    }
    let name = if scale == 1.0 {
        "pt_f16_to_f32"
    } else {
        "pt_f16_to_f32_scaled"
    };
    let f = gpu.function("convert", name)?;
    let p = pt_convert_params {
        n: x.len() as i64,
        scale,
    };
    let cfg = grid_stride(gpu, x.len().div_ceil(4));
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&p).arg(x).arg(y);
    // SAFETY: the kernel reads p.n halves from x and writes p.n floats to y; both hold p.n.
    launched(name, unsafe { b.launch(cfg) })
}

/// The scalars of AdamW update number `step` (1-based) with learning rate `lr`, computed in f64
/// and rounded once, exactly as `crate::optim::AdamW::step` does.
pub fn adamw_params(
    config: &AdamWConfig,
    step: u64,
    lr: f64,
    grad_scale: f32,
    n: usize,
) -> Result<pt_adamw_params> {
    if step == 0 {
        bail!("AdamW step numbers start at 1");
    }
    let t = step as f64;
    let bc1 = 1.0 - config.beta1.powf(t);
    let bc2_sqrt = (1.0 - config.beta2.powf(t)).sqrt();
    Ok(pt_adamw_params {
        n: n as i64,
        decay: (1.0 - lr * config.weight_decay) as f32,
        one_minus_beta1: (1.0 - config.beta1) as f32,
        beta2: config.beta2 as f32,
        one_minus_beta2: (1.0 - config.beta2) as f32,
        eps: config.eps as f32,
        step_size: (lr / bc1) as f32,
        bias_correction2_sqrt: bc2_sqrt as f32,
        grad_scale,
    })
}

/// The parameters of the SGD kernels for step `step` (1-based) of `n` elements, after checking
/// the lengths: `grad_len` and, with momentum, `momentum_len` must be `n` (`what` names the
/// call in errors).
#[allow(clippy::too_many_arguments)]
fn sgd_params(
    what: &str,
    config: &SgdConfig,
    step: u64,
    lr: f64,
    grad_scale: f32,
    n: usize,
    grad_len: usize,
    momentum_len: Option<usize>,
) -> Result<pt_sgd_params> {
    if step == 0 {
        bail!("SGD step numbers start at 1");
    }
    check_len(&format!("{what} grad"), n, grad_len)?;
    if config.momentum != 0.0 {
        match momentum_len {
            Some(len) => check_len(&format!("{what} momentum buffer"), n, len)?,
            None => bail!(
                "{what}: momentum {} needs a momentum buffer",
                config.momentum
            ),
        }
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

/// One AdamW update (number `step`, 1-based) of fp32 `param` from `grad * grad_scale`, updating
/// the moments `m`, `v`; with `param_f16` also writes the updated weights rounded to fp16.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    gpu: &GpuContext,
    config: &AdamWConfig,
    step: u64,
    lr: f64,
    grad_scale: f32,
    param: &mut CudaViewMut<'_, f32>,
    grad: &CudaView<'_, f32>,
    m: &mut CudaViewMut<'_, f32>,
    v: &mut CudaViewMut<'_, f32>,
    param_f16: Option<&mut CudaViewMut<'_, f16>>,
) -> Result<()> {
    let n = param.len();
    check_len("adamw_step grad", n, grad.len())?;
    check_len("adamw_step m", n, m.len())?;
    check_len("adamw_step v", n, v.len())?;
    if let Some(h) = &param_f16 {
        check_len("adamw_step fp16 copy", n, h.len())?;
    }
    let p = adamw_params(config, step, lr, grad_scale, n)?;
    if n == 0 {
        return Ok(());
    }
    let name = if param_f16.is_some() {
        "pt_adamw_step_f16"
    } else {
        "pt_adamw_step"
    };
    let f = gpu.function("optim", name)?;
    let cfg = grid_stride(gpu, n);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&p).arg(param).arg(grad).arg(m).arg(v);
    if let Some(h) = param_f16 {
        b.arg(h);
    }
    // SAFETY: every buffer holds p.n elements of the type the kernel expects.
    launched(name, unsafe { b.launch(cfg) })
}

/// One SGD update (number `step`, 1-based) of `param` from `grad * grad_scale`, like
/// `crate::optim::Sgd::step`. `momentum_buf` is required when `config.momentum != 0` (its
/// contents are ignored on step 1); with `param_f16` also writes the updated weights as fp16.
#[allow(clippy::too_many_arguments)]
pub fn sgd_step(
    gpu: &GpuContext,
    config: &SgdConfig,
    step: u64,
    lr: f64,
    grad_scale: f32,
    param: &mut CudaViewMut<'_, f32>,
    grad: &CudaView<'_, f32>,
    momentum_buf: Option<&mut CudaViewMut<'_, f32>>,
    param_f16: Option<&mut CudaViewMut<'_, f16>>,
) -> Result<()> {
    let n = param.len();
    let use_momentum = config.momentum != 0.0;
    let p = sgd_params(
        "sgd_step",
        config,
        step,
        lr,
        grad_scale,
        n,
        grad.len(),
        momentum_buf.as_ref().map(|b| b.len()),
    )?;
    if let Some(h) = &param_f16 {
        check_len("sgd_step fp16 copy", n, h.len())?;
    }
    if n == 0 {
        return Ok(());
    }
    let name = match (use_momentum, param_f16.is_some()) {
        (false, false) => "pt_sgd_step",
        (false, true) => "pt_sgd_step_f16",
        (true, false) => "pt_sgd_momentum_step",
        (true, true) => "pt_sgd_momentum_step_f16",
    };
    let f = gpu.function("optim", name)?;
    let cfg = grid_stride(gpu, n);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&p).arg(param).arg(grad);
    if use_momentum {
        if let Some(buf) = momentum_buf {
            b.arg(buf);
        }
    }
    if let Some(h) = param_f16 {
        b.arg(h);
    }
    // SAFETY: every buffer holds p.n elements of the type the kernel expects.
    launched(name, unsafe { b.launch(cfg) })
}

/// The clipping of a `*_clipped` optimizer kernel: the gradient's sum of squares `sum_sq[0]`
/// as stored (loss-scaled) on the device, and `max_grad_norm` (0: off). The kernel unscales by
/// the update's `grad_scale`, clips like `clip_grad_norm_` and skips the update when the norm
/// is not finite (kernels/abi/optim.h).
pub struct DeviceClip<'a, 'b> {
    pub sum_sq: &'a CudaView<'b, f32>,
    pub max_grad_norm: f64,
}

fn clip_params(clip: &DeviceClip<'_, '_>) -> Result<pt_clip_params> {
    if clip.sum_sq.is_empty() {
        bail!("device clipping: the sum-of-squares buffer is empty");
    }
    if clip.max_grad_norm.is_nan() || clip.max_grad_norm < 0.0 {
        bail!(
            "device clipping: max_grad_norm {} is not a norm (0: off)",
            clip.max_grad_norm
        );
    }
    Ok(pt_clip_params {
        max_norm: clip.max_grad_norm as f32,
    })
}

/// [`adamw_step`] with the clipping factor computed on the device ([`DeviceClip`]): nothing is
/// written when the gradient norm is not finite.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_clipped(
    gpu: &GpuContext,
    config: &AdamWConfig,
    step: u64,
    lr: f64,
    unscale: f32,
    clip: &DeviceClip<'_, '_>,
    param: &mut CudaViewMut<'_, f32>,
    grad: &CudaView<'_, f32>,
    m: &mut CudaViewMut<'_, f32>,
    v: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let n = param.len();
    check_len("adamw_step_clipped grad", n, grad.len())?;
    check_len("adamw_step_clipped m", n, m.len())?;
    check_len("adamw_step_clipped v", n, v.len())?;
    let p = adamw_params(config, step, lr, unscale, n)?;
    let c = clip_params(clip)?;
    if n == 0 {
        return Ok(());
    }
    let name = "pt_adamw_step_clipped";
    let f = gpu.function("optim", name)?;
    let cfg = grid_stride(gpu, n);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&p)
        .arg(&c)
        .arg(clip.sum_sq)
        .arg(param)
        .arg(grad)
        .arg(m)
        .arg(v);
    // SAFETY: every buffer holds p.n elements of the type the kernel expects; sum_sq holds one.
    launched(name, unsafe { b.launch(cfg) })
}

/// [`sgd_step`] with the clipping factor computed on the device ([`DeviceClip`]).
#[allow(clippy::too_many_arguments)]
pub fn sgd_step_clipped(
    gpu: &GpuContext,
    config: &SgdConfig,
    step: u64,
    lr: f64,
    unscale: f32,
    clip: &DeviceClip<'_, '_>,
    param: &mut CudaViewMut<'_, f32>,
    grad: &CudaView<'_, f32>,
    momentum_buf: Option<&mut CudaViewMut<'_, f32>>,
) -> Result<()> {
    let n = param.len();
    let use_momentum = config.momentum != 0.0;
    let p = sgd_params(
        "sgd_step_clipped",
        config,
        step,
        lr,
        unscale,
        n,
        grad.len(),
        momentum_buf.as_ref().map(|b| b.len()),
    )?;
    let c = clip_params(clip)?;
    if n == 0 {
        return Ok(());
    }
    let name = if use_momentum {
        "pt_sgd_momentum_step_clipped"
    } else {
        "pt_sgd_step_clipped"
    };
    let f = gpu.function("optim", name)?;
    let cfg = grid_stride(gpu, n);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&p).arg(&c).arg(clip.sum_sq).arg(param).arg(grad);
    if use_momentum {
        if let Some(buf) = momentum_buf {
            b.arg(buf);
        }
    }
    // SAFETY: every buffer holds p.n elements of the type the kernel expects; sum_sq holds one.
    launched(name, unsafe { b.launch(cfg) })
}

/// `y += alpha · x` over fp32 buffers of one length.
pub fn axpy(
    gpu: &GpuContext,
    alpha: f32,
    x: &CudaView<'_, f32>,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    check_len("axpy output", x.len(), y.len())?;
    if x.is_empty() {
        return Ok(());
    }
    let p = pt_axpy_params {
        n: x.len() as i64,
        alpha,
    };
    let f = gpu.function("optim", "pt_axpy")?;
    let cfg = grid_stride(gpu, x.len());
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&p).arg(x).arg(y);
    // SAFETY: the kernel reads and writes p.n floats of x and y; both hold p.n.
    launched("pt_axpy", unsafe { b.launch(cfg) })
}

/// Reduction partials [`sum_squares_with`] needs for `n` inputs.
pub fn sum_squares_partials(n: usize) -> usize {
    n.div_ceil(PT_REDUCE_THREADS as usize)
        .clamp(1, PT_REDUCE_MAX_BLOCKS as usize)
}

/// `out[0] = Σ x²` (or `out[0] += Σ x²` with `accumulate`), fp32, deterministic (fixed grid and
/// reduction order). Several calls with `accumulate` give the squared global norm of many tensors.
pub fn sum_squares(
    gpu: &GpuContext,
    x: &CudaView<'_, f32>,
    out: &mut CudaViewMut<'_, f32>,
    accumulate: bool,
) -> Result<()> {
    let blocks = sum_squares_partials(x.len());
    // SAFETY: stage 1 writes every one of the `blocks` partials before stage 2 reads them.
    let mut partials = unsafe { gpu.stream().alloc::<f32>(blocks) }
        .map_err(|e| anyhow!("allocating {blocks} reduction partials: {e:?}"))?;
    sum_squares_with(gpu, x, &mut partials.as_view_mut(), out, accumulate)
}

/// [`sum_squares`] with its partials in `partials` (at least [`sum_squares_partials`]`(x.len())`
/// elements), so that nothing is allocated.
pub fn sum_squares_with(
    gpu: &GpuContext,
    x: &CudaView<'_, f32>,
    partials: &mut CudaViewMut<'_, f32>,
    out: &mut CudaViewMut<'_, f32>,
    accumulate: bool,
) -> Result<()> {
    if out.is_empty() {
        bail!("sum_squares: the output buffer is empty");
    }
    let blocks = sum_squares_partials(x.len());
    if partials.len() < blocks {
        bail!(
            "sum_squares: {} partials for {blocks} blocks",
            partials.len()
        );
    }
    let stream = gpu.stream();
    let stage1 = gpu.function("optim", "pt_sum_squares_partial")?;
    let stage2 = gpu.function("optim", "pt_sum_squares_finish")?;
    let p1 = pt_reduce_params {
        n: x.len() as i64,
        accumulate: 0,
    };
    let p2 = pt_reduce_params {
        n: blocks as i64,
        accumulate: accumulate as i32,
    };
    let cfg1 = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (PT_REDUCE_THREADS, 1, 1),
        shared_mem_bytes: PT_REDUCE_SMEM,
    };
    let cfg2 = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (PT_REDUCE_THREADS, 1, 1),
        shared_mem_bytes: PT_REDUCE_SMEM,
    };
    let mut b1 = stream.launch_builder(&stage1);
    b1.arg(&p1).arg(x).arg(&mut *partials);
    // SAFETY: reads p1.n floats of x, writes `blocks` partials (grid size; partials holds them).
    launched("pt_sum_squares_partial", unsafe { b1.launch(cfg1) })?;
    let mut b2 = stream.launch_builder(&stage2);
    // (stage 2 only reads the partials)
    b2.arg(&p2).arg(&mut *partials).arg(out);
    // SAFETY: reads p2.n = blocks partials, writes out[0] (out is non-empty).
    launched("pt_sum_squares_finish", unsafe { b2.launch(cfg2) })
}

/// Σ x² copied back to the host (synchronises the stream).
pub fn sum_squares_host(gpu: &GpuContext, x: &CudaView<'_, f32>) -> Result<f32> {
    let stream = gpu.stream();
    let mut out = stream
        .alloc_zeros::<f32>(1)
        .map_err(|e| anyhow!("allocating the reduction output: {e:?}"))?;
    sum_squares(gpu, x, &mut out.as_view_mut(), false)?;
    let host = stream
        .clone_dtoh(&out)
        .map_err(|e| anyhow!("copying the reduction result: {e:?}"))?;
    Ok(host[0])
}
