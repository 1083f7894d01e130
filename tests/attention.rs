//! Tests of prefix attention: the plain reference against finite differences, the blockwise
//! (kernel-shaped) version against the plain one, precision, padding and prefix-sharing rules.
//!
//! Everything runs in f64 unless a test says otherwise; inputs are fresh seeded N(0, 1) draws.

// Index loops over (batch, head, position) read like the layout formulas they check.
#![allow(clippy::needless_range_loop)]

use prefix_tune::reference::attention::{self as plain, AttnGrads, AttnInputs, AttnShape};
use prefix_tune::reference::blockwise::{self, BlockSizes};
use prefix_tune::reference::real::{cast, rel_err, Real};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

/// Owned inputs of one attention call.
#[derive(Clone, Debug)]
struct Case<T> {
    s: AttnShape,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    pk: Vec<T>,
    pv: Vec<T>,
    prefix_index: Vec<usize>,
    valid_len: Vec<usize>,
    scale: T,
}

impl<T: Real> Case<T> {
    fn inputs(&self) -> AttnInputs<'_, T> {
        AttnInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            prefix_k: &self.pk,
            prefix_v: &self.pv,
            prefix_index: &self.prefix_index,
            valid_len: &self.valid_len,
            scale: self.scale,
        }
    }

    fn cast<U: Real>(&self) -> Case<U> {
        Case {
            s: self.s,
            q: cast(&self.q),
            k: cast(&self.k),
            v: cast(&self.v),
            pk: cast(&self.pk),
            pv: cast(&self.pv),
            prefix_index: self.prefix_index.clone(),
            valid_len: self.valid_len.clone(),
            scale: U::of(self.scale.f64()),
        }
    }
}

fn normal(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| rng.sample::<f64, _>(StandardNormal))
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn shape(
    batch: usize,
    q_heads: usize,
    kv_heads: usize,
    seq: usize,
    prefix: usize,
    head_dim: usize,
    n_prefixes: usize,
) -> AttnShape {
    AttnShape {
        batch,
        q_heads,
        kv_heads,
        seq,
        prefix,
        head_dim,
        n_prefixes,
    }
}

fn random_case(
    rng: &mut StdRng,
    s: AttnShape,
    prefix_index: &[usize],
    valid_len: &[usize],
) -> Case<f64> {
    Case {
        s,
        q: normal(rng, s.q_len()),
        k: normal(rng, s.kv_len()),
        v: normal(rng, s.kv_len()),
        pk: normal(rng, s.bank_len()),
        pv: normal(rng, s.bank_len()),
        prefix_index: prefix_index.to_vec(),
        valid_len: valid_len.to_vec(),
        scale: 1.0 / (s.head_dim as f64).sqrt(),
    }
}

/// Plain forward and backward with `dO = r`.
fn plain_all<T: Real>(c: &Case<T>, r: &[T]) -> (Vec<T>, Vec<T>, AttnGrads<T>) {
    let inp = c.inputs();
    let (o, lse) = plain::forward(&c.s, &inp);
    let g = plain::backward(&c.s, &inp, &o, &lse, r);
    (o, lse, g)
}

/// Blockwise forward and backward with `dO = r`.
fn blockwise_all<T: Real>(c: &Case<T>, r: &[T], bs: BlockSizes) -> (Vec<T>, Vec<T>, AttnGrads<T>) {
    let inp = c.inputs();
    let (o, lse) = blockwise::forward(&c.s, &inp, bs);
    let g = blockwise::backward(&c.s, &inp, &o, &lse, r, bs);
    (o, lse, g)
}

/// Relative errors of every output and gradient, named.
fn all_errors<A: Real, B: Real>(
    a: &(Vec<A>, Vec<A>, AttnGrads<A>),
    b: &(Vec<B>, Vec<B>, AttnGrads<B>),
) -> [(&'static str, f64); 7] {
    [
        ("O", rel_err(&a.0, &b.0)),
        ("LSE", rel_err(&a.1, &b.1)),
        ("dQ", rel_err(&a.2.dq, &b.2.dq)),
        ("dK", rel_err(&a.2.dk, &b.2.dk)),
        ("dV", rel_err(&a.2.dv, &b.2.dv)),
        ("dPrefixK", rel_err(&a.2.d_prefix_k, &b.2.d_prefix_k)),
        ("dPrefixV", rel_err(&a.2.d_prefix_v, &b.2.d_prefix_v)),
    ]
}

// ---------------------------------------------------------------------------------------------
// Finite differences for the plain backward.

/// The loss Σ O∘R of the plain forward.
fn loss(c: &Case<f64>, r: &[f64]) -> f64 {
    let (o, _) = plain::forward(&c.s, &c.inputs());
    o.iter().zip(r).map(|(a, b)| a * b).sum()
}

/// Central finite differences of the loss with respect to every element of one input buffer.
/// Selects one input buffer of a case.
type Buffer = fn(&mut Case<f64>) -> &mut Vec<f64>;

fn fd_grad(c: &Case<f64>, r: &[f64], which: Buffer) -> Vec<f64> {
    let h = 1e-5;
    let mut c = c.clone();
    let n = which(&mut c).len();
    (0..n)
        .map(|i| {
            let x0 = which(&mut c)[i];
            which(&mut c)[i] = x0 + h;
            let lp = loss(&c, r);
            which(&mut c)[i] = x0 - h;
            let lm = loss(&c, r);
            which(&mut c)[i] = x0;
            (lp - lm) / (2.0 * h)
        })
        .collect()
}

fn check_finite_differences(seed: u64, s: AttnShape, prefix_index: &[usize], valid_len: &[usize]) {
    let mut rng = StdRng::seed_from_u64(seed);
    let c = random_case(&mut rng, s, prefix_index, valid_len);
    let r = normal(&mut rng, s.q_len());
    let (_, _, g) = plain_all(&c, &r);
    let checks: [(&str, &Vec<f64>, Buffer); 5] = [
        ("dQ", &g.dq, |c| &mut c.q),
        ("dK", &g.dk, |c| &mut c.k),
        ("dV", &g.dv, |c| &mut c.v),
        ("dPrefixK", &g.d_prefix_k, |c| &mut c.pk),
        ("dPrefixV", &g.d_prefix_v, |c| &mut c.pv),
    ];
    for (name, analytic, which) in checks {
        let fd = fd_grad(&c, &r, which);
        let err = rel_err(analytic, &fd);
        let worst = analytic
            .iter()
            .zip(&fd)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        println!("{s:?} valid {valid_len:?}: {name} rel err {err:.2e}, worst abs {worst:.2e}");
        assert!(
            err < 1e-6,
            "{name}: analytic vs finite differences rel err {err:.3e} for {s:?}, valid {valid_len:?}"
        );
        // The gradient must not be trivially zero (unless the buffer is empty).
        if !fd.is_empty() {
            assert!(
                fd.iter().any(|&x| x.abs() > 1e-3),
                "{name}: all-zero gradient"
            );
        }
    }
}

#[test]
fn plain_backward_matches_finite_differences_gqa_two_prefixes_padding() {
    // Hq=4, Hkv=2; two prefixes used by different sequences; valid lengths T, < T, 0 and 1.
    check_finite_differences(1, shape(4, 4, 2, 5, 3, 4, 2), &[1, 0, 1, 0], &[5, 3, 0, 1]);
}

#[test]
fn plain_backward_matches_finite_differences_mha() {
    // Hq = Hkv, prefix longer than the sequence, a prefix nobody uses.
    check_finite_differences(2, shape(2, 3, 3, 4, 6, 5, 3), &[2, 0], &[4, 2]);
}

#[test]
fn plain_backward_matches_finite_differences_no_prefix() {
    check_finite_differences(3, shape(2, 4, 2, 6, 0, 4, 1), &[0, 0], &[6, 4]);
}

#[test]
fn plain_backward_matches_finite_differences_single_token() {
    check_finite_differences(4, shape(3, 4, 1, 1, 2, 3, 2), &[0, 1, 1], &[1, 1, 0]);
}

// ---------------------------------------------------------------------------------------------
// Blockwise against plain.

fn check_blockwise(c: &Case<f64>, r: &[f64], bs: BlockSizes) -> f64 {
    let want = plain_all(c, r);
    let got = blockwise_all(c, r, bs);
    let mut worst = 0.0f64;
    for (name, err) in all_errors(&got, &want) {
        assert!(
            err <= 1e-12,
            "blockwise {name} rel err {err:.3e} for {:?}, valid {:?}, prefixes {:?}, {bs:?}",
            c.s,
            c.valid_len,
            c.prefix_index
        );
        worst = worst.max(err);
    }
    worst
}

#[test]
fn blockwise_matches_plain_on_chosen_shapes() {
    let mut rng = StdRng::seed_from_u64(10);
    let bs_list = [
        BlockSizes { q: 1, k: 1 },
        BlockSizes { q: 4, k: 4 },
        BlockSizes { q: 3, k: 5 },
        BlockSizes { q: 16, k: 16 },
        BlockSizes { q: 64, k: 64 },
        BlockSizes { q: 16, k: 64 },
        BlockSizes { q: 64, k: 16 },
    ];
    // (shape, prefix_index, valid_len)
    let cases: Vec<(AttnShape, Vec<usize>, Vec<usize>)> = vec![
        // P < block, T not a multiple of the blocks.
        (shape(2, 4, 2, 37, 5, 8, 2), vec![1, 0], vec![37, 20]),
        // P spanning several blocks, D = 16.
        (shape(2, 2, 1, 19, 50, 16, 2), vec![0, 1], vec![19, 1]),
        // P = 0, D = 64, SmolLM2-like grouping.
        (shape(1, 9, 3, 70, 0, 64, 1), vec![0], vec![65]),
        // P = 10, D = 64, padding to 0 and to 1.
        (shape(3, 3, 3, 33, 10, 64, 2), vec![1, 1, 0], vec![0, 1, 33]),
        // T = 1.
        (shape(2, 2, 2, 1, 7, 8, 1), vec![0, 0], vec![1, 0]),
    ];
    let mut worst = 0.0f64;
    for (s, pi, vl) in cases {
        let c = random_case(&mut rng, s, &pi, &vl);
        let r = normal(&mut rng, s.q_len());
        for bs in bs_list {
            worst = worst.max(check_blockwise(&c, &r, bs));
        }
    }
    println!("blockwise vs plain, chosen shapes: worst rel err {worst:.2e}");
}

#[test]
fn blockwise_matches_plain_on_random_shapes() {
    let mut rng = StdRng::seed_from_u64(11);
    let mut worst = 0.0f64;
    for _ in 0..60 {
        let kv_heads = rng.random_range(1..=3);
        let group = rng.random_range(1..=3);
        let batch = rng.random_range(1..=3);
        let seq = rng.random_range(1..=48);
        let prefix = [0, 1, 3, 9, 17, 40][rng.random_range(0..6)];
        let head_dim = [8, 16, 64][rng.random_range(0..3)];
        let n_prefixes = rng.random_range(1..=3);
        let s = shape(
            batch,
            kv_heads * group,
            kv_heads,
            seq,
            prefix,
            head_dim,
            n_prefixes,
        );
        let pi: Vec<usize> = (0..batch)
            .map(|_| rng.random_range(0..n_prefixes))
            .collect();
        let vl: Vec<usize> = (0..batch)
            .map(|_| {
                if rng.random_bool(0.5) {
                    seq
                } else {
                    rng.random_range(0..=seq)
                }
            })
            .collect();
        let bs = BlockSizes {
            q: [1, 2, 5, 8, 16, 64][rng.random_range(0..6)],
            k: [1, 3, 4, 8, 16, 64][rng.random_range(0..6)],
        };
        let c = random_case(&mut rng, s, &pi, &vl);
        let r = normal(&mut rng, s.q_len());
        worst = worst.max(check_blockwise(&c, &r, bs));
    }
    println!("blockwise vs plain, 60 random shapes: worst rel err {worst:.2e}");
}

#[test]
fn blockwise_is_deterministic() {
    let mut rng = StdRng::seed_from_u64(12);
    let s = shape(4, 4, 2, 29, 13, 16, 2);
    let c = random_case(&mut rng, s, &[0, 1, 0, 0], &[29, 17, 29, 5]);
    let r = normal(&mut rng, s.q_len());
    let bs = BlockSizes { q: 8, k: 4 };
    let a = blockwise_all(&c, &r, bs);
    for _ in 0..3 {
        assert_eq!(
            blockwise_all(&c, &r, bs),
            a,
            "blockwise attention is not deterministic"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Precision.

#[test]
fn f32_matches_f64() {
    let mut rng = StdRng::seed_from_u64(20);
    let s = shape(3, 9, 3, 40, 10, 64, 2);
    let c64 = random_case(&mut rng, s, &[1, 0, 1], &[40, 27, 1]);
    let r64 = normal(&mut rng, s.q_len());
    let c32: Case<f32> = c64.cast();
    let r32: Vec<f32> = cast(&r64);
    let want = plain_all(&c64, &r64);
    let bs = BlockSizes { q: 16, k: 16 };
    for (what, got) in [
        ("plain", plain_all(&c32, &r32)),
        ("blockwise", blockwise_all(&c32, &r32, bs)),
    ] {
        for (name, err) in all_errors(&got, &want) {
            println!("{what} f32 vs f64: {name} rel err {err:.2e}");
            assert!(err < 1e-5, "{what} f32 {name} rel err {err:.3e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Padding rows.

#[test]
fn padding_rows_are_zero_and_inert() {
    let mut rng = StdRng::seed_from_u64(30);
    let s = shape(3, 4, 2, 11, 4, 8, 2);
    let valid = [11, 6, 0];
    let c = random_case(&mut rng, s, &[0, 1, 0], &valid);
    let r = normal(&mut rng, s.q_len());
    let d = s.head_dim;

    // The same inputs with everything in padding positions redrawn.
    let mut c2 = c.clone();
    let mut r2 = r.clone();
    for b in 0..s.batch {
        for t in valid[b]..s.seq {
            for h in 0..s.q_heads {
                let row = ((b * s.q_heads + h) * s.seq + t) * d;
                for x in 0..d {
                    c2.q[row + x] = rng.sample(StandardNormal);
                    r2[row + x] = rng.sample(StandardNormal);
                }
            }
            for h in 0..s.kv_heads {
                let row = ((b * s.kv_heads + h) * s.seq + t) * d;
                for x in 0..d {
                    c2.k[row + x] = rng.sample(StandardNormal);
                    c2.v[row + x] = rng.sample(StandardNormal);
                }
            }
        }
    }
    assert_ne!(c.q, c2.q);

    let bs = BlockSizes { q: 4, k: 3 };
    let runs = [
        ("plain", plain_all(&c, &r), plain_all(&c2, &r2)),
        (
            "blockwise",
            blockwise_all(&c, &r, bs),
            blockwise_all(&c2, &r2, bs),
        ),
    ];
    for (what, a, b2) in runs {
        let (o, lse, g) = &a;
        for b in 0..s.batch {
            for h in 0..s.q_heads {
                for t in 0..s.seq {
                    let row = (b * s.q_heads + h) * s.seq + t;
                    let padded = t >= valid[b];
                    let o_row = &o[row * d..(row + 1) * d];
                    let dq_row = &g.dq[row * d..(row + 1) * d];
                    if padded {
                        assert!(o_row.iter().all(|&x| x == 0.0), "{what}: O of padding row");
                        assert_eq!(lse[row], 0.0, "{what}: LSE of padding row");
                        assert!(
                            dq_row.iter().all(|&x| x == 0.0),
                            "{what}: dQ of padding row"
                        );
                    } else {
                        assert!(o_row.iter().any(|&x| x != 0.0), "{what}: O of a valid row");
                        assert!(lse[row] != 0.0, "{what}: LSE of a valid row");
                    }
                }
            }
            for h in 0..s.kv_heads {
                for t in valid[b]..s.seq {
                    let row = ((b * s.kv_heads + h) * s.seq + t) * d;
                    assert!(
                        g.dk[row..row + d].iter().all(|&x| x == 0.0),
                        "{what}: dK pad"
                    );
                    assert!(
                        g.dv[row..row + d].iter().all(|&x| x == 0.0),
                        "{what}: dV pad"
                    );
                }
            }
        }
        // Redrawing padded Q, K, V and dO changes nothing at all.
        assert_eq!(a, b2, "{what}: padding positions influenced the results");
    }
}

// ---------------------------------------------------------------------------------------------
// Prefix gradients of sequences sharing a prefix.

/// The inputs of sequence `b` alone, as a batch of one (same prefix bank).
fn single(c: &Case<f64>, r: &[f64], b: usize) -> (Case<f64>, Vec<f64>) {
    let s1 = AttnShape { batch: 1, ..c.s };
    let (ql, kl) = (s1.q_len(), s1.kv_len());
    let c1 = Case {
        s: s1,
        q: c.q[b * ql..(b + 1) * ql].to_vec(),
        k: c.k[b * kl..(b + 1) * kl].to_vec(),
        v: c.v[b * kl..(b + 1) * kl].to_vec(),
        pk: c.pk.clone(),
        pv: c.pv.clone(),
        prefix_index: vec![c.prefix_index[b]],
        valid_len: vec![c.valid_len[b]],
        scale: c.scale,
    };
    (c1, r[b * ql..(b + 1) * ql].to_vec())
}

#[test]
fn shared_prefix_gradient_is_the_sum_over_sequences() {
    let mut rng = StdRng::seed_from_u64(40);
    let s = shape(3, 4, 2, 9, 5, 8, 2);
    // Sequences 0 and 2 share prefix 1; sequence 1 uses prefix 0.
    let c = random_case(&mut rng, s, &[1, 0, 1], &[9, 7, 4]);
    let r = normal(&mut rng, s.q_len());
    type Run = fn(&Case<f64>, &[f64]) -> (Vec<f64>, Vec<f64>, AttnGrads<f64>);
    let runs: [(&str, Run); 2] = [
        ("plain", |c, r| plain_all(c, r)),
        ("blockwise", |c, r| {
            blockwise_all(c, r, BlockSizes { q: 4, k: 2 })
        }),
    ];
    for (what, run) in runs {
        let (_, _, g) = run(&c, &r);
        let mut sum_k = vec![0.0; s.bank_len()];
        let mut sum_v = vec![0.0; s.bank_len()];
        let mut per_seq_k = Vec::new();
        for b in 0..s.batch {
            let (c1, r1) = single(&c, &r, b);
            let (_, _, g1) = run(&c1, &r1);
            sum_k
                .iter_mut()
                .zip(&g1.d_prefix_k)
                .for_each(|(y, x)| *y += x);
            sum_v
                .iter_mut()
                .zip(&g1.d_prefix_v)
                .for_each(|(y, x)| *y += x);
            per_seq_k.push(g1.d_prefix_k);
        }
        let (ek, ev) = (
            rel_err(&g.d_prefix_k, &sum_k),
            rel_err(&g.d_prefix_v, &sum_v),
        );
        println!("{what}: shared prefix gradient vs per-sequence sum: dK {ek:.2e}, dV {ev:.2e}");
        assert!(ek < 1e-13 && ev < 1e-13, "{what}: dK {ek:.3e}, dV {ev:.3e}");
        // Both sharing sequences really contribute to prefix 1's gradient.
        let half = s.bank_len() / 2;
        let (e0, e2) = (
            rel_err(&per_seq_k[0][half..], &g.d_prefix_k[half..]),
            rel_err(&per_seq_k[2][half..], &g.d_prefix_k[half..]),
        );
        assert!(
            e0 > 1e-3 && e2 > 1e-3,
            "{what}: one sequence dominates the sum"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax sanity.

#[test]
fn equal_scores_average_the_visible_values() {
    let mut rng = StdRng::seed_from_u64(50);
    let s = shape(2, 4, 2, 7, 3, 8, 2);
    let mut c = random_case(&mut rng, s, &[1, 0], &[7, 5]);
    let d = s.head_dim;
    // Every key row (prefix and sequence) of every kv head is the same vector, so every score of
    // a query row is equal and the softmax is uniform over the visible keys.
    let key = normal(&mut rng, d);
    for row in c.k.chunks_mut(d).chain(c.pk.chunks_mut(d)) {
        row.copy_from_slice(&key);
    }
    let bs = BlockSizes { q: 2, k: 2 };
    let outs = [
        ("plain", plain::forward(&s, &c.inputs())),
        ("blockwise", blockwise::forward(&s, &c.inputs(), bs)),
    ];
    for (what, (o, lse)) in outs {
        let mut worst = 0.0f64;
        for b in 0..s.batch {
            let pi = c.prefix_index[b];
            for h in 0..s.q_heads {
                let hk = h / s.group();
                for t in 0..c.valid_len[b] {
                    // Mean of the visible values: the prefix rows, then sequence rows 0..=t.
                    let mut mean = vec![0.0; d];
                    let pre = (pi * s.kv_heads + hk) * s.prefix * d;
                    let seq = (b * s.kv_heads + hk) * s.seq * d;
                    let rows = c.pv[pre..pre + s.prefix * d]
                        .chunks(d)
                        .chain(c.v[seq..seq + (t + 1) * d].chunks(d));
                    let n = (s.prefix + t + 1) as f64;
                    for vrow in rows {
                        mean.iter_mut().zip(vrow).for_each(|(m, x)| *m += x / n);
                    }
                    let row = (b * s.q_heads + h) * s.seq + t;
                    worst = worst.max(rel_err(&o[row * d..(row + 1) * d], &mean));
                    // LSE = score + ln(number of visible keys).
                    let qrow = &c.q[row * d..(row + 1) * d];
                    let score: f64 =
                        qrow.iter().zip(&key).map(|(a, b)| a * b).sum::<f64>() * c.scale;
                    let want_lse = score + n.ln();
                    worst = worst.max((lse[row] - want_lse).abs() / want_lse.abs().max(1.0));
                }
            }
        }
        println!("{what}: uniform softmax worst rel err {worst:.2e}");
        assert!(worst < 1e-13, "{what}: uniform softmax rel err {worst:.3e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Plain forward against a naive row-by-row oracle written from the definition.

/// O and LSE of one query row straight from the definition: softmax over
/// `[prefix ++ sequence[0..=t]]` of `scale·q·k`, weighted sum of the values.
fn naive_row(c: &Case<f64>, b: usize, h: usize, t: usize) -> (Vec<f64>, f64) {
    let s = c.s;
    let d = s.head_dim;
    let hk = h / (s.q_heads / s.kv_heads);
    let pi = c.prefix_index[b];
    let row = ((b * s.q_heads + h) * s.seq + t) * d;
    let q = &c.q[row..row + d];
    let mut keys: Vec<(&[f64], &[f64])> = Vec::new();
    for j in 0..s.prefix {
        let r = ((pi * s.kv_heads + hk) * s.prefix + j) * d;
        keys.push((&c.pk[r..r + d], &c.pv[r..r + d]));
    }
    for j in 0..=t {
        let r = ((b * s.kv_heads + hk) * s.seq + j) * d;
        keys.push((&c.k[r..r + d], &c.v[r..r + d]));
    }
    let sc: Vec<f64> = keys
        .iter()
        .map(|(k, _)| c.scale * q.iter().zip(*k).map(|(a, b)| a * b).sum::<f64>())
        .collect();
    let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
    let mut o = vec![0.0; d];
    for (x, (_, v)) in sc.iter().zip(&keys) {
        let w = (x - m).exp() / z;
        o.iter_mut().zip(*v).for_each(|(o, v)| *o += w * v);
    }
    (o, m + z.ln())
}

#[test]
fn plain_forward_matches_naive_definition() {
    let mut rng = StdRng::seed_from_u64(60);
    let mut worst = 0.0f64;
    for (s, pi, vl) in [
        (shape(3, 4, 2, 13, 5, 8, 2), vec![1, 0, 1], vec![13, 6, 0]),
        (shape(2, 9, 3, 20, 10, 64, 1), vec![0, 0], vec![20, 1]),
        (shape(1, 2, 2, 9, 0, 16, 1), vec![0], vec![8]),
    ] {
        let c = random_case(&mut rng, s, &pi, &vl);
        let (o, lse) = plain::forward(&s, &c.inputs());
        let d = s.head_dim;
        for b in 0..s.batch {
            for h in 0..s.q_heads {
                for t in 0..vl[b] {
                    let (o_want, lse_want) = naive_row(&c, b, h, t);
                    let row = (b * s.q_heads + h) * s.seq + t;
                    worst = worst.max(rel_err(&o[row * d..(row + 1) * d], &o_want));
                    worst = worst.max((lse[row] - lse_want).abs() / lse_want.abs().max(1.0));
                }
            }
        }
    }
    println!("plain forward vs naive definition: worst rel err {worst:.2e}");
    assert!(worst < 1e-13, "plain forward vs naive: {worst:.3e}");
}
