//! The layers of the frozen transformers (GPT-2 and Llama), one function per forward and backward.
//!
//! Activations are row-major `[rows, features]`, one row per token (rows = B·T). Attention-side
//! tensors are `[B, H, T, D]`. Every backward returns the gradient with respect to the layer's
//! *input* only (the weights are frozen; prefix tuning never needs weight gradients). Matrix
//! products go through [`matmul`]; row-wise work runs on rayon.
//!
//! The two blocks at the bottom ([`attention_block_forward`], [`mlp_block_forward`] and their
//! backwards) compose the layers into one pre-norm transformer sub-block each, residual included.

use rayon::prelude::*;

use super::attention::{self, AttnInputs, AttnShape};
use super::real::{matmul, Real, Trans};
use crate::model::config::{Arch, LayerWeights, ModelConfig};

/// Rows per rayon task for row-wise work of the given width: enough to amortise scheduling.
fn min_rows(width: usize) -> usize {
    (8192 / width.max(1)).max(1)
}

/// Elements per rayon task for element-wise work.
const MIN_ELEMS: usize = 8192;

// ---------------------------------------------------------------------------------------------
// Linear
// ---------------------------------------------------------------------------------------------

/// `y = x·Wᵀ + b`: `x [rows, d_in]`, `W [d_out, d_in]`, `b [d_out]` → `y [rows, d_out]`.
pub fn linear_forward<T: Real>(
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    d_in: usize,
    d_out: usize,
) -> Vec<T> {
    assert_eq!(
        w.len(),
        d_out * d_in,
        "linear: weight is not [{d_out}, {d_in}]"
    );
    assert_eq!(
        x.len() % d_in.max(1),
        0,
        "linear: input is not [rows, {d_in}]"
    );
    let rows = x.len().checked_div(d_in).unwrap_or(0);
    let mut y = vec![T::zero(); rows * d_out];
    match b {
        Some(b) => {
            assert_eq!(b.len(), d_out, "linear: bias is not [{d_out}]");
            y.par_chunks_mut(d_out.max(1))
                .with_min_len(min_rows(d_out))
                .for_each(|r| r.copy_from_slice(b));
            matmul(rows, d_out, d_in, x, Trans::No, w, Trans::Yes, &mut y, true);
        }
        None => matmul(
            rows,
            d_out,
            d_in,
            x,
            Trans::No,
            w,
            Trans::Yes,
            &mut y,
            false,
        ),
    }
    y
}

/// `dx = dy·W`: `dy [rows, d_out]`, `W [d_out, d_in]` → `dx [rows, d_in]`.
pub fn linear_backward<T: Real>(dy: &[T], w: &[T], d_in: usize, d_out: usize) -> Vec<T> {
    let rows = dy.len().checked_div(d_out).unwrap_or(0);
    let mut dx = vec![T::zero(); rows * d_in];
    linear_backward_into(dy, w, d_in, d_out, &mut dx, false);
    dx
}

/// `dx (+)= dy·W` into an existing buffer (`accumulate` adds instead of overwriting).
pub fn linear_backward_into<T: Real>(
    dy: &[T],
    w: &[T],
    d_in: usize,
    d_out: usize,
    dx: &mut [T],
    accumulate: bool,
) {
    assert_eq!(
        w.len(),
        d_out * d_in,
        "linear: weight is not [{d_out}, {d_in}]"
    );
    assert_eq!(
        dy.len() % d_out.max(1),
        0,
        "linear: dy is not [rows, {d_out}]"
    );
    let rows = dy.len().checked_div(d_out).unwrap_or(0);
    assert_eq!(dx.len(), rows * d_in, "linear: dx is not [{rows}, {d_in}]");
    matmul(
        rows,
        d_in,
        d_out,
        dy,
        Trans::No,
        w,
        Trans::No,
        dx,
        accumulate,
    );
}

// ---------------------------------------------------------------------------------------------
// Embeddings
// ---------------------------------------------------------------------------------------------

/// Token embedding lookup, plus learned position embeddings (GPT-2) when given:
/// `x[r] = E[tokens[r]] + P[positions[r]]`. `tok_emb [vocab, d]`, `pos_emb [n_pos, d]`.
pub fn embedding_forward<T: Real>(
    tokens: &[u32],
    tok_emb: &[T],
    d: usize,
    pos: Option<(&[T], &[usize])>,
) -> Vec<T> {
    let vocab = tok_emb.len() / d.max(1);
    if let Some((table, positions)) = pos {
        assert_eq!(
            positions.len(),
            tokens.len(),
            "embedding: one position per token"
        );
        let n_pos = table.len() / d.max(1);
        if let Some(&p) = positions.iter().find(|&&p| p >= n_pos) {
            panic!("embedding: position {p} is outside the table of {n_pos} positions");
        }
    }
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
        panic!("embedding: token id {t} is outside the vocabulary of {vocab}");
    }
    let mut x = vec![T::zero(); tokens.len() * d];
    x.par_chunks_mut(d.max(1))
        .with_min_len(min_rows(d))
        .enumerate()
        .for_each(|(r, xr)| {
            let t = tokens[r] as usize;
            xr.copy_from_slice(&tok_emb[t * d..(t + 1) * d]);
            if let Some((table, positions)) = pos {
                let p = positions[r];
                xr.iter_mut()
                    .zip(&table[p * d..(p + 1) * d])
                    .for_each(|(x, &e)| *x += e);
            }
        });
    x
}

// ---------------------------------------------------------------------------------------------
// Normalisation
// ---------------------------------------------------------------------------------------------

/// Per-row statistics a normalisation's backward needs.
#[derive(Clone, Debug, PartialEq)]
pub struct NormStats<T> {
    /// Row means (LayerNorm only; empty for RMSNorm).
    pub mean: Vec<T>,
    /// Row reciprocal standard deviations `1/sqrt(var + eps)` (RMSNorm: `1/sqrt(mean(x²) + eps)`).
    pub rstd: Vec<T>,
}

fn rows_of(len: usize, d: usize, what: &str) -> usize {
    assert!(
        d > 0 && len % d == 0,
        "{what}: {len} elements are not rows of {d}"
    );
    len / d
}

/// LayerNorm: `y = (x − μ)·rstd·w + b`, `rstd = 1/sqrt(var(x) + eps)` per row.
pub fn layer_norm_forward<T: Real>(
    x: &[T],
    w: &[T],
    b: &[T],
    d: usize,
    eps: f64,
) -> (Vec<T>, NormStats<T>) {
    let rows = rows_of(x.len(), d, "layer_norm");
    assert!(
        w.len() == d && b.len() == d,
        "layer_norm: weight/bias are not [{d}]"
    );
    let inv_d = T::of(1.0 / d as f64);
    let mut y = vec![T::zero(); x.len()];
    let mut mean = vec![T::zero(); rows];
    let mut rstd = vec![T::zero(); rows];
    y.par_chunks_mut(d)
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .with_min_len(min_rows(d))
        .enumerate()
        .for_each(|(r, (yr, (mu, rs)))| {
            let xr = &x[r * d..(r + 1) * d];
            let m = xr.iter().copied().sum::<T>() * inv_d;
            let var = xr.iter().map(|&v| (v - m) * (v - m)).sum::<T>() * inv_d;
            let s = (var + T::of(eps)).sqrt().recip();
            for i in 0..d {
                yr[i] = (xr[i] - m) * s * w[i] + b[i];
            }
            *mu = m;
            *rs = s;
        });
    (y, NormStats { mean, rstd })
}

/// LayerNorm backward: with `g = dy∘w` and `x̂ = (x − μ)·rstd`,
/// `dx = rstd·(g − mean(g) − x̂·mean(g∘x̂))`.
pub fn layer_norm_backward<T: Real>(
    dy: &[T],
    x: &[T],
    w: &[T],
    stats: &NormStats<T>,
    d: usize,
) -> Vec<T> {
    rows_of(x.len(), d, "layer_norm_backward");
    assert_eq!(
        dy.len(),
        x.len(),
        "layer_norm_backward: dy and x differ in size"
    );
    let inv_d = T::of(1.0 / d as f64);
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(d)
        .with_min_len(min_rows(d))
        .enumerate()
        .for_each(|(r, dxr)| {
            let (xr, dyr) = (&x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
            let (m, s) = (stats.mean[r], stats.rstd[r]);
            let mut mean_g = T::zero();
            let mut mean_gx = T::zero();
            for i in 0..d {
                let g = dyr[i] * w[i];
                mean_g += g;
                mean_gx += g * (xr[i] - m) * s;
            }
            mean_g *= inv_d;
            mean_gx *= inv_d;
            for i in 0..d {
                let xhat = (xr[i] - m) * s;
                dxr[i] = s * (dyr[i] * w[i] - mean_g - xhat * mean_gx);
            }
        });
    dx
}

/// RMSNorm (HF Llama): `y = x·rstd·w`, `rstd = 1/sqrt(mean(x²) + eps)` per row.
pub fn rms_norm_forward<T: Real>(x: &[T], w: &[T], d: usize, eps: f64) -> (Vec<T>, NormStats<T>) {
    let rows = rows_of(x.len(), d, "rms_norm");
    assert_eq!(w.len(), d, "rms_norm: weight is not [{d}]");
    let inv_d = T::of(1.0 / d as f64);
    let mut y = vec![T::zero(); x.len()];
    let mut rstd = vec![T::zero(); rows];
    y.par_chunks_mut(d)
        .zip(rstd.par_iter_mut())
        .with_min_len(min_rows(d))
        .enumerate()
        .for_each(|(r, (yr, rs))| {
            let xr = &x[r * d..(r + 1) * d];
            let ms = xr.iter().map(|&v| v * v).sum::<T>() * inv_d;
            let s = (ms + T::of(eps)).sqrt().recip();
            for i in 0..d {
                yr[i] = xr[i] * s * w[i];
            }
            *rs = s;
        });
    (
        y,
        NormStats {
            mean: Vec::new(),
            rstd,
        },
    )
}

/// RMSNorm backward: with `g = dy∘w`, `dx = rstd·(g − x·rstd²·mean(g∘x))`.
pub fn rms_norm_backward<T: Real>(
    dy: &[T],
    x: &[T],
    w: &[T],
    stats: &NormStats<T>,
    d: usize,
) -> Vec<T> {
    rows_of(x.len(), d, "rms_norm_backward");
    assert_eq!(
        dy.len(),
        x.len(),
        "rms_norm_backward: dy and x differ in size"
    );
    let inv_d = T::of(1.0 / d as f64);
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(d)
        .with_min_len(min_rows(d))
        .enumerate()
        .for_each(|(r, dxr)| {
            let (xr, dyr) = (&x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
            let s = stats.rstd[r];
            let mean_gx = (0..d).map(|i| dyr[i] * w[i] * xr[i]).sum::<T>() * inv_d;
            for i in 0..d {
                dxr[i] = s * (dyr[i] * w[i] - xr[i] * s * s * mean_gx);
            }
        });
    dx
}

/// The model family's normalisation: LayerNorm (GPT-2, needs `b`) or RMSNorm (Llama).
pub fn norm_forward<T: Real>(
    arch: Arch,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    d: usize,
    eps: f64,
) -> (Vec<T>, NormStats<T>) {
    match arch {
        Arch::Gpt2 => layer_norm_forward(x, w, b.expect("GPT-2 LayerNorm needs a bias"), d, eps),
        Arch::Llama => rms_norm_forward(x, w, d, eps),
    }
}

/// Backward of [`norm_forward`].
pub fn norm_backward<T: Real>(
    arch: Arch,
    dy: &[T],
    x: &[T],
    w: &[T],
    stats: &NormStats<T>,
    d: usize,
) -> Vec<T> {
    match arch {
        Arch::Gpt2 => layer_norm_backward(dy, x, w, stats, d),
        Arch::Llama => rms_norm_backward(dy, x, w, stats, d),
    }
}

// ---------------------------------------------------------------------------------------------
// Activations
// ---------------------------------------------------------------------------------------------

const GELU_C: f64 = 0.797_884_560_802_865_4; // sqrt(2/π)
const GELU_A: f64 = 0.044_715;

/// GELU, tanh approximation (GPT-2's `gelu_new`): `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub fn gelu_forward<T: Real>(a: &[T]) -> Vec<T> {
    let (c, k, half) = (T::of(GELU_C), T::of(GELU_A), T::of(0.5));
    a.par_iter()
        .with_min_len(MIN_ELEMS)
        .map(|&x| half * x * (T::one() + (c * (x + k * x * x * x)).tanh()))
        .collect()
}

/// GELU-tanh backward: `da = dy·(0.5·(1 + t) + 0.5·x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²))`,
/// `t = tanh(√(2/π)·(x + 0.044715·x³))`.
pub fn gelu_backward<T: Real>(dy: &[T], a: &[T]) -> Vec<T> {
    assert_eq!(dy.len(), a.len(), "gelu_backward: dy and a differ in size");
    let (c, k, half, three) = (T::of(GELU_C), T::of(GELU_A), T::of(0.5), T::of(3.0));
    dy.par_iter()
        .zip(a.par_iter())
        .with_min_len(MIN_ELEMS)
        .map(|(&g, &x)| {
            let t = (c * (x + k * x * x * x)).tanh();
            let dt = (T::one() - t * t) * c * (T::one() + three * k * x * x);
            g * (half * (T::one() + t) + half * x * dt)
        })
        .collect()
}

#[inline]
fn sigmoid<T: Real>(x: T) -> T {
    (T::one() + (-x).exp()).recip()
}

/// SwiGLU: `silu(gate)·up`, `silu(g) = g·σ(g)`.
pub fn swiglu_forward<T: Real>(gate: &[T], up: &[T]) -> Vec<T> {
    assert_eq!(gate.len(), up.len(), "swiglu: gate and up differ in size");
    gate.par_iter()
        .zip(up.par_iter())
        .with_min_len(MIN_ELEMS)
        .map(|(&g, &u)| g * sigmoid(g) * u)
        .collect()
}

/// SwiGLU backward: `d_gate = dy·up·σ(g)·(1 + g·(1 − σ(g)))`, `d_up = dy·silu(g)`.
pub fn swiglu_backward<T: Real>(dy: &[T], gate: &[T], up: &[T]) -> (Vec<T>, Vec<T>) {
    assert!(
        dy.len() == gate.len() && gate.len() == up.len(),
        "swiglu_backward: sizes differ"
    );
    dy.par_iter()
        .zip(gate.par_iter().zip(up.par_iter()))
        .with_min_len(MIN_ELEMS)
        .map(|(&dy, (&g, &u))| {
            let s = sigmoid(g);
            (dy * u * s * (T::one() + g * (T::one() - s)), dy * g * s)
        })
        .unzip()
}

// ---------------------------------------------------------------------------------------------
// Rotary position embedding
// ---------------------------------------------------------------------------------------------

pub use crate::types::Rope;

/// Rotates every (b, h, t) row of `x [B, H, T, D]` in place by table entry `b·T + t`:
/// `x'[i] = x[i]·cos − x[i+D/2]·sin`, `x'[i+D/2] = x[i+D/2]·cos + x[i]·sin`.
/// `inverse` rotates by the negative angle (the backward: the transpose of a rotation).
fn rope_apply<T: Real>(x: &mut [T], heads: usize, seq: usize, rope: &Rope<T>, inverse: bool) {
    let d = rope.head_dim;
    let half = d / 2;
    assert_eq!(
        x.len() % (heads * seq * d).max(1),
        0,
        "rope: x is not [B, {heads}, {seq}, {d}]"
    );
    let batch = x.len() / (heads * seq * d).max(1);
    assert_eq!(
        rope.cos.len(),
        batch * seq * half,
        "rope: table is not [B·T, D/2]"
    );
    x.par_chunks_mut((seq * d).max(1))
        .enumerate()
        .for_each(|(bh, xs)| {
            let b = bh / heads;
            for t in 0..seq {
                let e = (b * seq + t) * half;
                let (cos, sin) = (&rope.cos[e..e + half], &rope.sin[e..e + half]);
                let row = &mut xs[t * d..(t + 1) * d];
                let (lo, hi) = row.split_at_mut(half);
                for i in 0..half {
                    let s = if inverse { -sin[i] } else { sin[i] };
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * cos[i] - b * s;
                    hi[i] = b * cos[i] + a * s;
                }
            }
        });
}

/// RoPE forward on `x [B, H, T, D]` in place, token (b, t) at table entry `b·T + t`.
pub fn rope_forward<T: Real>(x: &mut [T], heads: usize, seq: usize, rope: &Rope<T>) {
    rope_apply(x, heads, seq, rope, false);
}

/// RoPE backward in place: the inverse rotation applied to the gradient.
pub fn rope_backward<T: Real>(dx: &mut [T], heads: usize, seq: usize, rope: &Rope<T>) {
    rope_apply(dx, heads, seq, rope, true);
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy
// ---------------------------------------------------------------------------------------------

/// `log Σ exp(z)` of one row, accumulated in f64.
fn log_sum_exp<T: Real>(z: &[T]) -> f64 {
    let m = z.iter().copied().fold(T::neg_infinity(), T::max);
    let s: f64 = z.iter().map(|&v| (v - m).exp().f64()).sum();
    m.f64() + s.ln()
}

/// Per-row cross-entropy of `logits [rows, vocab]` against `targets [rows]`:
/// `loss_r = logsumexp(z_r) − z_r[target_r]`; rows without a target give 0.
pub fn cross_entropy_forward<T: Real>(
    logits: &[T],
    targets: &[Option<u32>],
    vocab: usize,
) -> Vec<T> {
    assert_eq!(
        logits.len(),
        targets.len() * vocab,
        "cross_entropy: logits are not [rows, {vocab}]"
    );
    logits
        .par_chunks(vocab.max(1))
        .zip(targets.par_iter())
        .map(|(z, t)| match t {
            Some(t) => T::of(log_sum_exp(z) - z[*t as usize].f64()),
            None => T::zero(),
        })
        .collect()
}

/// Cross-entropy backward: `dz_r = scale·(softmax(z_r) − onehot(target_r))`, 0 for rows
/// without a target (`scale` is the upstream gradient of each row's loss, e.g. `1/N`).
pub fn cross_entropy_backward<T: Real>(
    logits: &[T],
    targets: &[Option<u32>],
    vocab: usize,
    scale: T,
) -> Vec<T> {
    let mut dz = logits.to_vec();
    cross_entropy_in_place(&mut dz, targets, vocab, Some(scale));
    dz
}

/// Fused cross-entropy: returns the per-row losses and, when `scale` is given, overwrites the
/// logits with their gradient (as [`cross_entropy_backward`]). Used by the model's chunked head.
pub fn cross_entropy_in_place<T: Real>(
    logits: &mut [T],
    targets: &[Option<u32>],
    vocab: usize,
    scale: Option<T>,
) -> Vec<T> {
    assert_eq!(
        logits.len(),
        targets.len() * vocab,
        "cross_entropy: logits are not [rows, {vocab}]"
    );
    if let Some(t) = targets.iter().flatten().find(|&&t| t as usize >= vocab) {
        panic!("cross_entropy: target {t} is outside the vocabulary of {vocab}");
    }
    logits
        .par_chunks_mut(vocab.max(1))
        .zip(targets.par_iter())
        .map(|(z, t)| {
            let Some(t) = *t else {
                if scale.is_some() {
                    z.iter_mut().for_each(|v| *v = T::zero());
                }
                return T::zero();
            };
            let t = t as usize;
            let Some(scale) = scale else {
                return T::of(log_sum_exp(z) - z[t].f64());
            };
            // One pass of exponentials serves both the loss and softmax(z) = e / Σe.
            let (m, zt) = (z.iter().copied().fold(T::neg_infinity(), T::max), z[t]);
            let mut sum = 0.0f64;
            for v in z.iter_mut() {
                *v = (*v - m).exp();
                sum += v.f64();
            }
            let k = scale / T::of(sum);
            z.iter_mut().for_each(|v| *v *= k);
            z[t] -= scale;
            T::of(m.f64() + sum.ln() - zt.f64())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Head layout
// ---------------------------------------------------------------------------------------------

/// `[B·T, H·D]` rows → `[B, H, T, D]`.
pub fn rows_to_heads<T: Real>(
    x: &[T],
    batch: usize,
    seq: usize,
    heads: usize,
    hd: usize,
) -> Vec<T> {
    assert_eq!(x.len(), batch * seq * heads * hd, "rows_to_heads: size");
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut((seq * hd).max(1))
        .enumerate()
        .for_each(|(bh, o)| {
            let (b, h) = (bh / heads, bh % heads);
            for t in 0..seq {
                let src = ((b * seq + t) * heads + h) * hd;
                o[t * hd..(t + 1) * hd].copy_from_slice(&x[src..src + hd]);
            }
        });
    out
}

/// `[B, H, T, D]` → `[B·T, H·D]` rows.
pub fn heads_to_rows<T: Real>(
    x: &[T],
    batch: usize,
    seq: usize,
    heads: usize,
    hd: usize,
) -> Vec<T> {
    assert_eq!(x.len(), batch * seq * heads * hd, "heads_to_rows: size");
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut((heads * hd).max(1))
        .enumerate()
        .for_each(|(bt, o)| {
            let (b, t) = (bt / seq.max(1), bt % seq.max(1));
            for h in 0..heads {
                let src = ((b * heads + h) * seq + t) * hd;
                o[h * hd..(h + 1) * hd].copy_from_slice(&x[src..src + hd]);
            }
        });
    out
}

fn add_in_place<T: Real>(y: &mut [T], x: &[T]) {
    assert_eq!(y.len(), x.len(), "residual: sizes differ");
    y.par_iter_mut()
        .zip(x.par_iter())
        .with_min_len(MIN_ELEMS)
        .for_each(|(y, &x)| *y += x);
}

// ---------------------------------------------------------------------------------------------
// Blocks
// ---------------------------------------------------------------------------------------------

/// What a block needs to know about the batch besides its weights.
#[derive(Clone, Copy, Debug)]
pub struct BlockCtx<'a, T> {
    pub cfg: &'a ModelConfig,
    pub batch: usize,
    /// Padded sequence length T.
    pub seq: usize,
    /// `[B]`.
    pub valid_len: &'a [usize],
    /// `[B]`: which prefix of the bank each sequence uses.
    pub prefix_index: &'a [usize],
    /// RoPE tables for the batch's token positions (Llama), `None` for GPT-2.
    pub rope: Option<&'a Rope<T>>,
}

impl<T> BlockCtx<'_, T> {
    /// Token rows B·T.
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }
}

/// One layer's slice of a prefix bank: keys and values `[n_prefixes, Hkv, P, D]`, used as given
/// (post-RoPE, like HF's past keys).
#[derive(Clone, Copy, Debug)]
pub struct LayerPrefix<'a, T> {
    pub k: &'a [T],
    pub v: &'a [T],
    pub n_prefixes: usize,
    /// P (0: no prefix).
    pub len: usize,
}

impl<T> LayerPrefix<'_, T> {
    /// No prefix (P = 0).
    pub fn empty() -> Self {
        LayerPrefix {
            k: &[],
            v: &[],
            n_prefixes: 0,
            len: 0,
        }
    }
}

/// Activations of the attention block kept for its backward.
#[derive(Clone, Debug)]
pub struct AttnBlockCache<T> {
    /// Block input (the residual stream) `[rows, d]`.
    pub x: Vec<T>,
    pub norm: NormStats<T>,
    /// Queries `[B, Hq, T, D]` after RoPE.
    pub q: Vec<T>,
    /// Sequence keys `[B, Hkv, T, D]` after RoPE.
    pub k: Vec<T>,
    /// Sequence values `[B, Hkv, T, D]`.
    pub v: Vec<T>,
    /// Attention output `[B, Hq, T, D]`.
    pub o: Vec<T>,
    /// `[B, Hq, T]`.
    pub lse: Vec<T>,
}

/// Gradients of the attention block.
#[derive(Clone, Debug)]
pub struct AttnBlockGrads<T> {
    /// Gradient w.r.t. the block input `[rows, d]` (`None` when not asked for).
    pub dx: Option<Vec<T>>,
    /// `[n_prefixes, Hkv, P, D]`.
    pub d_prefix_k: Vec<T>,
    pub d_prefix_v: Vec<T>,
}

fn attn_shape<T>(ctx: &BlockCtx<T>, prefix: &LayerPrefix<T>) -> AttnShape {
    AttnShape {
        batch: ctx.batch,
        q_heads: ctx.cfg.n_heads,
        kv_heads: ctx.cfg.n_kv_heads,
        seq: ctx.seq,
        prefix: prefix.len,
        head_dim: ctx.cfg.head_dim,
        n_prefixes: prefix.n_prefixes,
    }
}

fn attn_inputs<'a, T: Real>(
    ctx: &BlockCtx<'a, T>,
    prefix: &LayerPrefix<'a, T>,
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
) -> AttnInputs<'a, T> {
    AttnInputs {
        q,
        k,
        v,
        prefix_k: prefix.k,
        prefix_v: prefix.v,
        prefix_index: ctx.prefix_index,
        valid_len: ctx.valid_len,
        scale: T::of(1.0 / (ctx.cfg.head_dim as f64).sqrt()),
    }
}

/// Attention block: `y = x + Wo·attn(rope(Wq·h), rope(Wk·h), Wv·h; prefix)`, `h = norm(x)`.
pub fn attention_block_forward<T: Real>(
    ctx: &BlockCtx<T>,
    lw: &LayerWeights<T>,
    prefix: &LayerPrefix<T>,
    x: &[T],
) -> (Vec<T>, AttnBlockCache<T>) {
    let cfg = ctx.cfg;
    let (d, hd) = (cfg.d_model, cfg.head_dim);
    let (h, norm) = norm_forward(
        cfg.arch,
        x,
        &lw.attn_norm_w,
        lw.attn_norm_b.as_deref(),
        d,
        cfg.norm_eps,
    );
    let q = linear_forward(&h, &lw.wq, lw.bq.as_deref(), d, cfg.q_dim());
    let k = linear_forward(&h, &lw.wk, lw.bk.as_deref(), d, cfg.kv_dim());
    let v = linear_forward(&h, &lw.wv, lw.bv.as_deref(), d, cfg.kv_dim());
    drop(h);
    let mut q = rows_to_heads(&q, ctx.batch, ctx.seq, cfg.n_heads, hd);
    let mut k = rows_to_heads(&k, ctx.batch, ctx.seq, cfg.n_kv_heads, hd);
    let v = rows_to_heads(&v, ctx.batch, ctx.seq, cfg.n_kv_heads, hd);
    if let Some(rope) = ctx.rope {
        rope_forward(&mut q, cfg.n_heads, ctx.seq, rope);
        rope_forward(&mut k, cfg.n_kv_heads, ctx.seq, rope);
    }
    let shape = attn_shape(ctx, prefix);
    let (o, lse) = attention::forward(&shape, &attn_inputs(ctx, prefix, &q, &k, &v));
    let o_rows = heads_to_rows(&o, ctx.batch, ctx.seq, cfg.n_heads, hd);
    let mut y = linear_forward(&o_rows, &lw.wo, lw.bo.as_deref(), cfg.q_dim(), d);
    add_in_place(&mut y, x);
    let cache = AttnBlockCache {
        x: x.to_vec(),
        norm,
        q,
        k,
        v,
        o,
        lse,
    };
    (y, cache)
}

/// Attention block backward from `dy` (gradient of the block output). Returns the prefix
/// gradients and, when `need_dx`, the gradient of the block input (`dy` + the path through
/// attention, RoPE, projections and the norm).
pub fn attention_block_backward<T: Real>(
    ctx: &BlockCtx<T>,
    lw: &LayerWeights<T>,
    prefix: &LayerPrefix<T>,
    cache: &AttnBlockCache<T>,
    dy: &[T],
    need_dx: bool,
) -> AttnBlockGrads<T> {
    let cfg = ctx.cfg;
    let (d, hd) = (cfg.d_model, cfg.head_dim);
    let d_o_rows = linear_backward(dy, &lw.wo, cfg.q_dim(), d);
    let d_o = rows_to_heads(&d_o_rows, ctx.batch, ctx.seq, cfg.n_heads, hd);
    drop(d_o_rows);
    let shape = attn_shape(ctx, prefix);
    let inputs = attn_inputs(ctx, prefix, &cache.q, &cache.k, &cache.v);
    let g = attention::backward(&shape, &inputs, &cache.o, &cache.lse, &d_o);
    drop(d_o);
    let dx = need_dx.then(|| {
        let (mut dq, mut dk) = (g.dq, g.dk);
        if let Some(rope) = ctx.rope {
            rope_backward(&mut dq, cfg.n_heads, ctx.seq, rope);
            rope_backward(&mut dk, cfg.n_kv_heads, ctx.seq, rope);
        }
        let dq = heads_to_rows(&dq, ctx.batch, ctx.seq, cfg.n_heads, hd);
        let dk = heads_to_rows(&dk, ctx.batch, ctx.seq, cfg.n_kv_heads, hd);
        let dv = heads_to_rows(&g.dv, ctx.batch, ctx.seq, cfg.n_kv_heads, hd);
        let mut dh = linear_backward(&dq, &lw.wq, d, cfg.q_dim());
        linear_backward_into(&dk, &lw.wk, d, cfg.kv_dim(), &mut dh, true);
        linear_backward_into(&dv, &lw.wv, d, cfg.kv_dim(), &mut dh, true);
        let mut dx = norm_backward(cfg.arch, &dh, &cache.x, &lw.attn_norm_w, &cache.norm, d);
        add_in_place(&mut dx, dy);
        dx
    });
    AttnBlockGrads {
        dx,
        d_prefix_k: g.d_prefix_k,
        d_prefix_v: g.d_prefix_v,
    }
}

/// Activations of the MLP block kept for its backward.
#[derive(Clone, Debug)]
pub struct MlpCache<T> {
    /// Block input `[rows, d]`.
    pub x: Vec<T>,
    pub norm: NormStats<T>,
    /// GPT-2: the GELU's input; Llama: the gate projection. `[rows, d_ff]`.
    pub a: Vec<T>,
    /// Llama: the up projection `[rows, d_ff]`.
    pub up: Option<Vec<T>>,
}

/// MLP block: GPT-2 `y = x + W_out·gelu(W_in·h + b_in) + b_out`;
/// Llama `y = x + W_down·(silu(W_gate·h)·W_up·h)`; `h = norm(x)`.
pub fn mlp_block_forward<T: Real>(
    cfg: &ModelConfig,
    lw: &LayerWeights<T>,
    x: &[T],
) -> (Vec<T>, MlpCache<T>) {
    let (d, f) = (cfg.d_model, cfg.d_ff);
    let (h, norm) = norm_forward(
        cfg.arch,
        x,
        &lw.mlp_norm_w,
        lw.mlp_norm_b.as_deref(),
        d,
        cfg.norm_eps,
    );
    let a = linear_forward(&h, &lw.w_in, lw.b_in.as_deref(), d, f);
    let (act, up) = match cfg.arch {
        Arch::Gpt2 => (gelu_forward(&a), None),
        Arch::Llama => {
            let w_up = lw.w_up.as_deref().expect("Llama MLP needs up_proj");
            let up = linear_forward(&h, w_up, None, d, f);
            (swiglu_forward(&a, &up), Some(up))
        }
    };
    drop(h);
    let mut y = linear_forward(&act, &lw.w_out, lw.b_out.as_deref(), f, d);
    add_in_place(&mut y, x);
    let cache = MlpCache {
        x: x.to_vec(),
        norm,
        a,
        up,
    };
    (y, cache)
}

/// MLP block backward: the gradient of the block input from the gradient of its output.
pub fn mlp_block_backward<T: Real>(
    cfg: &ModelConfig,
    lw: &LayerWeights<T>,
    cache: &MlpCache<T>,
    dy: &[T],
) -> Vec<T> {
    let (d, f) = (cfg.d_model, cfg.d_ff);
    let d_act = linear_backward(dy, &lw.w_out, f, d);
    let dh = match &cache.up {
        None => {
            let da = gelu_backward(&d_act, &cache.a);
            linear_backward(&da, &lw.w_in, d, f)
        }
        Some(up) => {
            let (d_gate, d_up) = swiglu_backward(&d_act, &cache.a, up);
            let w_up = lw.w_up.as_deref().expect("Llama MLP needs up_proj");
            let mut dh = linear_backward(&d_gate, &lw.w_in, d, f);
            linear_backward_into(&d_up, w_up, d, f, &mut dh, true);
            dh
        }
    };
    let mut dx = norm_backward(cfg.arch, &dh, &cache.x, &lw.mlp_norm_w, &cache.norm, d);
    add_in_place(&mut dx, dy);
    dx
}
