//! Finite-difference checks (f64) of every layer backward and of the whole model's prefix
//! gradient, plus consistency checks of the model's forward (loss vs logits, padding, mixed
//! prefixes, positions, f32 vs f64, prefix-from-K/V equivalence).

use prefix_tune::model::config::{Arch, ModelConfig, ModelWeights};
use prefix_tune::prefix::PrefixBank;
use prefix_tune::reference::layers::*;
use prefix_tune::reference::model::{
    check_positions, layer_kv, logits, loss, loss_and_grad, Batch, Positions, RunOptions,
};
use prefix_tune::reference::real::rel_err;
use prefix_tune::reference::testing::{
    random_bank, random_batch, random_model, random_vec, tiny_config,
};
use rand::rngs::StdRng;
use rand::SeedableRng;

const H: f64 = 1e-5;

fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Central differences of `f` at `x` along every coordinate.
fn fd_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = xp[i];
            xp[i] = x0 + H;
            let fp = f(&xp);
            xp[i] = x0 - H;
            let fm = f(&xp);
            xp[i] = x0;
            (fp - fm) / (2.0 * H)
        })
        .collect()
}

fn check(name: &str, analytic: &[f64], numeric: &[f64], tol: f64) {
    let e = rel_err(analytic, numeric);
    let norm = numeric.iter().map(|v| v * v).sum::<f64>().sqrt();
    println!(
        "{name}: rel err {e:.2e} (|grad| {norm:.2e}, {} entries)",
        numeric.len()
    );
    assert!(
        norm > 1e-8,
        "{name}: the reference gradient is zero, the test would prove nothing"
    );
    assert!(e <= tol, "{name}: rel err {e:.3e} > {tol:.0e}");
}

// ---------------------------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------------------------

#[test]
fn linear_backward_matches_fd() {
    let mut g = rng(1);
    let (rows, d_in, d_out) = (5, 7, 6);
    let x = random_vec(&mut g, rows * d_in, 1.0);
    let w = random_vec(&mut g, d_out * d_in, 0.5);
    let b = random_vec(&mut g, d_out, 0.5);
    let r = random_vec(&mut g, rows * d_out, 1.0);
    // Forward against the definition.
    let y = linear_forward(&x, &w, Some(&b), d_in, d_out);
    let mut want = vec![0.0; rows * d_out];
    for i in 0..rows {
        for o in 0..d_out {
            want[i * d_out + o] = b[o]
                + (0..d_in)
                    .map(|k| x[i * d_in + k] * w[o * d_in + k])
                    .sum::<f64>();
        }
    }
    assert!(rel_err(&y, &want) < 1e-14);
    let dx = linear_backward(&r, &w, d_in, d_out);
    let num = fd_grad(&x, |x| {
        dot(&r, &linear_forward(x, &w, Some(&b), d_in, d_out))
    });
    check("linear", &dx, &num, 1e-8);
}

#[test]
fn layer_norm_backward_matches_fd() {
    let mut g = rng(2);
    let (rows, d) = (4, 9);
    let x: Vec<f64> = random_vec(&mut g, rows * d, 1.0)
        .iter()
        .map(|v| v + 0.3)
        .collect();
    let w: Vec<f64> = random_vec(&mut g, d, 0.3).iter().map(|v| v + 1.0).collect();
    let b = random_vec(&mut g, d, 0.3);
    let r = random_vec(&mut g, rows * d, 1.0);
    let (y, stats) = layer_norm_forward(&x, &w, &b, d, 1e-5);
    // Forward against the definition.
    for i in 0..rows {
        let xr = &x[i * d..(i + 1) * d];
        let mu = xr.iter().sum::<f64>() / d as f64;
        let var = xr.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / d as f64;
        for j in 0..d {
            let want = (xr[j] - mu) / (var + 1e-5).sqrt() * w[j] + b[j];
            assert!((y[i * d + j] - want).abs() < 1e-12);
        }
    }
    let dx = layer_norm_backward(&r, &x, &w, &stats, d);
    let num = fd_grad(&x, |x| dot(&r, &layer_norm_forward(x, &w, &b, d, 1e-5).0));
    check("layer_norm", &dx, &num, 1e-7);
}

#[test]
fn rms_norm_backward_matches_fd() {
    let mut g = rng(3);
    let (rows, d) = (4, 9);
    let x = random_vec(&mut g, rows * d, 1.0);
    let w: Vec<f64> = random_vec(&mut g, d, 0.3).iter().map(|v| v + 1.0).collect();
    let r = random_vec(&mut g, rows * d, 1.0);
    let (y, stats) = rms_norm_forward(&x, &w, d, 1e-5);
    for i in 0..rows {
        let xr = &x[i * d..(i + 1) * d];
        let ms = xr.iter().map(|v| v * v).sum::<f64>() / d as f64;
        for j in 0..d {
            assert!((y[i * d + j] - xr[j] / (ms + 1e-5).sqrt() * w[j]).abs() < 1e-12);
        }
    }
    let dx = rms_norm_backward(&r, &x, &w, &stats, d);
    let num = fd_grad(&x, |x| dot(&r, &rms_norm_forward(x, &w, d, 1e-5).0));
    check("rms_norm", &dx, &num, 1e-7);
}

#[test]
fn gelu_backward_matches_fd() {
    let mut g = rng(4);
    let a = random_vec(&mut g, 64, 1.5);
    let r = random_vec(&mut g, 64, 1.0);
    // Forward against the erf-free definition at a few points.
    let y = gelu_forward(&a);
    for (&x, &y) in a.iter().zip(&y) {
        let want = 0.5
            * x
            * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
        assert!((y - want).abs() < 1e-14);
    }
    let da = gelu_backward(&r, &a);
    let num = fd_grad(&a, |a| dot(&r, &gelu_forward(a)));
    check("gelu", &da, &num, 1e-8);
}

#[test]
fn swiglu_backward_matches_fd() {
    let mut g = rng(5);
    let n = 48;
    let gate = random_vec(&mut g, n, 1.5);
    let up = random_vec(&mut g, n, 1.0);
    let r = random_vec(&mut g, n, 1.0);
    let y = swiglu_forward(&gate, &up);
    for i in 0..n {
        let want = gate[i] / (1.0 + (-gate[i]).exp()) * up[i];
        assert!((y[i] - want).abs() < 1e-14);
    }
    let (d_gate, d_up) = swiglu_backward(&r, &gate, &up);
    check(
        "swiglu d_gate",
        &d_gate,
        &fd_grad(&gate, |gt| dot(&r, &swiglu_forward(gt, &up))),
        1e-8,
    );
    check(
        "swiglu d_up",
        &d_up,
        &fd_grad(&up, |u| dot(&r, &swiglu_forward(&gate, u))),
        1e-8,
    );
}

#[test]
fn rope_matches_rotate_half_and_backward_matches_fd() {
    let mut g = rng(6);
    let (b, h, t, d) = (2, 3, 4, 8);
    let positions: Vec<usize> = (0..b * t).map(|r| 5 + 3 * r).collect();
    let theta = 10000.0;
    let rope = Rope::<f64>::new(d, theta, &positions);
    let x = random_vec(&mut g, b * h * t * d, 1.0);
    let r = random_vec(&mut g, x.len(), 1.0);
    let mut y = x.clone();
    rope_forward(&mut y, h, t, &rope);
    // HF: q·cos + rotate_half(q)·sin with cos/sin of [freqs, freqs], rotate_half(x) = [-x2, x1].
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                let pos = positions[bi * t + ti] as f64;
                let o = ((bi * h + hi) * t + ti) * d;
                for j in 0..d {
                    let angle = pos * theta.powf(-((2 * (j % (d / 2))) as f64) / d as f64);
                    let rot = if j < d / 2 {
                        -x[o + j + d / 2]
                    } else {
                        x[o + j - d / 2]
                    };
                    let want = x[o + j] * angle.cos() + rot * angle.sin();
                    assert!(
                        (y[o + j] - want).abs() < 1e-12,
                        "rope value at {bi},{hi},{ti},{j}"
                    );
                }
            }
        }
    }
    let mut dx = r.clone();
    rope_backward(&mut dx, h, t, &rope);
    let num = fd_grad(&x, |x| {
        let mut y = x.to_vec();
        rope_forward(&mut y, h, t, &rope);
        dot(&r, &y)
    });
    check("rope", &dx, &num, 1e-8);
}

#[test]
fn cross_entropy_matches_log_softmax_and_fd() {
    let mut g = rng(7);
    let (rows, vocab) = (5, 11);
    let z = random_vec(&mut g, rows * vocab, 2.0);
    let targets = [Some(3), None, Some(10), Some(0), Some(3)];
    let losses = cross_entropy_forward(&z, &targets, vocab);
    for (i, t) in targets.iter().enumerate() {
        let zr = &z[i * vocab..(i + 1) * vocab];
        let want = match t {
            Some(t) => -(zr[*t as usize].exp() / zr.iter().map(|v| v.exp()).sum::<f64>()).ln(),
            None => 0.0,
        };
        assert!((losses[i] - want).abs() < 1e-12, "row {i}");
    }
    let scale = 0.37;
    let dz = cross_entropy_backward(&z, &targets, vocab, scale);
    let num = fd_grad(&z, |z| {
        scale
            * cross_entropy_forward(z, &targets, vocab)
                .iter()
                .sum::<f64>()
    });
    check("cross_entropy", &dz, &num, 1e-8);
    assert!(
        dz[vocab..2 * vocab].iter().all(|&v| v == 0.0),
        "no target, no gradient"
    );
}

/// A block context over a random padded batch with two prefixes.
struct BlockSetup {
    cfg: ModelConfig,
    model: ModelWeights<f64>,
    bank: PrefixBank<f64>,
    valid_len: Vec<usize>,
    prefix_index: Vec<usize>,
    rope: Option<Rope<f64>>,
    batch: usize,
    seq: usize,
}

impl BlockSetup {
    fn new(arch: Arch, seed: u64) -> Self {
        let cfg = tiny_config(arch, true);
        let model = random_model(&cfg, 0.3, seed);
        let bank = random_bank(&cfg, 2, 3, 0.5, seed + 1);
        let (batch, seq) = (3, 5);
        let positions: Vec<usize> = (0..batch * seq).map(|r| 3 + r % seq).collect();
        let rope =
            (arch == Arch::Llama).then(|| Rope::new(cfg.head_dim, cfg.rope_theta, &positions));
        BlockSetup {
            cfg,
            model,
            bank,
            valid_len: vec![5, 3, 4],
            prefix_index: vec![1, 0, 1],
            rope,
            batch,
            seq,
        }
    }
    fn ctx(&self) -> BlockCtx<'_, f64> {
        BlockCtx {
            cfg: &self.cfg,
            batch: self.batch,
            seq: self.seq,
            valid_len: &self.valid_len,
            prefix_index: &self.prefix_index,
            rope: self.rope.as_ref(),
        }
    }
}

fn attention_block_case(arch: Arch) {
    let s = BlockSetup::new(arch, 11);
    let ctx = s.ctx();
    let lw = &s.model.layers[1];
    let d = s.cfg.d_model;
    let mut g = rng(12);
    let x = random_vec(&mut g, ctx.rows() * d, 1.0);
    let r = random_vec(&mut g, ctx.rows() * d, 1.0);
    let pk = &s.bank.k[1];
    let pv = &s.bank.v[1];
    let lp = |k: &'_ [f64], v: &'_ [f64]| -> f64 {
        let prefix = LayerPrefix {
            k,
            v,
            n_prefixes: 2,
            len: 3,
        };
        dot(&r, &attention_block_forward(&ctx, lw, &prefix, &x).0)
    };
    let prefix = LayerPrefix {
        k: pk,
        v: pv,
        n_prefixes: 2,
        len: 3,
    };
    let (_, cache) = attention_block_forward(&ctx, lw, &prefix, &x);
    let grads = attention_block_backward(&ctx, lw, &prefix, &cache, &r, true);
    let num_x = fd_grad(&x, |x| {
        dot(&r, &attention_block_forward(&ctx, lw, &prefix, x).0)
    });
    check(
        &format!("{arch:?} attention block dx"),
        grads.dx.as_ref().unwrap(),
        &num_x,
        1e-7,
    );
    check(
        &format!("{arch:?} attention block d_prefix_k"),
        &grads.d_prefix_k,
        &fd_grad(pk, |k| lp(k, pv)),
        1e-7,
    );
    check(
        &format!("{arch:?} attention block d_prefix_v"),
        &grads.d_prefix_v,
        &fd_grad(pv, |v| lp(pk, v)),
        1e-7,
    );
    let without_dx = attention_block_backward(&ctx, lw, &prefix, &cache, &r, false);
    assert!(without_dx.dx.is_none());
    assert_eq!(without_dx.d_prefix_k, grads.d_prefix_k);
}

#[test]
fn attention_block_backward_matches_fd_gpt2() {
    attention_block_case(Arch::Gpt2);
}

#[test]
fn attention_block_backward_matches_fd_llama() {
    attention_block_case(Arch::Llama);
}

fn mlp_block_case(arch: Arch) {
    let s = BlockSetup::new(arch, 21);
    let lw = &s.model.layers[0];
    let d = s.cfg.d_model;
    let mut g = rng(22);
    let x = random_vec(&mut g, 6 * d, 1.0);
    let r = random_vec(&mut g, 6 * d, 1.0);
    let (_, cache) = mlp_block_forward(&s.cfg, lw, &x);
    let dx = mlp_block_backward(&s.cfg, lw, &cache, &r);
    let num = fd_grad(&x, |x| dot(&r, &mlp_block_forward(&s.cfg, lw, x).0));
    check(&format!("{arch:?} mlp block dx"), &dx, &num, 1e-7);
}

#[test]
fn mlp_block_backward_matches_fd_gpt2() {
    mlp_block_case(Arch::Gpt2);
}

#[test]
fn mlp_block_backward_matches_fd_llama() {
    mlp_block_case(Arch::Llama);
}

// ---------------------------------------------------------------------------------------------
// Whole model
// ---------------------------------------------------------------------------------------------

/// Flattens a bank (k then v, layer by layer) and back.
fn flatten(bank: &PrefixBank<f64>) -> Vec<f64> {
    let mut out = Vec::new();
    for l in 0..bank.n_layers {
        out.extend_from_slice(&bank.k[l]);
        out.extend_from_slice(&bank.v[l]);
    }
    out
}

fn unflatten(like: &PrefixBank<f64>, flat: &[f64]) -> PrefixBank<f64> {
    let mut bank = like.zeros_like();
    let n = bank.layer_len();
    for l in 0..bank.n_layers {
        bank.k[l] = flat[2 * l * n..(2 * l + 1) * n].to_vec();
        bank.v[l] = flat[(2 * l + 1) * n..(2 * l + 2) * n].to_vec();
    }
    bank
}

fn model_grad_case(arch: Arch, tied: bool, positions: Positions, seed: u64) {
    let cfg = tiny_config(arch, tied);
    let m = random_model(&cfg, 0.3, seed);
    let bank = random_bank(&cfg, 2, 3, 0.5, seed + 1);
    let batch = random_batch(&cfg, 3, 7, 2, seed + 2);
    assert!(
        batch.valid_len.iter().any(|&v| v < batch.seq),
        "the batch should be padded"
    );
    let opts = RunOptions { positions };
    let (out, grad) = loss_and_grad(&m, &bank, &batch, &opts);
    let plain = loss(&m, Some(&bank), &batch, &opts);
    assert_eq!(out, plain, "loss and loss_and_grad disagree");
    let flat = flatten(&bank);
    let num = fd_grad(&flat, |p| {
        loss(&m, Some(&unflatten(&bank, p)), &batch, &opts).mean_loss
    });
    let name = format!("{arch:?} tied={tied} {positions:?} model prefix grad");
    check(&name, &flatten(&grad), &num, 1e-6);
    // Both prefixes are used, so both get a gradient.
    let per_prefix = grad.layer_len() / 2;
    for p in 0..2 {
        let norm: f64 = grad.k[0][p * per_prefix..(p + 1) * per_prefix]
            .iter()
            .map(|v| v * v)
            .sum();
        assert!(norm > 0.0, "{name}: prefix {p} of layer 0 has no gradient");
    }
}

#[test]
fn model_grad_gpt2_after_prefix() {
    model_grad_case(Arch::Gpt2, true, Positions::AfterPrefix, 100);
}

#[test]
fn model_grad_gpt2_from_zero() {
    model_grad_case(Arch::Gpt2, true, Positions::FromZero, 110);
}

#[test]
fn model_grad_llama_tied_after_prefix() {
    model_grad_case(Arch::Llama, true, Positions::AfterPrefix, 120);
}

#[test]
fn model_grad_llama_untied_from_zero() {
    model_grad_case(Arch::Llama, false, Positions::FromZero, 130);
}

#[test]
fn model_grad_llama_untied_after_prefix() {
    model_grad_case(Arch::Llama, false, Positions::AfterPrefix, 140);
}

#[test]
fn empty_prefix_equals_no_prefix() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        let cfg = tiny_config(arch, true);
        let m = random_model(&cfg, 0.3, 200);
        let batch = random_batch(&cfg, 3, 6, 1, 201);
        let opts = RunOptions::default();
        let none = loss(&m, None, &batch, &opts);
        let empty = PrefixBank::<f64>::zeros(1, cfg.n_layers, cfg.n_kv_heads, 0, cfg.head_dim);
        let with_empty = loss(&m, Some(&empty), &batch, &opts);
        assert_eq!(none, with_empty, "{arch:?}");
        let (out, grad) = loss_and_grad(&m, &empty, &batch, &opts);
        assert!((out.mean_loss - none.mean_loss).abs() <= 1e-12 * none.mean_loss.abs());
        assert_eq!(grad, empty);
        // A real prefix changes the loss measurably.
        let bank = random_bank(&cfg, 1, 3, 0.5, 202);
        let with = loss(&m, Some(&bank), &batch, &opts).mean_loss;
        println!(
            "{arch:?}: loss without prefix {:.6}, with {with:.6}",
            none.mean_loss
        );
        assert!(
            (with - none.mean_loss).abs() > 1e-3,
            "{arch:?}: the prefix does not change the loss"
        );
    }
}

/// Cross-entropy of the full logits, computed here in f64 from the definition.
fn ce_from_logits(logits: &[f64], batch: &Batch, vocab: usize) -> (Vec<f64>, Vec<usize>) {
    let mut sums = vec![0.0; batch.batch];
    let mut counts = vec![0; batch.batch];
    for b in 0..batch.batch {
        for t in 0..batch.valid_len[b] {
            let r = b * batch.seq + t;
            if let Some(y) = batch.labels[r] {
                let z = &logits[r * vocab..(r + 1) * vocab];
                let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                sums[b] += lse - z[y as usize];
                counts[b] += 1;
            }
        }
    }
    (sums, counts)
}

#[test]
fn loss_equals_cross_entropy_of_logits() {
    for (arch, tied) in [(Arch::Gpt2, true), (Arch::Llama, false)] {
        let cfg = tiny_config(arch, tied);
        let m = random_model(&cfg, 0.3, 300);
        let bank = random_bank(&cfg, 2, 4, 0.5, 301);
        let batch = random_batch(&cfg, 4, 8, 2, 302);
        let opts = RunOptions::default();
        let lg = logits(&m, Some(&bank), &batch, &opts);
        assert_eq!(lg.len(), batch.rows() * cfg.vocab_size);
        let (sums, counts) = ce_from_logits(&lg, &batch, cfg.vocab_size);
        let out = loss(&m, Some(&bank), &batch, &opts);
        assert_eq!(out.n_targets, counts);
        let e = rel_err(&out.loss_sum, &sums);
        println!("{arch:?}: loss vs CE(logits) rel err {e:.2e}");
        assert!(e < 1e-12);
        let mean = sums.iter().sum::<f64>() / counts.iter().sum::<usize>() as f64;
        assert!((out.mean_loss - mean).abs() < 1e-12 * mean);
    }
}

#[test]
fn padding_and_mixed_prefixes_do_not_leak() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        let cfg = tiny_config(arch, true);
        let m = random_model(&cfg, 0.3, 400);
        let bank = random_bank(&cfg, 2, 3, 0.5, 401);
        let batch = random_batch(&cfg, 3, 7, 2, 402);
        let opts = RunOptions::default();
        let (out, grad) = loss_and_grad(&m, &bank, &batch, &opts);
        // Each sequence alone, unpadded, with its own prefix, gives the same loss sum.
        for b in 0..batch.batch {
            let v = batch.valid_len[b];
            let row = b * batch.seq;
            let single = Batch {
                batch: 1,
                seq: v,
                tokens: batch.tokens[row..row + v].to_vec(),
                labels: batch.labels[row..row + v].to_vec(),
                valid_len: vec![v],
                prefix_index: vec![batch.prefix_index[b]],
            };
            let alone = loss(&m, Some(&bank), &single, &opts);
            let e = (alone.loss_sum[0] - out.loss_sum[b]).abs() / out.loss_sum[b].abs();
            println!("{arch:?} sequence {b}: batched vs alone rel err {e:.2e}");
            assert!(e < 1e-12, "{arch:?} sequence {b}");
            assert_eq!(alone.n_targets[0], out.n_targets[b]);
        }
        // Changing padding tokens changes nothing.
        let mut noisy = batch.clone();
        for b in 0..batch.batch {
            for t in batch.valid_len[b]..batch.seq {
                noisy.tokens[b * batch.seq + t] = (7 * t as u32 + 3) % cfg.vocab_size as u32;
            }
        }
        let (out2, grad2) = loss_and_grad(&m, &bank, &noisy, &opts);
        assert_eq!(out.loss_sum, out2.loss_sum);
        assert!(rel_err(&flatten(&grad2), &flatten(&grad)) < 1e-14);
    }
}

#[test]
fn positions_modes_differ_and_gpt2_checks_range() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        let cfg = tiny_config(arch, true);
        let m = random_model(&cfg, 0.3, 500);
        let bank = random_bank(&cfg, 2, 3, 0.5, 501);
        let batch = random_batch(&cfg, 2, 6, 2, 502);
        let after = loss(
            &m,
            Some(&bank),
            &batch,
            &RunOptions {
                positions: Positions::AfterPrefix,
            },
        );
        let zero = loss(
            &m,
            Some(&bank),
            &batch,
            &RunOptions {
                positions: Positions::FromZero,
            },
        );
        assert!(
            (after.mean_loss - zero.mean_loss).abs() > 1e-6,
            "{arch:?}: positions have no effect"
        );
    }
    let cfg = tiny_config(Arch::Gpt2, true);
    assert!(check_positions(&cfg, 38, 2, Positions::AfterPrefix).is_ok());
    let err = check_positions(&cfg, 38, 3, Positions::AfterPrefix).unwrap_err();
    assert!(err.to_string().contains("40"), "{err}");
    assert!(check_positions(&cfg, 40, 3, Positions::FromZero).is_ok());
    assert!(check_positions(&cfg, 41, 0, Positions::FromZero).is_err());
    assert!(check_positions(
        &tiny_config(Arch::Llama, true),
        1000,
        10,
        Positions::AfterPrefix
    )
    .is_ok());
}

#[test]
fn f32_loss_agrees_with_f64() {
    for (arch, tied) in [
        (Arch::Gpt2, true),
        (Arch::Llama, true),
        (Arch::Llama, false),
    ] {
        let cfg = tiny_config(arch, tied);
        let m64 = random_model(&cfg, 0.3, 600);
        let bank64 = random_bank(&cfg, 2, 3, 0.5, 601);
        let batch = random_batch(&cfg, 3, 9, 2, 602);
        let m32: ModelWeights<f32> = m64.cast();
        let bank32: PrefixBank<f32> = bank64.cast();
        let opts = RunOptions::default();
        let (l32, g32) = loss_and_grad(&m32, &bank32, &batch, &opts);
        let (l64, g64) = loss_and_grad(&m64, &bank64, &batch, &opts);
        let e = (l32.mean_loss as f64 - l64.mean_loss).abs() / l64.mean_loss.abs();
        let flat32 = flatten(&g32.cast());
        let eg = rel_err(&flat32, &flatten(&g64));
        println!("{arch:?} tied={tied}: f32 vs f64 loss rel err {e:.2e}, grad rel err {eg:.2e}");
        assert!(e <= 1e-5);
        assert!(eg <= 1e-4);
    }
}

/// Running `a` and using its per-layer K/V as a prefix for `c` must give the logits of `a ++ c`
/// at `c`'s rows: the prefix convention (post-RoPE keys, positions after the prefix) is the KV
/// cache's.
#[test]
fn layer_kv_as_prefix_equals_longer_sequence() {
    for (arch, tied) in [(Arch::Gpt2, true), (Arch::Llama, false)] {
        let cfg = tiny_config(arch, tied);
        let m = random_model(&cfg, 0.3, 700);
        let full = random_batch(&cfg, 1, 9, 1, 701);
        let (na, nc) = (4, 5);
        let part = |from: usize, n: usize| Batch {
            batch: 1,
            seq: n,
            tokens: full.tokens[from..from + n].to_vec(),
            labels: vec![None; n],
            valid_len: vec![n],
            prefix_index: vec![0],
        };
        let (a, c) = (part(0, na), part(na, nc));
        let opts = RunOptions::default();
        let kv = layer_kv(&m, None, &a, &opts);
        assert_eq!(kv.len(), cfg.n_layers);
        let mut bank = PrefixBank::<f64>::zeros(1, cfg.n_layers, cfg.n_kv_heads, na, cfg.head_dim);
        for (l, (k, v)) in kv.into_iter().enumerate() {
            assert_eq!(k.len(), bank.layer_len());
            bank.k[l] = k;
            bank.v[l] = v;
        }
        let with_prefix = logits(&m, Some(&bank), &c, &opts);
        let whole = logits(&m, None, &full, &opts);
        let vocab = cfg.vocab_size;
        let e = rel_err(&with_prefix, &whole[na * vocab..(na + nc) * vocab]);
        println!("{arch:?}: K/V prefix vs longer sequence rel err {e:.2e}");
        assert!(e < 1e-12, "{arch:?}: {e}");
    }
}

#[test]
fn batch_from_pairs_labels_targets_only() {
    let b = Batch::from_pairs(
        &[(vec![5u32, 6, 7], vec![8u32, 9]), (vec![1], vec![2])],
        Some(60),
        0,
    );
    assert_eq!((b.batch, b.seq), (2, 6));
    assert_eq!(b.tokens, vec![5, 6, 7, 8, 9, 60, 1, 2, 60, 0, 0, 0]);
    assert_eq!(b.valid_len, vec![6, 3]);
    assert_eq!(
        b.labels,
        vec![
            None,
            None,
            Some(8),
            Some(9),
            Some(60),
            None,
            Some(2),
            Some(60),
            None,
            None,
            None,
            None
        ]
    );
    assert_eq!(b.n_targets(), vec![3, 2]);
    b.check(&tiny_config(Arch::Gpt2, true), 1).unwrap();
    assert!(b.check(&tiny_config(Arch::Llama, true), 1).is_ok());
    let bad = Batch::from_pairs(&[(vec![70u32], vec![1u32])], None, 0);
    assert!(bad.check(&tiny_config(Arch::Llama, true), 1).is_err());
}

// ---------------------------------------------------------------------------------------------
// HF transformers + PEFT oracle (tests/fixtures/oracle_*.json, made by tools/oracle/)
// ---------------------------------------------------------------------------------------------

fn oracle_case(name: &str) {
    use prefix_tune::model::load::load_model;
    use prefix_tune::prefix::peft::from_peft;
    use serde_json::Value;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let path = dir.join(format!("oracle_{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let o: Value = serde_json::from_str(&text).unwrap();
    let model = load_model(&dir.join(o["model_dir"].as_str().unwrap())).unwrap();
    let m32 = model.weights;
    let m64: ModelWeights<f64> = m32.cast();
    let cfg = m64.config.clone();
    let floats = |v: &Value| -> Vec<f64> {
        let mut out = Vec::new();
        fn walk(v: &Value, out: &mut Vec<f64>) {
            match v {
                Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
                x => out.push(x.as_f64().unwrap()),
            }
        }
        walk(v, &mut out);
        out
    };
    let (bsz, seq) = (
        o["batch"].as_u64().unwrap() as usize,
        o["seq"].as_u64().unwrap() as usize,
    );
    let tokens: Vec<u32> = floats(&o["tokens"]).iter().map(|&x| x as u32).collect();
    let labels: Vec<Option<u32>> = o["labels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_u64().map(|x| x as u32))
        })
        .collect();
    let valid_len: Vec<usize> = floats(&o["valid_len"])
        .iter()
        .map(|&x| x as usize)
        .collect();
    let batch = Batch {
        batch: bsz,
        seq,
        tokens,
        labels,
        valid_len,
        prefix_index: vec![0; bsz],
    };
    let bank64 = from_peft(
        &floats(&o["prompt_embeddings"]),
        cfg.n_layers,
        cfg.n_kv_heads,
        cfg.head_dim,
    );
    let bank32: PrefixBank<f32> = bank64.cast();
    let want_grad = from_peft(
        &floats(&o["prefix"]["grad_mean_loss"]),
        cfg.n_layers,
        cfg.n_kv_heads,
        cfg.head_dim,
    );
    let after = RunOptions::default();
    let zero = RunOptions {
        positions: Positions::FromZero,
    };
    let cases: [(&str, Option<&PrefixBank<f64>>, &RunOptions); 3] = [
        ("base", None, &after),
        ("prefix", Some(&bank64), &after),
        ("prefix_positions_from_zero", Some(&bank64), &zero),
    ];
    for (key, bank, opts) in cases {
        let want = floats(&o[key]["loss_sum"]);
        let got = loss(&m64, bank, &batch, opts);
        let e = rel_err(&got.loss_sum, &want);
        println!("{name} {key}: f64 loss_sum vs HF rel err {e:.2e}");
        assert!(e < 1e-9, "{name} {key}");
        let want_mean = o[key]["mean_loss"].as_f64().unwrap();
        assert!((got.mean_loss - want_mean).abs() < 1e-9 * want_mean);
        let bank32_opt = bank.map(|_| &bank32);
        let got32 = loss(&m32, bank32_opt, &batch, opts);
        let e32 = rel_err(&got32.loss_sum, &want);
        println!("{name} {key}: f32 loss_sum vs HF rel err {e32:.2e}");
        assert!(e32 <= 1e-5, "{name} {key} f32");
    }
    let (_, g64) = loss_and_grad(&m64, &bank64, &batch, &after);
    let eg = rel_err(&flatten(&g64), &flatten(&want_grad));
    let (_, g32) = loss_and_grad(&m32, &bank32, &batch, &after);
    let flat32 = flatten(&g32.cast());
    let eg32 = rel_err(&flat32, &flatten(&want_grad));
    println!("{name}: prefix grad vs PEFT rel err f64 {eg:.2e}, f32 {eg32:.2e}");
    assert!(eg < 1e-8);
    assert!(eg32 <= 1e-4);
    // Sampled logits: [b, t, v, value].
    for (key, bank) in [("base", None), ("prefix", Some(&bank64))] {
        let lg = logits(&m64, bank, &batch, &after);
        for s in o[key]["logits_samples"].as_array().unwrap() {
            let s = floats(s);
            let (b, t, v) = (s[0] as usize, s[1] as usize, s[2] as usize);
            let got = lg[(b * seq + t) * cfg.vocab_size + v];
            assert!(
                (got - s[3]).abs() < 1e-9 * (1.0 + s[3].abs()),
                "{name} {key} logit {b},{t},{v}: {got} vs {}",
                s[3]
            );
        }
    }
}

#[test]
fn gpt2_matches_hf_peft_oracle() {
    oracle_case("gpt2");
}

#[test]
fn llama_matches_hf_peft_oracle() {
    oracle_case("llama");
}

#[test]
fn empty_batch_gives_zero_loss() {
    let cfg = tiny_config(Arch::Llama, true);
    let m = random_model(&cfg, 0.3, 800);
    let bank = random_bank(&cfg, 1, 3, 0.5, 801);
    let opts = RunOptions::default();
    let no_pairs: &[(Vec<u32>, Vec<u32>)] = &[];
    for batch in [
        Batch::from_pairs(no_pairs, None, 0),
        Batch::from_pairs(&[(vec![], vec![])], None, 0),
    ] {
        let (out, grad) = loss_and_grad(&m, &bank, &batch, &opts);
        assert_eq!(out.mean_loss, 0.0);
        assert_eq!(grad, bank.zeros_like());
        assert!(logits(&m, Some(&bank), &batch, &opts).is_empty());
        assert_eq!(layer_kv(&m, Some(&bank), &batch, &opts).len(), cfg.n_layers);
    }
}
