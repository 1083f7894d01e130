//! GPU kernels against the CPU: precision conversion, AdamW, SGD and the sum-of-squares reduction,
//! each on fresh random inputs, with outputs poisoned (NaN) before the launch, compared element by
//! element or by relative norm error against f64 math (and against `prefix_tune::optim`'s f32
//! steps). Without a usable GPU these tests print `SKIP: ...` and pass, unless
//! `PREFIX_TUNE_REQUIRE_GPU=1`. The CPU-runnable tests check the embedded modules and that asking
//! for a GPU on a machine without one is an `Err`, not a panic.

mod common;

use cudarc::driver::{CudaSlice, CudaStream};
use half::f16;
use prefix_tune::cuda::{modules, ops, GpuContext};
use prefix_tune::optim::{AdamW, AdamWConfig, Sgd, SgdConfig};
use prefix_tune::reference::real::rel_err;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use std::sync::Arc;

use common::env_is_1;

use common::gpu_or_skip;

fn normal(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    let d = Normal::new(0.0f32, std).unwrap();
    (0..n).map(|_| d.sample(rng)).collect()
}

fn upload<T: cudarc::driver::DeviceRepr>(s: &Arc<CudaStream>, x: &[T]) -> CudaSlice<T> {
    s.clone_htod(x).expect("upload")
}

fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
    s: &Arc<CudaStream>,
    x: &CudaSlice<T>,
) -> Vec<T> {
    s.clone_dtoh(x).expect("download")
}

// ---------------------------------------------------------------- CPU-runnable checks

#[test]
fn embedded_modules_match_the_build() {
    // Required either by the environment of this test run or of the build (scripts/test sets both).
    let required = env_is_1("PREFIX_TUNE_REQUIRE_KERNELS")
        || option_env!("PREFIX_TUNE_REQUIRE_KERNELS") == Some("1");
    if required {
        assert!(
            modules::KERNELS_BUILT && !modules::MODULES.is_empty(),
            "PREFIX_TUNE_REQUIRE_KERNELS=1 but this build embeds no kernels"
        );
    }
    assert_eq!(modules::KERNELS_BUILT, !modules::MODULES.is_empty());
    if !modules::KERNELS_BUILT {
        eprintln!(
            "SKIP: embedded_modules_match_the_build: built without nvcc, no kernels embedded"
        );
        return;
    }
    let expected: &[(&str, &[&str])] = &[
        (
            "convert",
            &["pt_f32_to_f16", "pt_f16_to_f32", "pt_f16_to_f32_scaled"],
        ),
        (
            "optim",
            &[
                "pt_adamw_step",
                "pt_adamw_step_f16",
                "pt_sgd_step",
                "pt_sgd_step_f16",
                "pt_sgd_momentum_step",
                "pt_sgd_momentum_step_f16",
                "pt_sum_squares_partial",
                "pt_sum_squares_finish",
            ],
        ),
    ];
    for (name, entries) in expected {
        let m = modules::module(name).unwrap_or_else(|| panic!("module {name} not embedded"));
        assert!(
            m.ptx.contains(".target sm_80"),
            "{name}: PTX is not for compute_80"
        );
        assert_eq!(
            &m.cubin_sm90[..4],
            b"\x7fELF",
            "{name}: cubin is not an ELF image"
        );
        for e in *entries {
            assert!(
                m.entries.contains(e),
                "{name}: ptxas reported no kernel {e}"
            );
            assert!(
                m.ptx.contains(&format!(".entry {e}(")),
                "{name}: PTX has no entry {e}"
            );
        }
    }
}

#[test]
fn asking_for_a_gpu_without_one_is_an_error_not_a_panic() {
    let result =
        std::panic::catch_unwind(|| GpuContext::new(0).map(|g| g.description().to_string()));
    let result = result.expect("GpuContext::new panicked");
    let info = prefix_tune::cuda::gpu_available();
    assert_eq!(result.is_ok(), info.is_ok());
    // SAFETY: only tries to dlopen the driver library.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    if !driver {
        let err = result.expect_err("no driver, yet a GPU context was created");
        let msg = format!("{err:#}");
        assert!(msg.contains("driver"), "unhelpful error: {msg}");
        assert!(info.unwrap_err().contains("driver"));
    } else {
        eprintln!("note: a CUDA driver is present here: {:?}", info);
    }
}

// ---------------------------------------------------------------- GPU checks

#[test]
fn convert_f32_to_f16_rounds_like_half() {
    let Some(gpu) = gpu_or_skip("convert_f32_to_f16_rounds_like_half") else {
        return;
    };
    let s = gpu.stream().clone();
    let mut rng = StdRng::seed_from_u64(0xc0417);
    let n = 1_000_003;
    let mut x = normal(&mut rng, n, 3.0);
    // The edges: subnormals, overflow, exact halves between representable values, signed zero.
    let specials = [
        1e-6f32,
        -3e-8,
        65504.0,
        65520.0,
        -7e4,
        1.0 + 1.0 / 2048.0,
        2049.0,
        2051.0,
        -0.0,
        6.1e-5,
    ];
    x[..specials.len()].copy_from_slice(&specials);
    let dx = upload(&s, &x);
    // Aligned (vectorised path) over everything, then an offset view (scalar path).
    for offset in [0usize, 1] {
        let mut dy = upload(&s, &vec![f16::NAN; n - offset]);
        ops::convert_f32_to_f16(&gpu, &dx.slice(offset..), &mut dy.as_view_mut()).unwrap();
        let y = download(&s, &dy);
        for (i, (&got, &xi)) in y.iter().zip(&x[offset..]).enumerate() {
            let want = f16::from_f32(xi);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "offset {offset}, element {i}: f16({xi}) = {got}, expected {want}"
            );
        }
    }
}

#[test]
fn convert_f16_to_f32_widens_and_scales() {
    let Some(gpu) = gpu_or_skip("convert_f16_to_f32_widens_and_scales") else {
        return;
    };
    let s = gpu.stream().clone();
    let mut rng = StdRng::seed_from_u64(0xf16);
    let n = 777_777;
    let x: Vec<f16> = normal(&mut rng, n, 100.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let dx = upload(&s, &x);
    let scale = 1.0f32 / 1024.0 * 3.0;
    for offset in [0usize, 3] {
        for sc in [1.0f32, scale] {
            let mut dy = upload(&s, &vec![f32::NAN; n - offset]);
            ops::convert_f16_to_f32(&gpu, &dx.slice(offset..), &mut dy.as_view_mut(), sc).unwrap();
            let y = download(&s, &dy);
            assert!(y.iter().all(|v| v.is_finite()), "an output was not written");
            let want: Vec<f64> = x[offset..].iter().map(|v| v.to_f64() * sc as f64).collect();
            let err = rel_err(&y, &want);
            eprintln!("f16->f32 offset {offset} scale {sc}: rel err {err:.3e}");
            if sc == 1.0 {
                assert_eq!(err, 0.0, "widening must be exact");
            } else {
                assert!(err < 1e-7, "scaled widening: rel err {err:.3e}");
            }
        }
    }
}

/// AdamW step `t` in f64 from the f32 state, with the gradient scaled by `gs` (f32, as the kernel).
#[allow(clippy::too_many_arguments)]
fn adamw_f64(
    c: &AdamWConfig,
    t: u64,
    lr: f64,
    gs: f32,
    p: &[f32],
    g: &[f32],
    m: &[f32],
    v: &[f32],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let bc1 = 1.0 - c.beta1.powi(t as i32);
    let bc2 = 1.0 - c.beta2.powi(t as i32);
    let mut po = Vec::with_capacity(p.len());
    let mut mo = Vec::with_capacity(p.len());
    let mut vo = Vec::with_capacity(p.len());
    for i in 0..p.len() {
        let gi = (g[i] * gs) as f64;
        let pi = p[i] as f64 * (1.0 - lr * c.weight_decay);
        let mi = c.beta1 * m[i] as f64 + (1.0 - c.beta1) * gi;
        let vi = c.beta2 * v[i] as f64 + (1.0 - c.beta2) * gi * gi;
        let denom = vi.sqrt() / bc2.sqrt() + c.eps;
        po.push(pi - lr / bc1 * mi / denom);
        mo.push(mi);
        vo.push(vi);
    }
    (po, mo, vo)
}

#[test]
fn adamw_step_matches_cpu() {
    let Some(gpu) = gpu_or_skip("adamw_step_matches_cpu") else {
        return;
    };
    let s = gpu.stream().clone();
    let mut rng = StdRng::seed_from_u64(0xada3);
    let n = 100_003;
    let config = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.05,
    };
    for (t, lr, gs, with_f16) in [(1u64, 1e-2, 1.0f32, false), (7, 5e-3, 0.37, true)] {
        let p0 = normal(&mut rng, n, 1.0);
        let g = normal(&mut rng, n, 0.1);
        let (m0, v0) = if t == 1 {
            (vec![0.0f32; n], vec![0.0f32; n])
        } else {
            let m = normal(&mut rng, n, 0.05);
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(1e-5f32..1e-2)).collect();
            (m, v)
        };
        let mut dp = upload(&s, &p0);
        let dg = upload(&s, &g);
        let mut dm = upload(&s, &m0);
        let mut dv = upload(&s, &v0);
        let mut dh = upload(&s, &vec![f16::NAN; n]);
        let mut hv = dh.as_view_mut();
        ops::adamw_step(
            &gpu,
            &config,
            t,
            lr,
            gs,
            &mut dp.as_view_mut(),
            &dg.as_view(),
            &mut dm.as_view_mut(),
            &mut dv.as_view_mut(),
            with_f16.then_some(&mut hv),
        )
        .unwrap();
        let (p, m, v) = (download(&s, &dp), download(&s, &dm), download(&s, &dv));

        // Against f64 math: compare the update p - p0 (p itself hides errors in its rounding).
        let (p64, m64, v64) = adamw_f64(&config, t, lr, gs, &p0, &g, &m0, &v0);
        let du: Vec<f64> = p
            .iter()
            .zip(&p0)
            .map(|(&a, &b)| a as f64 - b as f64)
            .collect();
        let du64: Vec<f64> = p64.iter().zip(&p0).map(|(&a, &b)| a - b as f64).collect();
        let (eu, em, ev) = (rel_err(&du, &du64), rel_err(&m, &m64), rel_err(&v, &v64));
        eprintln!("AdamW t={t}: rel err update {eu:.3e}, m {em:.3e}, v {ev:.3e}");
        assert!(eu < 1e-4, "AdamW update rel err {eu:.3e}");
        assert!(
            em < 1e-6 && ev < 1e-6,
            "AdamW moments rel err m {em:.3e} v {ev:.3e}"
        );

        // Against the crate's f32 CPU optimizer (same f32 operation order, up to FMA contraction).
        let mut cpu = AdamW::new(config, n);
        cpu.step = t - 1;
        cpu.m.copy_from_slice(&m0);
        cpu.v.copy_from_slice(&v0);
        let mut pc = p0.clone();
        let gc: Vec<f32> = g.iter().map(|&x| x * gs).collect();
        cpu.step(&mut pc, &gc, lr);
        let dc: Vec<f64> = pc
            .iter()
            .zip(&p0)
            .map(|(&a, &b)| a as f64 - b as f64)
            .collect();
        let ec = rel_err(&du, &dc);
        eprintln!("AdamW t={t}: GPU vs optim::AdamW update rel err {ec:.3e}");
        assert!(ec < 1e-4, "GPU vs optim::AdamW rel err {ec:.3e}");
        // Every parameter the f32 CPU step moves, the kernel moves too (a skipped element would
        // stay put). Not "every parameter moves": an update below half an ulp of the parameter
        // rounds away in f32 on both sides (6 of the t = 7 case's 100003).
        let skipped = du
            .iter()
            .zip(&dc)
            .filter(|(&g, &c)| g == 0.0 && c != 0.0)
            .count();
        assert_eq!(skipped, 0, "{skipped} parameters not updated by the kernel");

        if with_f16 {
            let h = download(&s, &dh);
            for (i, (&hi, &pi)) in h.iter().zip(&p).enumerate() {
                assert_eq!(
                    hi.to_bits(),
                    f16::from_f32(pi).to_bits(),
                    "fp16 copy, element {i}"
                );
            }
        }
    }
}

#[test]
fn sgd_step_matches_cpu() {
    let Some(gpu) = gpu_or_skip("sgd_step_matches_cpu") else {
        return;
    };
    let s = gpu.stream().clone();
    let mut rng = StdRng::seed_from_u64(0x56d);
    let n = 65_537;
    for (momentum, t, with_f16) in [(0.0, 1u64, true), (0.9, 1, false), (0.9, 4, true)] {
        let config = SgdConfig {
            momentum,
            weight_decay: 0.01,
        };
        let (lr, gs) = (0.05, 0.5f32);
        let p0 = normal(&mut rng, n, 1.0);
        let g = normal(&mut rng, n, 0.2);
        let b0 = normal(&mut rng, n, 0.1);
        let mut dp = upload(&s, &p0);
        let dg = upload(&s, &g);
        let mut db = upload(&s, &b0);
        let mut dh = upload(&s, &vec![f16::NAN; n]);
        let (mut bv, mut hv) = (db.as_view_mut(), dh.as_view_mut());
        ops::sgd_step(
            &gpu,
            &config,
            t,
            lr,
            gs,
            &mut dp.as_view_mut(),
            &dg.as_view(),
            (momentum != 0.0).then_some(&mut bv),
            with_f16.then_some(&mut hv),
        )
        .unwrap();
        let (p, b) = (download(&s, &dp), download(&s, &db));

        // f64 reference.
        let mut du64 = Vec::with_capacity(n);
        let mut b64 = Vec::with_capacity(n);
        for i in 0..n {
            let mut d = (g[i] * gs) as f64 + config.weight_decay * p0[i] as f64;
            if momentum != 0.0 {
                d = if t == 1 {
                    d
                } else {
                    momentum * b0[i] as f64 + d
                };
                b64.push(d);
            }
            du64.push(-lr * d);
        }
        let du: Vec<f64> = p
            .iter()
            .zip(&p0)
            .map(|(&a, &b)| a as f64 - b as f64)
            .collect();
        let eu = rel_err(&du, &du64);
        eprintln!("SGD momentum {momentum} t={t}: rel err update {eu:.3e}");
        assert!(eu < 1e-4, "SGD update rel err {eu:.3e}");
        if momentum != 0.0 {
            let eb = rel_err(&b, &b64);
            assert!(eb < 1e-6, "SGD momentum buffer rel err {eb:.3e}");
        }

        // The crate's CPU optimizer.
        let mut cpu = Sgd::new(config);
        if t > 1 {
            cpu.step = t - 1;
            cpu.buf = b0.clone();
        }
        let mut pc = p0.clone();
        let gc: Vec<f32> = g.iter().map(|&x| x * gs).collect();
        cpu.step(&mut pc, &gc, lr);
        let ec = rel_err(&p, &pc);
        assert!(ec < 1e-6, "GPU vs optim::Sgd params rel err {ec:.3e}");

        if with_f16 {
            let h = download(&s, &dh);
            for (i, (&hi, &pi)) in h.iter().zip(&p).enumerate() {
                assert_eq!(
                    hi.to_bits(),
                    f16::from_f32(pi).to_bits(),
                    "fp16 copy, element {i}"
                );
            }
        }
    }
}

#[test]
fn sum_squares_matches_f64() {
    let Some(gpu) = gpu_or_skip("sum_squares_matches_f64") else {
        return;
    };
    let s = gpu.stream().clone();
    let mut rng = StdRng::seed_from_u64(0x5a5);
    for n in [1usize, 255, 4097, 3_000_001] {
        let x = normal(&mut rng, n, 0.3);
        let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        let dx = upload(&s, &x);
        let got = ops::sum_squares_host(&gpu, &dx.as_view()).unwrap();
        let err = ((got as f64 - want) / want).abs();
        eprintln!("sum_squares n={n}: rel err {err:.3e}");
        assert!(err < 1e-5, "n={n}: got {got}, want {want}");
        // Deterministic: the same input gives the same bits.
        let again = ops::sum_squares_host(&gpu, &dx.as_view()).unwrap();
        assert_eq!(got.to_bits(), again.to_bits());
        // Accumulating into an existing value (global norm over several tensors).
        let mut out = upload(&s, &[1.5f32]);
        ops::sum_squares(&gpu, &dx.as_view(), &mut out.as_view_mut(), true).unwrap();
        let acc = download(&s, &out)[0] as f64;
        assert!(
            ((acc - (want + 1.5)) / (want + 1.5)).abs() < 1e-5,
            "accumulate: {acc}"
        );
    }
}
