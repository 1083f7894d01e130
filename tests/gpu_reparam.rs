//! The reparameterization MLP kernels (`kernels/reparam.cu`) on the GPU against
//! [`Reparam::forward`] / [`Reparam::backward`] in f64: every matmul form and column sum into
//! NaN-poisoned outputs, and the GPU engine's `Engine::reparam_forward` / `reparam_backward`
//! (the path `train` takes with `--device cuda`).
//!
//! Runs on GPU 0 through `prefix_tune::cuda::host` / the GPU engine: a real card, or the
//! simulated CUDA device (`scripts/sim`, which CI uses). Skips with a visible message without
//! one; fails instead with `PREFIX_TUNE_REQUIRE_GPU=1`.

mod common;

use std::sync::Arc;

use prefix_tune::cuda::device_optim::DeviceOptimEngine;
use prefix_tune::cuda::engine::CudaEngine;
use prefix_tune::cuda::host::{reparam_col_sum as col_sum, reparam_gemm as gemm};
use prefix_tune::cuda::reparam::{Epilogue, GemmSpec};
use prefix_tune::engine::Engine;
use prefix_tune::model::config::Arch;
use prefix_tune::prefix::Reparam;
use prefix_tune::reference::real::{cast, matmul, rel_err, Trans};
use prefix_tune::reference::testing::tiny_config;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// fp32 math against f64.
const TOL: f64 = 1e-5;

fn uniform(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

#[test]
fn every_gemm_form_and_col_sum_match_f64_into_poisoned_outputs() {
    if !common::host_gpu_or_skip("every_gemm_form_and_col_sum_match_f64_into_poisoned_outputs") {
        return;
    }
    let mut rng = StdRng::seed_from_u64(17);
    // m·n > the grid-stride launch's 8 × 256 threads on a one-SM device (PTSIM_SM_COUNT=1,
    // scripts/test's small-grid pass): the stride loop runs.
    let (m, n, k) = (53, 41, 37);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        for epilogue in [
            Epilogue::Plain,
            Epilogue::Bias,
            Epilogue::Tanh,
            Epilogue::TanhBwd,
        ] {
            let a = uniform(&mut rng, m * k);
            let b = uniform(&mut rng, k * n);
            let bias = uniform(&mut rng, n);
            let h = uniform(&mut rng, m * n);
            let mut c = vec![f32::NAN; m * n];
            let s = GemmSpec {
                m,
                n,
                k,
                ta,
                tb,
                epilogue,
            };
            gemm(&s, &a, &b, Some(&bias), Some(&h), &mut c).unwrap();
            let tr = |t: bool| if t { Trans::Yes } else { Trans::No };
            let mut want = vec![0.0f64; m * n];
            let (a64, b64): (Vec<f64>, Vec<f64>) = (cast(&a), cast(&b));
            matmul(m, n, k, &a64, tr(ta), &b64, tr(tb), &mut want, false);
            for (idx, w) in want.iter_mut().enumerate() {
                let (j, hv) = (idx % n, h[idx] as f64);
                *w = match epilogue {
                    Epilogue::Plain => *w,
                    Epilogue::Bias => *w + bias[j] as f64,
                    Epilogue::Tanh => (*w + bias[j] as f64).tanh(),
                    Epilogue::TanhBwd => *w * (1.0 - hv * hv),
                };
            }
            assert!(
                c.iter().all(|x| x.is_finite()),
                "{s:?}: output not fully written"
            );
            let e = rel_err(&c, &want);
            assert!(e <= TOL, "{s:?}: rel err {e:.2e}");
        }
    }
    let x = uniform(&mut rng, 29 * 900);
    let mut out = vec![f32::NAN; 900];
    col_sum(&x, &mut out).unwrap();
    let want: Vec<f64> = (0..900)
        .map(|j| (0..29).map(|r| x[r * 900 + j] as f64).sum())
        .collect();
    let e = rel_err(&out, &want);
    assert!(e <= TOL, "col_sum: rel err {e:.2e}");
    // Wrong lengths are errors, not out-of-bounds reads.
    let s = GemmSpec {
        m,
        n,
        k,
        ta: false,
        tb: false,
        epilogue: Epilogue::Bias,
    };
    let mut c = vec![0.0; m * n];
    assert!(gemm(&s, &x[..m * k], &x[..k * n], None, None, &mut c).is_err());
    assert!(col_sum(&x[..901], &mut out).is_err());
}

#[test]
fn gpu_engine_reparam_forward_and_gradients_match_f64() {
    if !common::host_gpu_or_skip("gpu_engine_reparam_forward_and_gradients_match_f64") {
        return;
    }
    // The kernels need head dim 64; the model itself is not run here.
    let mut cfg = tiny_config(Arch::Llama, true);
    cfg.head_dim = 64;
    let weights = Arc::new(prefix_tune::cli::bench::random_weights(&cfg, 3));
    let mut engine = DeviceOptimEngine::new(CudaEngine::new(weights).unwrap());
    // L = 2, kv_heads = 2, head_dim = 8: out = 64; P = 12, e = 40, hidden = 80.
    let r = Reparam::<f32>::random(2, 2, 8, 12, 40, 80, 21);
    let r64 = r.cast::<f64>();
    let (y, cache) = engine.reparam_forward(&r).unwrap();
    let (y64, cache64) = r64.forward();
    let e = rel_err(&y, &y64);
    eprintln!("forward rel err {e:.2e}");
    assert!(e <= TOL, "forward: rel err {e:.2e}");
    let e = rel_err(&cache.h, &cache64.h);
    assert!(e <= TOL, "H: rel err {e:.2e}");

    let mut rng = StdRng::seed_from_u64(5);
    let d_peft = uniform(&mut rng, y.len());
    let g = engine.reparam_backward(&r, &cache, &d_peft).unwrap();
    let g64 = r64.backward(&cache64, &cast(&d_peft));
    for (name, got, want) in [
        ("embedding", &g.embedding, &g64.embedding),
        ("W1", &g.w1, &g64.w1),
        ("b1", &g.b1, &g64.b1),
        ("W2", &g.w2, &g64.w2),
        ("b2", &g.b2, &g64.b2),
    ] {
        assert_eq!(got.len(), want.len(), "{name}: length");
        let e = rel_err(got, want);
        eprintln!("d{name} rel err {e:.2e}");
        assert!(e <= TOL, "d{name}: rel err {e:.2e}");
    }
    // A cache of the wrong shape is an error.
    let bad = prefix_tune::prefix::ReparamCache {
        h: cache.h[1..].to_vec(),
    };
    assert!(engine.reparam_backward(&r, &bad, &d_peft).is_err());
}
