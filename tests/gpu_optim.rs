//! The optimizer kernels (`kernels/optim.cu`) on the GPU against `prefix_tune::optim` (the
//! torch-exact CPU optimizers): several AdamW / SGD steps with global-norm clipping done the GPU
//! way (sum-of-squares kernels, clipping factor folded into the kernels' `grad_scale`), and the
//! `*_clipped` kernels of the device-resident training step, which compute that factor on the
//! device from a loss-scaled gradient's sum of squares and skip the update when it is not finite.
//!
//! Runs on GPU 0 through `prefix_tune::cuda::host` / the GPU engine: a real card, or the
//! simulated CUDA device (`scripts/sim`, which CI uses). Skips with a visible message without
//! one; fails instead with `PREFIX_TUNE_REQUIRE_GPU=1`.

mod common;

use half::f16;
use prefix_tune::cuda::host::{
    adamw_step, adamw_step_clipped, axpy, sgd_step, sgd_step_clipped, sum_squares,
};
use prefix_tune::optim::{clip_grad_norm, AdamW, AdamWConfig, Sgd, SgdConfig};
use prefix_tune::reference::real::rel_err;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// More than the grid-stride launch's 8 × 256 threads on a one-SM device (`PTSIM_SM_COUNT=1`,
/// scripts/test's small-grid pass: the stride loops run) and several reduction blocks.
const N: usize = 5000;
const STEPS: u64 = 6;
const MAX_NORM: f64 = 1.5;

fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| scale * (rng.random::<f32>() * 2.0 - 1.0))
        .collect()
}

/// The norm of `g` by the kernels, and the factor the GPU step folds into `grad_scale`
/// (`clip_grad_norm_`'s `min(1, max / (norm + 1e-6))`).
fn kernel_clip(g: &[f32]) -> (f64, f32) {
    let mut sq = f32::NAN;
    sum_squares(g, &mut sq, false).unwrap();
    let norm = (sq as f64).sqrt();
    let coef = (MAX_NORM / (norm + 1e-6)).min(1.0);
    (norm, if coef < 1.0 { coef as f32 } else { 1.0 })
}

/// Step `s`'s gradients: the odd steps are large enough to be clipped, the even ones are not.
fn grads(rng: &mut StdRng, s: u64) -> Vec<f32> {
    randn(rng, N, if s % 2 == 1 { 0.5 } else { 0.01 })
}

#[test]
fn adamw_steps_with_clipping_equal_the_cpu_optimizer() {
    if !common::host_gpu_or_skip("adamw_steps_with_clipping_equal_the_cpu_optimizer") {
        return;
    }
    let mut rng = StdRng::seed_from_u64(51);
    let config = AdamWConfig {
        weight_decay: 0.05,
        ..AdamWConfig::default()
    };
    let mut cpu = AdamW::new(config, N);
    let mut p_cpu = randn(&mut rng, N, 1.0);
    let mut p_emu = p_cpu.clone();
    let (mut m, mut v) = (vec![0.0f32; N], vec![0.0f32; N]);
    let mut half = vec![f16::ZERO; N];
    let mut clipped = 0;
    for s in 1..=STEPS {
        let lr = 1e-2 / s as f64;
        let g = grads(&mut rng, s);
        let mut g_cpu = g.clone();
        let norm_cpu = clip_grad_norm(&mut [&mut g_cpu], MAX_NORM);
        cpu.step(&mut p_cpu, &g_cpu, lr);

        let (norm, coef) = kernel_clip(&g);
        assert!(
            (norm - norm_cpu).abs() <= 1e-6 * norm_cpu,
            "step {s}: norm {norm} vs {norm_cpu}"
        );
        clipped += (coef < 1.0) as usize;
        // The fp16-writing variant on odd steps, the plain one on even steps.
        let h = (s % 2 == 1).then_some(&mut half[..]);
        adamw_step(&config, s, lr, coef, &mut p_emu, &g, &mut m, &mut v, h).unwrap();
        let e = rel_err(&p_emu, &p_cpu);
        assert!(e <= 1e-6, "step {s}: params rel err {e}");
        assert!(
            rel_err(&m, &cpu.m) <= 1e-6 && rel_err(&v, &cpu.v) <= 1e-6,
            "step {s}: moments"
        );
        if s % 2 == 1 {
            assert!(half
                .iter()
                .zip(&p_emu)
                .all(|(h, &p)| *h == f16::from_f32(p)));
        }
    }
    assert_eq!(clipped, STEPS as usize / 2, "the odd steps are clipped");
    assert!(rel_err(&p_cpu, &randn(&mut StdRng::seed_from_u64(51), N, 1.0)) > 1e-3);
}

#[test]
fn sgd_steps_with_and_without_momentum_equal_the_cpu_optimizer() {
    if !common::host_gpu_or_skip("sgd_steps_with_and_without_momentum_equal_the_cpu_optimizer") {
        return;
    }
    for (momentum, weight_decay) in [(0.0, 0.0), (0.0, 0.1), (0.9, 0.01)] {
        let mut rng = StdRng::seed_from_u64(52);
        let config = SgdConfig {
            momentum,
            weight_decay,
        };
        let mut cpu = Sgd::new(config);
        let mut p_cpu = randn(&mut rng, N, 1.0);
        let mut p_emu = p_cpu.clone();
        let mut buf = vec![f32::NAN; N]; // ignored on the first step
        let mut half = vec![f16::ZERO; N];
        for s in 1..=STEPS {
            let lr = 0.05;
            let g = grads(&mut rng, s);
            let mut g_cpu = g.clone();
            clip_grad_norm(&mut [&mut g_cpu], MAX_NORM);
            cpu.step(&mut p_cpu, &g_cpu, lr);

            let (_, coef) = kernel_clip(&g);
            let b = (momentum != 0.0).then_some(&mut buf[..]);
            let h = (s % 3 == 0).then_some(&mut half[..]);
            sgd_step(&config, s, lr, coef, &mut p_emu, &g, b, h).unwrap();
            let e = rel_err(&p_emu, &p_cpu);
            assert!(
                e <= 1e-6,
                "momentum {momentum} wd {weight_decay} step {s}: rel err {e}"
            );
            if momentum != 0.0 {
                assert!(rel_err(&buf, &cpu.buf) <= 1e-6);
            }
            if s % 3 == 0 {
                assert!(half
                    .iter()
                    .zip(&p_emu)
                    .all(|(h, &p)| *h == f16::from_f32(p)));
            }
        }
    }
}

#[test]
fn sum_of_squares_accumulates_and_is_reproducible() {
    if !common::host_gpu_or_skip("sum_of_squares_accumulates_and_is_reproducible") {
        return;
    }
    let mut rng = StdRng::seed_from_u64(53);
    // 20 first-stage blocks (the grid's striding past PT_REDUCE_MAX_BLOCKS blocks would take
    // 262 144 threads: too slow on the simulated device; tests/gpu_ops.rs covers it).
    let x = randn(&mut rng, 5_000, 1.0);
    let exact: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    let mut whole = f32::NAN;
    sum_squares(&x, &mut whole, false).unwrap();
    assert!(
        ((whole as f64 - exact) / exact).abs() <= 1e-5,
        "{whole} vs {exact}"
    );
    let mut again = f32::NAN;
    sum_squares(&x, &mut again, false).unwrap();
    assert_eq!(whole.to_bits(), again.to_bits(), "not reproducible");
    let (a, b) = x.split_at(1_234);
    let mut acc = f32::NAN;
    sum_squares(a, &mut acc, false).unwrap();
    sum_squares(b, &mut acc, true).unwrap();
    assert!(
        ((acc as f64 - exact) / exact).abs() <= 1e-5,
        "{acc} vs {exact}"
    );
    let mut empty = 7.0f32;
    sum_squares(&[], &mut empty, false).unwrap();
    assert_eq!(empty, 0.0);
}

/// The GPU engine's `apply_update` (optimizer kernels, parameters resident on the device)
/// against the host's `cpu_update` for several steps of each optimizer, with clipping; then a
/// fresh engine continuing from the host state (a resume: everything re-uploaded) and a
/// non-finite gradient (nothing updated).
#[test]
fn gpu_engine_updates_equal_the_cpu_optimizer() {
    use prefix_tune::cuda::device_optim::DeviceOptimEngine;
    use prefix_tune::cuda::engine::CudaEngine;
    use prefix_tune::engine::{cpu_update, Engine};
    use prefix_tune::model::config::Arch;
    use prefix_tune::optim::Optimizer;
    use prefix_tune::reference::testing::tiny_config;
    use std::sync::Arc;

    if !common::host_gpu_or_skip("gpu_engine_updates_equal_the_cpu_optimizer") {
        return;
    }
    // The kernels need head dim 64; the model itself is not run here.
    let mut cfg = tiny_config(Arch::Llama, true);
    cfg.head_dim = 64;
    let weights = Arc::new(prefix_tune::cli::bench::random_weights(&cfg, 5));
    let engine = |w: &Arc<_>| DeviceOptimEngine::new(CudaEngine::new(Arc::clone(w)).unwrap());
    let optimizers = [
        Optimizer::AdamW(AdamW::new(
            AdamWConfig {
                weight_decay: 0.02,
                ..AdamWConfig::default()
            },
            N,
        )),
        Optimizer::Sgd(Sgd::new(SgdConfig {
            momentum: 0.8,
            weight_decay: 0.01,
        })),
        Optimizer::Sgd(Sgd::new(SgdConfig::default())),
    ];
    for opt0 in optimizers {
        let mut rng = StdRng::seed_from_u64(54);
        let mut eng = engine(&weights);
        let (mut o_cpu, mut o_dev) = (opt0.clone(), opt0.clone());
        let mut p_cpu = randn(&mut rng, N, 1.0);
        let mut p_dev = p_cpu.clone();
        for s in 1..=STEPS + 2 {
            if s == STEPS {
                eng = engine(&weights); // a resume: new device buffers, state from the host
            }
            let lr = 3e-2 / s as f64;
            let g = grads(&mut rng, s);
            let (mut g_cpu, mut g_dev) = (g.clone(), g);
            let n_cpu = cpu_update(&mut p_cpu, &mut g_cpu, &mut o_cpu, lr, MAX_NORM);
            let n_dev = eng
                .apply_update(&mut p_dev, &mut g_dev, &mut o_dev, lr, MAX_NORM)
                .unwrap();
            assert!(
                (n_dev - n_cpu).abs() <= 1e-6 * n_cpu,
                "step {s}: norm {n_dev} vs {n_cpu}"
            );
            let e = rel_err(&p_dev, &p_cpu);
            assert!(e <= 1e-6, "{opt0:?}: step {s}: params rel err {e}");
            assert_eq!(o_dev.steps_done(), s);
            match (&o_dev, &o_cpu) {
                (Optimizer::AdamW(d), Optimizer::AdamW(c)) => {
                    assert!(rel_err(&d.m, &c.m) <= 1e-6 && rel_err(&d.v, &c.v) <= 1e-6);
                }
                (Optimizer::Sgd(d), Optimizer::Sgd(c)) => {
                    assert_eq!(d.buf.len(), c.buf.len());
                    if !c.buf.is_empty() {
                        assert!(rel_err(&d.buf, &c.buf) <= 1e-6);
                    }
                }
                _ => unreachable!(),
            }
        }
        // A non-finite gradient: the norm says so and nothing moves.
        let (p_before, o_before) = (p_dev.clone(), o_dev.clone());
        let mut g = grads(&mut rng, 1);
        g[N / 2] = f32::INFINITY;
        let n = eng
            .apply_update(&mut p_dev, &mut g, &mut o_dev, 1e-2, MAX_NORM)
            .unwrap();
        assert!(!n.is_finite());
        assert!(p_dev == p_before && o_dev == o_before);
    }
}

/// The loss scale the `*_clipped` cases store their gradients at (the kernels unscale).
const SCALE: f32 = 1024.0;

/// `g` as stored at `SCALE`, and its sum of squares by the kernel.
fn scaled(g: &[f32]) -> (Vec<f32>, f32) {
    let stored: Vec<f32> = g.iter().map(|&x| x * SCALE).collect();
    let mut sq = f32::NAN;
    sum_squares(&stored, &mut sq, false).unwrap();
    (stored, sq)
}

#[test]
fn clipped_kernels_equal_the_cpu_optimizer() {
    // The factor computed on the device (unscale, clip_grad_norm_'s min(1, max/(norm+1e-6)), or
    // none at max 0) against the CPU clip on the true gradient; odd steps are clipped.
    if !common::host_gpu_or_skip("clipped_kernels_equal_the_cpu_optimizer") {
        return;
    }
    for (name, momentum, max_norm) in [
        ("AdamW", None, MAX_NORM),
        ("AdamW, no clip", None, 0.0),
        ("SGD", Some(0.0), MAX_NORM),
        ("SGD momentum", Some(0.9), MAX_NORM),
    ] {
        let mut rng = StdRng::seed_from_u64(53);
        let mut p_cpu = randn(&mut rng, N, 1.0);
        let p0 = p_cpu.clone();
        let mut p_dev = p_cpu.clone();
        let adamw_config = AdamWConfig {
            weight_decay: 0.05,
            ..AdamWConfig::default()
        };
        let sgd_config = SgdConfig {
            momentum: momentum.unwrap_or(0.0),
            weight_decay: 0.01,
        };
        let mut adamw = AdamW::new(adamw_config, N);
        let mut sgd = Sgd::new(sgd_config);
        let (mut m, mut v) = (vec![0.0f32; N], vec![0.0f32; N]);
        let mut buf = vec![f32::NAN; N]; // ignored on the first step
        for s in 1..=STEPS {
            let lr = 1e-2;
            let g = grads(&mut rng, s);
            let mut g_cpu = g.clone();
            if max_norm > 0.0 {
                clip_grad_norm(&mut [&mut g_cpu], max_norm);
            }
            let (stored, sq) = scaled(&g);
            let unscale = 1.0 / SCALE;
            match momentum {
                None => {
                    adamw.step(&mut p_cpu, &g_cpu, lr);
                    adamw_step_clipped(
                        &adamw_config,
                        s,
                        lr,
                        unscale,
                        max_norm,
                        sq,
                        &mut p_dev,
                        &stored,
                        &mut m,
                        &mut v,
                    )
                    .unwrap();
                    assert!(rel_err(&m, &adamw.m) <= 1e-6 && rel_err(&v, &adamw.v) <= 1e-6);
                }
                Some(mo) => {
                    sgd.step(&mut p_cpu, &g_cpu, lr);
                    let b = (mo != 0.0).then_some(&mut buf[..]);
                    sgd_step_clipped(
                        &sgd_config,
                        s,
                        lr,
                        unscale,
                        max_norm,
                        sq,
                        &mut p_dev,
                        &stored,
                        b,
                    )
                    .unwrap();
                    if mo != 0.0 {
                        assert!(rel_err(&buf, &sgd.buf) <= 1e-6, "{name} step {s}: momentum");
                    }
                }
            }
            let e = rel_err(&p_dev, &p_cpu);
            assert!(e <= 1e-6, "{name} step {s}: params rel err {e}");
        }
        assert!(
            rel_err(&p_cpu, &p0) > 1e-4,
            "{name}: the steps must move the parameters"
        );
    }
}

#[test]
fn clipped_kernels_skip_a_non_finite_norm() {
    // An overflowed gradient (its sum of squares inf or NaN): parameters and moments untouched,
    // bit for bit. The control (a finite sum) changes them, so the comparison can fail.
    if !common::host_gpu_or_skip("clipped_kernels_skip_a_non_finite_norm") {
        return;
    }
    let mut rng = StdRng::seed_from_u64(54);
    let config = AdamWConfig::default();
    let sgd_config = SgdConfig {
        momentum: 0.9,
        weight_decay: 0.0,
    };
    let g = grads(&mut rng, 1);
    let (stored, finite_sq) = scaled(&g);
    for sq in [f32::INFINITY, f32::NAN, finite_sq] {
        let skip = !sq.is_finite();
        let p0 = randn(&mut rng, N, 1.0);
        let m0 = randn(&mut rng, N, 0.1);
        let v0: Vec<f32> = randn(&mut rng, N, 0.1).into_iter().map(f32::abs).collect();
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        adamw_step_clipped(
            &config,
            3,
            1e-2,
            1.0 / SCALE,
            1.0,
            sq,
            &mut p,
            &stored,
            &mut m,
            &mut v,
        )
        .unwrap();
        let same = p == p0 && m == m0 && v == v0;
        assert_eq!(
            same, skip,
            "AdamW at sum of squares {sq}: untouched = {same}"
        );
        let (mut p, mut b) = (p0.clone(), m0.clone());
        sgd_step_clipped(
            &sgd_config,
            3,
            1e-2,
            1.0 / SCALE,
            1.0,
            sq,
            &mut p,
            &stored,
            Some(&mut b),
        )
        .unwrap();
        let same = p == p0 && b == m0;
        assert_eq!(
            same, skip,
            "SGD momentum at sum of squares {sq}: untouched = {same}"
        );
    }
}

#[test]
fn axpy_accumulates() {
    if !common::host_gpu_or_skip("axpy_accumulates") {
        return;
    }
    let mut rng = StdRng::seed_from_u64(55);
    let x = randn(&mut rng, N, 1.0);
    let y0 = randn(&mut rng, N, 1.0);
    let mut y = y0.clone();
    axpy(0.37, &x, &mut y).unwrap();
    let want: Vec<f32> = x
        .iter()
        .zip(&y0)
        .map(|(&a, &b)| (0.37f64 * a as f64 + b as f64) as f32)
        .collect();
    let e = rel_err(&y, &want);
    assert!(e <= 1e-6, "axpy rel err {e}");
    assert!(rel_err(&y, &y0) > 1e-2, "axpy changed y");
}
