//! Optimizers, learning-rate schedules and gradient clipping on fp32 master weights.
//!
//! Everything works on flat `&mut [f32]` parameter vectors (the trainer flattens the prefix bank
//! or the reparameterization into one). The arithmetic follows PyTorch's single-tensor
//! implementations step by step, in f32 with the scalars computed in f64, so a replay of
//! `torch.optim.AdamW` / `torch.optim.SGD` agrees to rounding (tests/optim.rs replays a recording):
//!
//! - AdamW (`torch.optim.AdamW`, `_single_tensor_adam` with decoupled decay):
//!   `p ← p·(1 − lr·wd)`; `m ← m + (1−β1)(g − m)`; `v ← β2·v + (1−β2)·g²`;
//!   `p ← p − (lr / (1−β1ᵗ)) · m / (√v / √(1−β2ᵗ) + ε)`.
//! - SGD (`torch.optim.SGD`, dampening 0, no Nesterov): `g ← g + wd·p` (coupled decay);
//!   with momentum μ > 0, `b ← g` on the first step then `b ← μ·b + g`, and `g ← b`; `p ← p − lr·g`.
//! - Schedules: the multipliers of transformers' `get_constant_schedule(_with_warmup)`,
//!   `get_linear_schedule_with_warmup` and `get_cosine_schedule_with_warmup` (LambdaLR: the
//!   update with index `s`, counted from 0, uses `lr · factor(s)`, so with warmup the first update
//!   has learning rate 0, as in transformers).
//! - Clipping: `torch.nn.utils.clip_grad_norm_` over all gradients together (L2 norm); the
//!   gradients are scaled by `min(1, max_norm / (norm + 1e-6))`, and the pre-clip norm returned.
//!
//! Optimizer state (step count, moments) is serialisable with serde for checkpoints.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// AdamW hyperparameters (torch defaults: β = (0.9, 0.999), ε = 1e-8, weight decay 0.01).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW: hyperparameters plus state (step count and both moments, one per parameter).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Number of updates done so far.
    pub step: u64,
    /// First moment `m`.
    pub m: Vec<f32>,
    /// Second moment `v`.
    pub v: Vec<f32>,
}

impl AdamW {
    /// Fresh state for `n` parameters.
    pub fn new(config: AdamWConfig, n: usize) -> Self {
        AdamW {
            config,
            step: 0,
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// One update with learning rate `lr` (already scheduled).
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64) {
        check_lengths("AdamW", self.m.len(), params.len(), grads.len());
        self.step += 1;
        let c = self.config;
        let t = self.step as f64;
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let w1 = (1.0 - c.beta1) as f32;
        let b2 = c.beta2 as f32;
        let w2 = (1.0 - c.beta2) as f32;
        let bc1 = 1.0 - c.beta1.powf(t);
        let bc2_sqrt = (1.0 - c.beta2.powf(t)).sqrt();
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt_f = bc2_sqrt as f32;
        let eps = c.eps as f32;
        for (((p, &g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(self.m.iter_mut())
            .zip(self.v.iter_mut())
        {
            *p *= decay;
            *m += w1 * (g - *m);
            *v = *v * b2 + w2 * g * g;
            let denom = v.sqrt() / bc2_sqrt_f + eps;
            *p -= step_size * (*m / denom);
        }
    }
}

/// SGD hyperparameters (torch's `SGD(lr, momentum, weight_decay)`, dampening 0, no Nesterov).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct SgdConfig {
    pub momentum: f64,
    pub weight_decay: f64,
}

/// SGD with optional momentum; the momentum buffer is the state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sgd {
    pub config: SgdConfig,
    pub step: u64,
    /// Momentum buffer (empty while momentum is 0 or before the first step).
    pub buf: Vec<f32>,
}

impl Sgd {
    /// Fresh state.
    pub fn new(config: SgdConfig) -> Self {
        Sgd {
            config,
            step: 0,
            buf: Vec::new(),
        }
    }

    /// One update with learning rate `lr` (already scheduled).
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64) {
        check_lengths("SGD", params.len(), params.len(), grads.len());
        self.step += 1;
        let wd = self.config.weight_decay as f32;
        let mu = self.config.momentum as f32;
        let lr = lr as f32;
        let first = self.buf.is_empty();
        if self.config.momentum != 0.0 && first {
            self.buf = vec![0.0; params.len()];
        }
        assert!(
            self.config.momentum == 0.0 || self.buf.len() == params.len(),
            "SGD: momentum buffer has {} elements, parameters {}",
            self.buf.len(),
            params.len()
        );
        for (i, (p, &g)) in params.iter_mut().zip(grads).enumerate() {
            let mut d = if wd != 0.0 { g + wd * *p } else { g };
            if self.config.momentum != 0.0 {
                let b = &mut self.buf[i];
                *b = if first { d } else { *b * mu + d };
                d = *b;
            }
            *p -= lr * d;
        }
    }
}

fn check_lengths(name: &str, state: usize, params: usize, grads: usize) {
    assert!(
        state == params && grads == params,
        "{name}: state has {state} elements, parameters {params}, gradients {grads}"
    );
}

/// Either optimizer, for the trainer and checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Optimizer {
    AdamW(AdamW),
    Sgd(Sgd),
}

impl Optimizer {
    /// One update with learning rate `lr`.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64) {
        match self {
            Optimizer::AdamW(o) => o.step(params, grads, lr),
            Optimizer::Sgd(o) => o.step(params, grads, lr),
        }
    }

    /// Number of updates done so far.
    pub fn steps_done(&self) -> u64 {
        match self {
            Optimizer::AdamW(o) => o.step,
            Optimizer::Sgd(o) => o.step,
        }
    }

    /// Checks that restored state fits `n` parameters (a checkpoint for another model or prefix
    /// length is refused).
    pub fn check_len(&self, n: usize) -> Result<()> {
        let have = match self {
            Optimizer::AdamW(o) => {
                if o.m.len() != o.v.len() {
                    bail!(
                        "AdamW state is inconsistent: m has {} elements, v {}",
                        o.m.len(),
                        o.v.len()
                    );
                }
                o.m.len()
            }
            Optimizer::Sgd(o) if o.buf.is_empty() => return Ok(()),
            Optimizer::Sgd(o) => o.buf.len(),
        };
        if have != n {
            bail!("optimizer state has {have} elements but there are {n} parameters");
        }
        Ok(())
    }
}

/// Learning-rate multiplier as a function of the update index.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Schedule {
    /// Linear warmup over `warmup` updates, then 1 (`warmup` 0: plain constant).
    Constant { warmup: u64 },
    /// Linear warmup, then linear decay to 0 at `total`.
    Linear { warmup: u64, total: u64 },
    /// Linear warmup, then cosine decay (`cycles` = 0.5: half a cosine, down to 0 at `total`).
    Cosine {
        warmup: u64,
        total: u64,
        cycles: f64,
    },
}

impl Schedule {
    /// The multiplier of the base learning rate for update `step` (0-based).
    pub fn factor(&self, step: u64) -> f64 {
        let warm = |w: u64| step as f64 / w.max(1) as f64;
        match *self {
            Schedule::Constant { warmup } => {
                if step < warmup {
                    warm(warmup)
                } else {
                    1.0
                }
            }
            Schedule::Linear { warmup, total } => {
                if step < warmup {
                    return warm(warmup);
                }
                let num = total as f64 - step as f64;
                (num / total.saturating_sub(warmup).max(1) as f64).max(0.0)
            }
            Schedule::Cosine {
                warmup,
                total,
                cycles,
            } => {
                if step < warmup {
                    return warm(warmup);
                }
                let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
                let f = 0.5 * (1.0 + (std::f64::consts::PI * cycles * 2.0 * progress).cos());
                f.max(0.0)
            }
        }
    }

    /// The learning rate of update `step` for base rate `lr`.
    pub fn lr(&self, base_lr: f64, step: u64) -> f64 {
        base_lr * self.factor(step)
    }
}

/// The global L2 norm of several gradient slices (accumulated in f64).
pub fn grad_norm(grads: &[&[f32]]) -> f64 {
    grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

/// `torch.nn.utils.clip_grad_norm_` over all `grads` together: returns the norm before clipping
/// and scales every gradient by `min(1, max_norm / (norm + 1e-6))`. `max_norm` 0 (or less)
/// turns clipping off (the norm is still returned). A non-finite norm is returned unchanged and
/// the gradients are left alone (the trainer decides what to do with the step).
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f64) -> f64 {
    let norm = {
        let views: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
        grad_norm(&views)
    };
    if max_norm > 0.0 && norm.is_finite() {
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            let c = coef as f32;
            for g in grads.iter_mut() {
                g.iter_mut().for_each(|x| *x *= c);
            }
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_schedule_ramps_and_decays() {
        let s = Schedule::Linear {
            warmup: 4,
            total: 12,
        };
        assert_eq!(s.factor(0), 0.0);
        assert_eq!(s.factor(2), 0.5);
        assert_eq!(s.factor(4), 1.0);
        assert_eq!(s.factor(8), 0.5);
        assert_eq!(s.factor(12), 0.0);
        assert_eq!(s.factor(20), 0.0);
    }

    #[test]
    fn cosine_schedule_halfway_is_half() {
        let s = Schedule::Cosine {
            warmup: 0,
            total: 10,
            cycles: 0.5,
        };
        assert!((s.factor(5) - 0.5).abs() < 1e-12);
        assert!((s.factor(0) - 1.0).abs() < 1e-12);
        assert!(s.factor(10).abs() < 1e-12);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut a = vec![3.0f32, 0.0];
        let mut b = vec![4.0f32];
        let n = clip_grad_norm(&mut [&mut a, &mut b], 1.0);
        assert!((n - 5.0).abs() < 1e-6);
        let after = grad_norm(&[&a, &b]);
        assert!((after - 1.0).abs() < 1e-5, "{after}");
        let n2 = clip_grad_norm(&mut [&mut a, &mut b], 0.0);
        assert!((n2 - after).abs() < 1e-12);
    }
}
