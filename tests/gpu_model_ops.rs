//! The model-layer kernels (kernels/{embedding,norm,activation,rope,cross_entropy}.cu) run on the
//! GPU through their real wrappers on host data, against the CPU reference layers
//! (`reference::layers`) computed in f64 from the same fp16-rounded inputs. Outputs are
//! NaN-poisoned before each launch (by `cuda::host`), so an unwritten element fails the test. Shapes are small and awkward
//! (rows not a multiple of a block, widths not a multiple of a warp, several blocks of a
//! grid-stride loop).
//!
//! Runs on GPU 0 through `prefix_tune::cuda::host` / the GPU engine: a real card, or the
//! simulated CUDA device (`scripts/sim`, which CI uses). Skips with a visible message without
//! one; fails instead with `PREFIX_TUNE_REQUIRE_GPU=1`.

mod common;

use common::host_gpu_or_skip;
use half::f16;
use prefix_tune::cuda::host::{self, HostRope};
use prefix_tune::cuda::model_ops::{
    act_params, ce_params, embedding_params, heads_params, norm_params, rows_params, NormKind,
};
use prefix_tune::reference::layers::{self, Rope};
use prefix_tune::reference::real::rel_err;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// fp16 tolerance on relative norm error.
const TOL: f64 = 1e-2;

/// `n` fp16 values `mean + std·N(0, 1)`.
fn randn(rng: &mut StdRng, n: usize, mean: f32, std: f32) -> Vec<f16> {
    (0..n)
        .map(|_| f16::from_f32(mean + std * rng.sample::<f32, _>(StandardNormal)))
        .collect()
}

fn wide(x: &[f16]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

fn wide32(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Relative norm error of `got` against `want`, every element written; prints the worst element.
fn compare(what: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad = got.iter().filter(|v| !v.is_finite()).count();
    assert_eq!(
        bad,
        0,
        "{what}: {bad} of {} elements not written or not finite",
        got.len()
    );
    let err = rel_err(got, want);
    let (i, worst) = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold((0, 0.0f64), |m, (i, d)| if d > m.1 { (i, d) } else { m });
    println!(
        "  {what:<22} rel err {err:.2e}  worst |diff| {worst:.2e} at {i} (got {:.5}, want {:.5})",
        got[i], want[i]
    );
    assert!(err <= TOL, "{what}: relative error {err:.3e} > {TOL:.0e}");
    err
}

// ---------------------------------------------------------------------------------------------

#[test]
fn embedding_with_and_without_positions() {
    if !host_gpu_or_skip("embedding_with_and_without_positions") {
        return;
    }
    let mut rng = StdRng::seed_from_u64(11);
    let (batch, seq, d, vocab, n_pos) = (3, 7, 40, 53, 24);
    let tok_emb = randn(&mut rng, vocab * d, 0.0, 1.0);
    let pos_emb = randn(&mut rng, n_pos * d, 0.0, 0.5);
    let tokens: Vec<i32> = (0..batch * seq)
        .map(|_| rng.random_range(0..vocab as i32))
        .collect();
    let offsets = [0i32, 5, 17]; // per-sequence offsets, the last one reaching the table's end
    let positions: Vec<usize> = (0..batch * seq)
        .map(|r| offsets[r / seq] as usize + r % seq)
        .collect();
    let toks_u32: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();

    let p = embedding_params(batch, seq, d, vocab, n_pos).unwrap();
    let x = host::embedding_forward(&p, &tokens, &offsets, &tok_emb, Some(&pos_emb)).unwrap();
    let (te, pe) = (wide(&tok_emb), wide(&pos_emb));
    let want = layers::embedding_forward(&toks_u32, &te, d, Some((&pe, &positions)));
    compare("embedding + positions", &wide32(&x), &want);

    let p = embedding_params(batch, seq, d, vocab, 0).unwrap();
    let x = host::embedding_forward(&p, &tokens, &offsets, &tok_emb, None).unwrap();
    let want = layers::embedding_forward(&toks_u32, &te, d, None);
    compare("embedding", &wide32(&x), &want);
}

/// Residual add + norm forward of one kind on `rows × d`, then the backward with accumulation.
fn norm_case(kind: NormKind, rows: usize, d: usize, seed: u64) {
    println!("{kind:?} norm, rows {rows}, d {d}");
    let mut rng = StdRng::seed_from_u64(seed);
    let layer = kind == NormKind::Layer;
    let x0: Vec<f32> = (0..rows * d)
        .map(|_| 0.5 + 2.0 * rng.sample::<f32, _>(StandardNormal))
        .collect();
    let y = randn(&mut rng, rows * d, 0.0, 1.0);
    let y_bias = randn(&mut rng, d, 0.0, 0.3);
    let w = randn(&mut rng, d, 1.0, 0.2);
    let b = randn(&mut rng, d, 0.0, 0.2);
    let eps = 1e-5;

    // Forward: x += y + bias, then norm.
    let p = norm_params(rows, d, eps, kind, false).unwrap();
    let mut x = x0.clone();
    let out = host::add_norm_forward(
        &p,
        &mut x,
        Some(&y),
        Some(&y_bias),
        &w,
        layer.then_some(b.as_slice()),
        true,
    )
    .unwrap();
    let x_ref: Vec<f64> = (0..rows * d)
        .map(|i| x0[i] as f64 + y[i].to_f64() + y_bias[i % d].to_f64())
        .collect();
    let (w64, b64) = (wide(&w), wide(&b));
    let (h_ref, stats) = match kind {
        NormKind::Layer => layers::layer_norm_forward(&x_ref, &w64, &b64, d, eps),
        NormKind::Rms => layers::rms_norm_forward(&x_ref, &w64, d, eps),
    };
    compare("residual x", &wide32(&x), &x_ref);
    compare(
        "saved x (fp16)",
        &wide(out.x_save.as_ref().unwrap()),
        &x_ref,
    );
    compare("norm output h", &wide(&out.h), &h_ref);
    compare("rstd", &wide32(&out.rstd), &stats.rstd);
    if layer {
        compare("mean", &wide32(&out.mean), &stats.mean);
    }

    // Forward without a branch (the first norm of a layer reading the residual as it is).
    let mut x2 = x0.clone();
    let out2 = host::add_norm_forward(
        &p,
        &mut x2,
        None,
        None,
        &w,
        layer.then_some(b.as_slice()),
        false,
    )
    .unwrap();
    assert_eq!(x2, x0, "x must be left alone without a branch output");
    assert!(out2.x_save.is_none());
    let x0_64 = wide32(&x0);
    let (h2_ref, _) = match kind {
        NormKind::Layer => layers::layer_norm_forward(&x0_64, &w64, &b64, d, eps),
        NormKind::Rms => layers::rms_norm_forward(&x0_64, &w64, d, eps),
    };
    compare("norm output (no add)", &wide(&out2.h), &h2_ref);

    // Backward from the fp16 saved input and the kernel's statistics, accumulated into dx.
    let x16 = out.x_save.unwrap();
    let x16_64 = wide(&x16);
    let dy = randn(&mut rng, rows * d, 0.0, 1.0);
    let dx_prev: Vec<f32> = (0..rows * d)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    let pb = norm_params(rows, d, eps, kind, true).unwrap();
    let mut dx = dx_prev.clone();
    let dx16 = host::norm_backward(&pb, &dy, &x16, &w, &out.mean, &out.rstd, &mut dx).unwrap();
    let stats64 = layers::NormStats {
        mean: wide32(&out.mean),
        rstd: wide32(&out.rstd),
    };
    let dn = match kind {
        NormKind::Layer => layers::layer_norm_backward(&wide(&dy), &x16_64, &w64, &stats64, d),
        NormKind::Rms => layers::rms_norm_backward(&wide(&dy), &x16_64, &w64, &stats64, d),
    };
    let dx_ref: Vec<f64> = dn
        .iter()
        .zip(&dx_prev)
        .map(|(a, &b)| a + b as f64)
        .collect();
    compare("dx (accumulated)", &wide32(&dx), &dx_ref);
    compare("dx fp16 copy", &wide(&dx16), &dx_ref);
    // The norm's own part alone, without the residual gradient (so it is not hidden by it).
    let pb0 = norm_params(rows, d, eps, kind, false).unwrap();
    let mut dx0 = vec![f32::NAN; rows * d];
    host::norm_backward(&pb0, &dy, &x16, &w, &out.mean, &out.rstd, &mut dx0).unwrap();
    compare("dx (norm only)", &wide32(&dx0), &dn);
}

#[test]
fn layer_norm_forward_backward() {
    if !host_gpu_or_skip("layer_norm_forward_backward") {
        return;
    }
    norm_case(NormKind::Layer, 13, 72, 21);
    norm_case(NormKind::Layer, 6, 256, 22);
}

#[test]
fn rms_norm_forward_backward() {
    if !host_gpu_or_skip("rms_norm_forward_backward") {
        return;
    }
    norm_case(NormKind::Rms, 13, 72, 31);
    norm_case(NormKind::Rms, 5, 192, 32);
}

#[test]
fn gelu_forward_backward() {
    if !host_gpu_or_skip("gelu_forward_backward") {
        return;
    }
    let mut rng = StdRng::seed_from_u64(41);
    let (rows, width) = (9, 130);
    let a0 = randn(&mut rng, rows * width, 0.0, 2.0);
    let bias = randn(&mut rng, width, 0.0, 0.5);
    let p = act_params(rows, width).unwrap();
    let mut a = a0.clone();
    let out = host::gelu_forward(&p, &mut a, Some(&bias)).unwrap();
    let a_ref: Vec<f64> = (0..rows * width)
        .map(|i| a0[i].to_f64() + bias[i % width].to_f64())
        .collect();
    compare("biased pre-activation", &wide(&a), &a_ref);
    compare("gelu", &wide(&out), &layers::gelu_forward(&a_ref));

    let dy = randn(&mut rng, rows * width, 0.0, 1.0);
    let da = host::gelu_backward(&p, &dy, &a).unwrap();
    compare(
        "gelu backward",
        &wide(&da),
        &layers::gelu_backward(&wide(&dy), &wide(&a)),
    );

    // Without a bias the input is left as it is.
    let mut a1 = a0.clone();
    let out1 = host::gelu_forward(&p, &mut a1, None).unwrap();
    assert_eq!(a1, a0);
    compare(
        "gelu (no bias)",
        &wide(&out1),
        &layers::gelu_forward(&wide(&a0)),
    );
}

#[test]
fn swiglu_forward_backward() {
    if !host_gpu_or_skip("swiglu_forward_backward") {
        return;
    }
    let mut rng = StdRng::seed_from_u64(51);
    let (rows, width) = (7, 150);
    let gu = randn(&mut rng, rows * 2 * width, 0.0, 2.0);
    let (mut gate, mut up) = (Vec::new(), Vec::new());
    for r in 0..rows {
        gate.extend(wide(&gu[r * 2 * width..r * 2 * width + width]));
        up.extend(wide(&gu[r * 2 * width + width..(r + 1) * 2 * width]));
    }
    let p = act_params(rows, width).unwrap();
    let out = host::swiglu_forward(&p, &gu).unwrap();
    compare("swiglu", &wide(&out), &layers::swiglu_forward(&gate, &up));

    let dy = randn(&mut rng, rows * width, 0.0, 1.0);
    let dgu = host::swiglu_backward(&p, &dy, &gu).unwrap();
    let (dg_ref, du_ref) = layers::swiglu_backward(&wide(&dy), &gate, &up);
    let (mut dg, mut du) = (Vec::new(), Vec::new());
    for r in 0..rows {
        dg.extend(wide(&dgu[r * 2 * width..r * 2 * width + width]));
        du.extend(wide(&dgu[r * 2 * width + width..(r + 1) * 2 * width]));
    }
    compare("swiglu d_gate", &dg, &dg_ref);
    compare("swiglu d_up", &du, &du_ref);
}

/// cos/sin tables `[n_pos, D/2]` in f32 from f64 angles (what the engine uploads).
fn rope_tables(head_dim: usize, theta: f64, n_pos: usize) -> (Vec<f32>, Vec<f32>) {
    let positions: Vec<usize> = (0..n_pos).collect();
    let r = Rope::<f64>::new(head_dim, theta, &positions);
    (
        r.cos.iter().map(|&v| v as f32).collect(),
        r.sin.iter().map(|&v| v as f32).collect(),
    )
}

/// The fused `[q | k | v]` projection rows of one layer split into heads (+ bias, + RoPE on q and
/// k), and the way back (inverse RoPE) into the fused gradient rows.
fn layout_case(rope: bool, head_dim: usize, seed: u64) {
    println!("layout, rope {rope}, head dim {head_dim}");
    let mut rng = StdRng::seed_from_u64(seed);
    let (batch, seq, hq, hkv) = (2, 5, 4, 2);
    let (qd, kvd) = (hq * head_dim, hkv * head_dim);
    let stride = qd + 2 * kvd;
    let rows = batch * seq;
    let qkv = randn(&mut rng, rows * stride, 0.0, 1.0);
    let bias = randn(&mut rng, stride, 0.0, 0.5);
    let offsets = [3i32, 11];
    let n_pos = 16;
    let theta = 10000.0;
    let (cos, sin) = rope_tables(head_dim, theta, n_pos);
    let positions: Vec<usize> = (0..rows)
        .map(|r| offsets[r / seq] as usize + r % seq)
        .collect();
    let rope_ref = Rope::<f64>::new(head_dim, theta, &positions);
    let host_rope = HostRope {
        pos_offset: &offsets,
        cos: &cos,
        sin: &sin,
    };

    let parts = [
        ("q", 0, hq, true),
        ("k", qd, hkv, true),
        ("v", qd + kvd, hkv, false),
    ];
    let mut grads_rows = vec![f16::from_f32(7.0); rows * stride];
    let mut want_rows = vec![7.0f64; rows * stride];
    for (name, col, heads, rotated) in parts {
        let width = heads * head_dim;
        let use_rope = rope && rotated;
        let p = heads_params(batch, seq, heads, head_dim, stride, col, use_rope, n_pos).unwrap();
        let b = &bias[col..col + width];
        let got = host::rows_to_heads(&p, &qkv, Some(b), use_rope.then_some(&host_rope)).unwrap();
        // Reference: this tensor's columns + bias, to heads, rotated.
        let cols: Vec<f64> = (0..rows * width)
            .map(|i| qkv[(i / width) * stride + col + i % width].to_f64() + b[i % width].to_f64())
            .collect();
        let mut want = layers::rows_to_heads(&cols, batch, seq, heads, head_dim);
        if use_rope {
            layers::rope_forward(&mut want, heads, seq, &rope_ref);
        }
        compare(&format!("{name} rows → heads"), &wide(&got), &want);

        // Backward: a gradient in heads layout back into this tensor's columns.
        let g = randn(&mut rng, batch * heads * seq * head_dim, 0.0, 1.0);
        host::heads_to_rows(&p, &g, use_rope.then_some(&host_rope), &mut grads_rows).unwrap();
        let mut g_ref = wide(&g);
        if use_rope {
            layers::rope_backward(&mut g_ref, heads, seq, &rope_ref);
        }
        let g_rows = layers::heads_to_rows(&g_ref, batch, seq, heads, head_dim);
        for i in 0..rows * width {
            want_rows[(i / width) * stride + col + i % width] = g_rows[i];
        }
    }
    compare(
        "[dq | dk | dv] heads → rows",
        &wide(&grads_rows),
        &want_rows,
    );
}

#[test]
fn rows_heads_layout_with_bias() {
    if !host_gpu_or_skip("rows_heads_layout_with_bias") {
        return;
    }
    layout_case(false, 64, 61);
}

#[test]
fn rope_forward_backward() {
    if !host_gpu_or_skip("rope_forward_backward") {
        return;
    }
    layout_case(true, 64, 71);
    layout_case(true, 32, 72);
}

#[test]
fn rope_position_outside_table_is_nan() {
    if !host_gpu_or_skip("rope_position_outside_table_is_nan") {
        return;
    }
    // The host checks positions; a slip must still be visible, never a silent wrong answer.
    let (cos, sin) = rope_tables(8, 10000.0, 4);
    let src = vec![f16::ONE; 3 * 8];
    let p = heads_params(1, 3, 1, 8, 8, 0, true, 4).unwrap();
    let rope = HostRope {
        pos_offset: &[2],
        cos: &cos,
        sin: &sin,
    };
    let got = host::rows_to_heads(&p, &src, None, Some(&rope)).unwrap();
    assert!(
        got[..16].iter().all(|v| v.is_finite()),
        "positions 2, 3 are in the table"
    );
    assert!(
        got[16..].iter().all(|v| v.is_nan()),
        "position 4 is outside the table"
    );
}

#[test]
fn gather_scatter_rows() {
    if !host_gpu_or_skip("gather_scatter_rows") {
        return;
    }
    let mut rng = StdRng::seed_from_u64(81);
    let (rows, d) = (20, 33);
    let src = randn(&mut rng, rows * d, 0.0, 1.0);
    let index = [17i32, 3, 4, 0, 19, 8];
    let p = rows_params(index.len(), d).unwrap();
    let got = host::gather_rows(&p, &src, &index).unwrap();
    for (i, &r) in index.iter().enumerate() {
        assert_eq!(
            &got[i * d..(i + 1) * d],
            &src[r as usize * d..(r as usize + 1) * d]
        );
    }
    let mut dst = vec![f16::ZERO; rows * d];
    host::scatter_rows(&p, &got, &index, &mut dst).unwrap();
    for r in 0..rows {
        let row = &dst[r * d..(r + 1) * d];
        if index.contains(&(r as i32)) {
            assert_eq!(row, &src[r * d..(r + 1) * d]);
        } else {
            assert!(
                row.iter().all(|v| *v == f16::ZERO),
                "row {r} must stay untouched"
            );
        }
    }
    assert!(
        host::gather_rows(&p, &src[..10 * d], &index).is_err(),
        "index 17 of 10 rows"
    );
}

#[test]
fn cross_entropy_loss_and_gradient() {
    if !host_gpu_or_skip("cross_entropy_loss_and_gradient") {
        return;
    }
    let mut rng = StdRng::seed_from_u64(91);
    let (rows, vocab) = (6, 1000);
    let logits = randn(&mut rng, rows * vocab, 0.0, 3.0);
    let targets: Vec<i32> = vec![5, -1, 999, 0, -1, 431];
    let opt_targets: Vec<Option<u32>> = targets
        .iter()
        .map(|&t| (t >= 0).then_some(t as u32))
        .collect();
    let z = wide(&logits);

    let p = ce_params(rows, vocab, None).unwrap();
    let mut l = logits.clone();
    let loss = host::cross_entropy(&p, &mut l, &targets).unwrap();
    assert_eq!(l, logits, "loss only: the logits stay as they are");
    let loss_ref = layers::cross_entropy_forward(&z, &opt_targets, vocab);
    compare("loss per row", &wide32(&loss), &loss_ref);
    for (r, t) in targets.iter().enumerate() {
        if *t < 0 {
            assert_eq!(loss[r], 0.0, "row {r} has no target");
        }
    }

    let scale = 0.37f32;
    let p = ce_params(rows, vocab, Some(scale)).unwrap();
    let mut g = logits.clone();
    let loss2 = host::cross_entropy(&p, &mut g, &targets).unwrap();
    compare("loss per row (with grad)", &wide32(&loss2), &loss_ref);
    let g_ref = layers::cross_entropy_backward(&z, &opt_targets, vocab, scale as f64);
    compare("dlogits", &wide(&g), &g_ref);
    // The target entries carry the -scale term: check them on their own (they dominate nothing
    // in the norm of a 1000-wide row).
    let tg: Vec<f64> = (0..rows)
        .filter(|&r| targets[r] >= 0)
        .map(|r| g[r * vocab + targets[r] as usize].to_f64())
        .collect();
    let tg_ref: Vec<f64> = (0..rows)
        .filter(|&r| targets[r] >= 0)
        .map(|r| g_ref[r * vocab + targets[r] as usize])
        .collect();
    compare("dlogits at targets", &tg, &tg_ref);
}
