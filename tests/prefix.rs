//! Prefix parameters: PEFT layout mapping, bank data movement, the reparameterization's backward
//! (finite differences in f64), initialization from keys/values, prefix files (round trip and
//! every refusal), and PEFT adapter import/export (against a PEFT-saved fixture).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use prefix_tune::model::{Arch, ModelConfig};
use prefix_tune::prefix::file::load_prefix_for;
use prefix_tune::prefix::peft::peft_width;
use prefix_tune::prefix::{
    check_compatible, export_peft_adapter, from_peft, import_peft_adapter, load_prefix,
    save_prefix, to_peft, Positions, PrefixBank, PrefixMeta, Reparam,
};
use prefix_tune::reference::init::bank_from_kv;
use prefix_tune::reference::real::rel_err;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A value that names its PEFT coordinates (prefix row p, slot s, head h, dim d).
fn code(p: usize, s: usize, h: usize, d: usize) -> f64 {
    (p * 1_000_000 + s * 10_000 + h * 100 + d) as f64 + 0.5
}

fn coded_peft(p_n: usize, n_layers: usize, h_n: usize, d_n: usize) -> Vec<f64> {
    let mut x = Vec::new();
    for p in 0..p_n {
        for s in 0..2 * n_layers {
            for h in 0..h_n {
                for d in 0..d_n {
                    x.push(code(p, s, h, d));
                }
            }
        }
    }
    x
}

fn random_vec(n: usize, rng: &mut StdRng) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

#[test]
fn peft_tensor_lands_in_the_right_bank_element() {
    let (p_n, l_n, h_n, d_n) = (4, 3, 2, 5);
    let x = coded_peft(p_n, l_n, h_n, d_n);
    assert_eq!(x.len(), p_n * peft_width(l_n, h_n, d_n));
    let bank = from_peft(&x, l_n, h_n, d_n);
    assert_eq!((bank.n_prefixes, bank.len), (1, p_n));
    for l in 0..l_n {
        for h in 0..h_n {
            for p in 0..p_n {
                for d in 0..d_n {
                    let at = (h * p_n + p) * d_n + d;
                    assert_eq!(bank.k[l][at], code(p, 2 * l, h, d), "K l{l} h{h} p{p} d{d}");
                    assert_eq!(
                        bank.v[l][at],
                        code(p, 2 * l + 1, h, d),
                        "V l{l} h{h} p{p} d{d}"
                    );
                }
            }
        }
    }
    assert_eq!(to_peft(&bank, 0), x);
}

#[test]
fn multi_prefix_banks_stack_select_and_map_each_prefix() {
    let (p_n, l_n, h_n, d_n) = (3, 2, 2, 4);
    let mut rng = StdRng::seed_from_u64(11);
    let singles: Vec<PrefixBank<f64>> = (0..3)
        .map(|_| {
            from_peft(
                &random_vec(p_n * peft_width(l_n, h_n, d_n), &mut rng),
                l_n,
                h_n,
                d_n,
            )
        })
        .collect();
    let bank = PrefixBank::stack(&singles).unwrap();
    assert_eq!(bank.n_prefixes, 3);
    for (i, one) in singles.iter().enumerate() {
        assert_eq!(&bank.select(i), one);
        assert_eq!(to_peft(&bank, i), to_peft(one, 0));
        // Bank layout [n_prefixes, kv_heads, P, D]: prefix i's block of a layer.
        let per = h_n * p_n * d_n;
        assert_eq!(&bank.k[1][i * per..(i + 1) * per], &one.k[1][..]);
    }
    // set_prefix overwrites exactly one prefix.
    let mut edited = bank.clone();
    edited.set_prefix(1, &singles[0]);
    assert_eq!(edited.select(0), singles[0]);
    assert_eq!(edited.select(1), singles[0]);
    assert_eq!(edited.select(2), singles[2]);
    // Stacking different shapes is refused.
    let other = PrefixBank::<f64>::zeros(1, l_n, h_n, p_n + 1, d_n);
    assert!(PrefixBank::stack(&[singles[0].clone(), other]).is_err());
    assert!(PrefixBank::<f64>::stack(&[]).is_err());
    // Flatten round trip.
    let flat = bank.to_flat();
    assert_eq!(flat.len(), bank.n_params());
    let mut back = bank.zeros_like();
    back.copy_from_flat(&flat);
    assert_eq!(back, bank);
}

/// The layout map is a permutation, so it maps gradients too: for a linear loss
/// L = ⟨bank, G⟩, dL/d(peft) = to_peft(G).
#[test]
fn gradient_mapping_is_the_same_permutation() {
    let (p_n, l_n, h_n, d_n) = (5, 2, 3, 2);
    let mut rng = StdRng::seed_from_u64(12);
    let x = random_vec(p_n * peft_width(l_n, h_n, d_n), &mut rng);
    let g = from_peft(&random_vec(x.len(), &mut rng), l_n, h_n, d_n);
    let loss = |x: &[f64]| -> f64 {
        let b = from_peft(x, l_n, h_n, d_n);
        b.to_flat()
            .iter()
            .zip(g.to_flat())
            .map(|(a, b)| a * b)
            .sum()
    };
    let eps = 1e-3;
    let fd: Vec<f64> = (0..x.len())
        .map(|j| {
            let mut xp = x.clone();
            let mut xm = x.clone();
            xp[j] += eps;
            xm[j] -= eps;
            (loss(&xp) - loss(&xm)) / (2.0 * eps)
        })
        .collect();
    let e = rel_err(&to_peft(&g, 0), &fd);
    assert!(e < 1e-9, "rel err {e:e}");
}

#[test]
fn random_bank_has_requested_spread_and_is_seeded() {
    let a = PrefixBank::<f64>::random(2, 3, 2, 10, 16, 0.02, 5);
    let b = PrefixBank::<f64>::random(2, 3, 2, 10, 16, 0.02, 5);
    let c = PrefixBank::<f64>::random(2, 3, 2, 10, 16, 0.02, 6);
    assert_eq!(a, b);
    assert_ne!(a, c);
    let flat = a.to_flat();
    let n = flat.len() as f64;
    let mean = flat.iter().sum::<f64>() / n;
    let std = (flat.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(mean.abs() < 0.002, "mean {mean}");
    assert!((std - 0.02).abs() < 0.001, "std {std}");
}

fn small_reparam(seed: u64) -> Reparam<f64> {
    // L=2, kv_heads=2, head_dim=3 → out 24; P=4, e=5, k=6.
    Reparam::random(2, 2, 3, 4, 5, 6, seed)
}

/// Naive per-element forward in f64, independent of the matmul-based one.
fn naive_forward(r: &Reparam<f64>) -> Vec<f64> {
    let o = r.out_dim();
    let mut y = vec![0.0; r.len * o];
    for p in 0..r.len {
        let h: Vec<f64> = (0..r.hidden)
            .map(|j| {
                let a: f64 = (0..r.emb_dim)
                    .map(|i| r.embedding[p * r.emb_dim + i] * r.w1[j * r.emb_dim + i])
                    .sum::<f64>()
                    + r.b1[j];
                a.tanh()
            })
            .collect();
        for c in 0..o {
            y[p * o + c] = (0..r.hidden)
                .map(|j| h[j] * r.w2[c * r.hidden + j])
                .sum::<f64>()
                + r.b2[c];
        }
    }
    y
}

#[test]
fn reparam_forward_matches_naive_and_fold_equals_forward() {
    let r = small_reparam(21);
    let (y, _) = r.forward();
    let e = rel_err(&y, &naive_forward(&r));
    assert!(e < 1e-14, "forward rel err {e:e}");
    let folded = r.fold();
    assert_eq!((folded.n_prefixes, folded.len), (1, r.len));
    assert_eq!(to_peft(&folded, 0), y);
}

#[test]
fn reparam_backward_matches_finite_differences() {
    let r = small_reparam(22);
    let mut rng = StdRng::seed_from_u64(23);
    let (y, cache) = r.forward();
    let w = random_vec(y.len(), &mut rng);
    let loss = |r: &Reparam<f64>| -> f64 { r.forward().0.iter().zip(&w).map(|(a, b)| a * b).sum() };
    let grads = r.backward(&cache, &w);
    let analytic = grads.to_flat();
    let theta = r.to_flat();
    assert_eq!(analytic.len(), theta.len());
    let eps = 1e-5;
    let mut probe = r.clone();
    let fd: Vec<f64> = (0..theta.len())
        .map(|j| {
            let mut t = theta.clone();
            t[j] += eps;
            probe.copy_from_flat(&t);
            let up = loss(&probe);
            t[j] -= 2.0 * eps;
            probe.copy_from_flat(&t);
            let down = loss(&probe);
            (up - down) / (2.0 * eps)
        })
        .collect();
    // Per-parameter-group errors, so a wrong group cannot hide behind a large one.
    let sizes = [
        ("embedding", grads.embedding.len()),
        ("w1", grads.w1.len()),
        ("b1", grads.b1.len()),
        ("w2", grads.w2.len()),
        ("b2", grads.b2.len()),
    ];
    let mut at = 0;
    let mut worst = 0.0f64;
    for (name, n) in sizes {
        let e = rel_err(&analytic[at..at + n], &fd[at..at + n]);
        assert!(e <= 1e-6, "{name}: rel err {e:e}");
        worst = worst.max(e);
        at += n;
    }
    eprintln!("reparam backward vs finite differences: worst rel err {worst:.2e}");
}

#[test]
fn reparam_init_follows_pytorch_defaults() {
    let r: Reparam<f64> = Reparam::random(2, 4, 8, 30, 64, 128, 3);
    assert_eq!(r, Reparam::random(2, 4, 8, 30, 64, 128, 3));
    let stats = |x: &[f64]| {
        let n = x.len() as f64;
        let m = x.iter().sum::<f64>() / n;
        (
            m,
            (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / n).sqrt(),
        )
    };
    let (m, s) = stats(&r.embedding);
    assert!(
        m.abs() < 0.05 && (s - 1.0).abs() < 0.05,
        "embedding mean {m} std {s}"
    );
    for (name, x, fan_in) in [
        ("w1", &r.w1, 64.0f64),
        ("b1", &r.b1, 64.0),
        ("w2", &r.w2, 128.0),
        ("b2", &r.b2, 128.0),
    ] {
        let bound = 1.0 / fan_in.sqrt();
        assert!(
            x.iter().all(|v| v.abs() <= bound),
            "{name} outside ±{bound}"
        );
        if x.len() > 1000 {
            // U(−b, b) has std b/√3.
            let (_, s) = stats(x);
            assert!(
                (s - bound / 3f64.sqrt()).abs() < 0.05 * bound,
                "{name} std {s}"
            );
        }
    }
    // Flatten round trip.
    let mut z = r.clone();
    z.copy_from_flat(&vec![0.0; r.n_params()]);
    z.copy_from_flat(&r.to_flat());
    assert_eq!(z, r);
}

#[test]
fn bank_from_kv_takes_the_right_sequence_and_positions() {
    let (b_n, h_n, t_n, d_n, l_n) = (3, 2, 6, 4, 2);
    let val = |l: usize, kv: usize, b: usize, h: usize, t: usize, d: usize| {
        (l * 100_000 + kv * 50_000 + b * 1000 + h * 100 + t * 10 + d) as f32
    };
    let kv: Vec<(Vec<f32>, Vec<f32>)> = (0..l_n)
        .map(|l| {
            let mk = |kv: usize| {
                let mut x = Vec::new();
                for b in 0..b_n {
                    for h in 0..h_n {
                        for t in 0..t_n {
                            for d in 0..d_n {
                                x.push(val(l, kv, b, h, t, d));
                            }
                        }
                    }
                }
                x
            };
            (mk(0), mk(1))
        })
        .collect();
    let bank = bank_from_kv(&kv, 1, t_n, 4, h_n, d_n);
    assert_eq!((bank.n_prefixes, bank.n_layers, bank.len), (1, l_n, 4));
    for l in 0..l_n {
        for h in 0..h_n {
            for p in 0..4 {
                for d in 0..d_n {
                    let at = (h * 4 + p) * d_n + d;
                    assert_eq!(bank.k[l][at], val(l, 0, 1, h, p, d));
                    assert_eq!(bank.v[l][at], val(l, 1, 1, h, p, d));
                }
            }
        }
    }
}

// ---------------------------------------------------------------- prefix files

fn config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        vocab_size: 100,
        d_model: 24,
        n_layers: 3,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 6,
        d_ff: 48,
        max_positions: 256,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        tied_embeddings: true,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

fn meta_for(cfg: &ModelConfig, len: usize) -> PrefixMeta {
    PrefixMeta::for_model(
        cfg,
        len,
        "sha256:abc123",
        Positions::AfterPrefix,
        &serde_json::json!({"lr": 5e-5, "epochs": 5}),
    )
}

fn random_bank(cfg: &ModelConfig, n: usize, len: usize, seed: u64) -> PrefixBank<f32> {
    PrefixBank::random(
        n,
        cfg.n_layers,
        cfg.n_kv_heads,
        len,
        cfg.head_dim,
        0.5,
        seed,
    )
}

#[test]
fn prefix_file_round_trips_one_and_several_prefixes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    for n in [1, 3] {
        let bank = random_bank(&cfg, n, 5, 40 + n as u64);
        let meta = meta_for(&cfg, 5);
        let path = dir.path().join(format!("p{n}.safetensors"));
        save_prefix(&path, &bank, &meta).unwrap();
        let (back, meta2) = load_prefix(&path).unwrap();
        assert_eq!(back, bank);
        assert_eq!(meta2, meta);
        check_compatible(&meta2, &cfg, "sha256:abc123").unwrap();
        load_prefix_for(&path, &cfg, "sha256:abc123").unwrap();
    }
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("tmp")), "{names:?}");
    // The tensor is PEFT's layout: PEFT's loader would read `prefix` as prompt_embeddings.
    let bank = random_bank(&cfg, 1, 5, 9);
    let path = dir.path().join("peft_layout.safetensors");
    save_prefix(&path, &bank, &meta_for(&cfg, 5)).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("prefix").unwrap();
    assert_eq!(t.shape(), [5, peft_width(3, 2, 6)]);
    let vals: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(vals, to_peft(&bank, 0));
}

#[test]
fn check_compatible_refuses_another_model() {
    let cfg = config();
    let meta = meta_for(&cfg, 5);
    let e = check_compatible(&meta, &cfg, "sha256:other").unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("another model") && msg.contains("fingerprint"),
        "{msg}"
    );
    let mut other = cfg.clone();
    other.n_layers = 4;
    let msg = format!(
        "{:#}",
        check_compatible(&meta, &other, "sha256:abc123").unwrap_err()
    );
    assert!(
        msg.contains("another model") && msg.contains("n_layers"),
        "{msg}"
    );
    let mut other = cfg.clone();
    other.arch = Arch::Gpt2;
    let msg = format!(
        "{:#}",
        check_compatible(&meta, &other, "sha256:abc123").unwrap_err()
    );
    assert!(msg.contains("architecture"), "{msg}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.safetensors");
    save_prefix(&path, &random_bank(&cfg, 1, 5, 1), &meta).unwrap();
    let msg = format!(
        "{:#}",
        load_prefix_for(&path, &cfg, "sha256:zzz").unwrap_err()
    );
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("another model"),
        "{msg}"
    );
}

fn good_metadata() -> HashMap<String, String> {
    [
        ("prefix_tune_format", "1"),
        ("architecture", "llama"),
        ("n_layers", "3"),
        ("kv_heads", "2"),
        ("head_dim", "6"),
        ("prefix_len", "5"),
        ("n_prefixes", "1"),
        ("base_model_fingerprint", "sha256:abc123"),
        ("positions", "after-prefix"),
        ("training_args", "{}"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Writes a safetensors file by hand (bypassing save_prefix's own checks).
fn write_raw(
    path: &Path,
    name: &str,
    shape: Vec<usize>,
    values: &[f32],
    meta: Option<HashMap<String, String>>,
) {
    let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, shape, &bytes).unwrap();
    let data = safetensors::serialize([(name, view)], meta).unwrap();
    std::fs::write(path, data).unwrap();
}

fn assert_refused(path: &Path, what: &str) -> String {
    let e = load_prefix(path).expect_err(what);
    let msg = format!("{e:#}");
    eprintln!("{what}: {msg}");
    assert!(
        msg.contains(&path.display().to_string()),
        "{what}: error does not name the file: {msg}"
    );
    msg
}

#[test]
fn load_prefix_refuses_bad_files_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| -> PathBuf { dir.path().join(n) };
    let width = peft_width(3, 2, 6);
    let mut rng = StdRng::seed_from_u64(3);
    let good: Vec<f32> = random_vec(5 * width, &mut rng)
        .iter()
        .map(|&x| x as f32)
        .collect();

    // The hand-written good file loads (so the refusals below are about their one defect).
    write_raw(
        &p("good"),
        "prefix",
        vec![5, width],
        &good,
        Some(good_metadata()),
    );
    load_prefix(&p("good")).unwrap();

    // Missing file.
    assert_refused(&p("absent"), "missing file");

    // Truncated file (every cut point class: inside the length, header, data).
    let full = std::fs::read(p("good")).unwrap();
    for cut in [4, 30, full.len() - 8, full.len() - 1] {
        std::fs::write(p("truncated"), &full[..cut]).unwrap();
        assert_refused(&p("truncated"), "truncated file");
    }
    // Garbage.
    std::fs::write(p("garbage"), b"not a safetensors file at all, just text").unwrap();
    assert_refused(&p("garbage"), "garbage");

    // Wrong shape versus metadata.
    write_raw(
        &p("short"),
        "prefix",
        vec![4, width],
        &good[..4 * width],
        Some(good_metadata()),
    );
    let msg = assert_refused(&p("short"), "wrong prefix_len");
    assert!(msg.contains("shape"), "{msg}");
    let narrow = width - 12;
    write_raw(
        &p("narrow"),
        "prefix",
        vec![5, narrow],
        &good[..5 * narrow],
        Some(good_metadata()),
    );
    assert_refused(&p("narrow"), "wrong width");

    // NaN and infinity.
    for bad in [f32::NAN, f32::INFINITY] {
        let mut v = good.clone();
        v[17] = bad;
        write_raw(
            &p("nan"),
            "prefix",
            vec![5, width],
            &v,
            Some(good_metadata()),
        );
        let msg = assert_refused(&p("nan"), "non-finite value");
        assert!(msg.contains("non-finite"), "{msg}");
    }

    // No metadata at all.
    write_raw(&p("nometa"), "prefix", vec![5, width], &good, None);
    let msg = assert_refused(&p("nometa"), "no metadata");
    assert!(msg.contains("metadata"), "{msg}");

    // Each metadata field missing, and each made invalid.
    for key in good_metadata().keys() {
        let mut m = good_metadata();
        m.remove(key);
        write_raw(&p("missing_key"), "prefix", vec![5, width], &good, Some(m));
        let msg = assert_refused(&p("missing_key"), key);
        assert!(msg.contains(key.as_str()), "{key}: {msg}");
    }
    for (key, bad) in [
        ("prefix_tune_format", "99"),
        ("architecture", "mamba"),
        ("n_layers", "three"),
        ("kv_heads", "0"),
        ("head_dim", "99999999999"),
        ("n_prefixes", "2"),
        ("positions", "sideways"),
        ("training_args", "{not json"),
    ] {
        let mut m = good_metadata();
        m.insert(key.to_string(), bad.to_string());
        write_raw(&p("bad_key"), "prefix", vec![5, width], &good, Some(m));
        assert_refused(&p("bad_key"), key);
    }

    // Metadata claiming a huge model over a small tensor is refused before anything is allocated
    // for it (2^40 elements would abort the test).
    let mut m = good_metadata();
    m.insert("n_layers".into(), "1048576".into());
    m.insert("kv_heads".into(), "1048576".into());
    write_raw(&p("huge"), "prefix", vec![5, width], &good, Some(m));
    assert!(assert_refused(&p("huge"), "huge metadata").contains("shape"));

    // Wrong tensor name.
    write_raw(
        &p("badname"),
        "weights",
        vec![5, width],
        &good,
        Some(good_metadata()),
    );
    assert_refused(&p("badname"), "tensor name");
}

#[test]
fn save_prefix_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    let path = dir.path().join("x.safetensors");
    let mut bank = random_bank(&cfg, 1, 5, 2);
    // Metadata that disagrees with the bank.
    assert!(save_prefix(&path, &bank, &meta_for(&cfg, 4)).is_err());
    // Non-finite values.
    bank.k[1][3] = f32::NAN;
    let msg = format!(
        "{:#}",
        save_prefix(&path, &bank, &meta_for(&cfg, 5)).unwrap_err()
    );
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(!path.exists());
}

// ---------------------------------------------------------------- PEFT adapters

fn fixture_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/peft_prefix"
    ))
}

/// A directory saved by PEFT 0.21.2 (tools/oracle/peft_prefix_fixture.py) imports to the keys and
/// values PEFT's own get_prompt() gives the model.
#[test]
fn imports_a_peft_saved_adapter_exactly() {
    let (bank, info) = import_peft_adapter(&fixture_dir()).unwrap();
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("expected_kv.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(info.num_virtual_tokens, 3);
    assert_eq!(info.head_dim(), 4);
    assert_eq!(
        info.base_model_name_or_path.as_deref(),
        Some("tiny-llama-fixture")
    );
    assert_eq!(
        (bank.n_layers, bank.kv_heads, bank.len, bank.head_dim),
        (2, 2, 3, 4)
    );
    let nums = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    for l in 0..2 {
        assert_eq!(bank.k[l], nums(&doc["k"][l]), "layer {l} keys");
        assert_eq!(bank.v[l], nums(&doc["v"][l]), "layer {l} values");
    }
}

#[test]
fn peft_adapter_export_import_round_trip_and_key_prefixes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    let bank = random_bank(&cfg, 2, 4, 77);
    let out = dir.path().join("adapter");
    export_peft_adapter(&out, &bank, 1, Some("my/base")).unwrap();
    let (back, info) = import_peft_adapter(&out).unwrap();
    assert_eq!(back, bank.select(1));
    assert_eq!(info.tensor_name, "prompt_embeddings");
    info.check_model(&cfg).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(json["peft_type"], "PREFIX_TUNING");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["token_dim"], 12);
    assert_eq!(json["num_attention_heads"], 2);
    assert_eq!(json["encoder_hidden_size"], 12);
    assert_eq!(json["num_virtual_tokens"], 4);
    assert_eq!(json["num_layers"], 3);
    assert_eq!(json["prefix_projection"], false);
    assert_eq!(json["inference_mode"], true);
    assert_eq!(json["base_model_name_or_path"], "my/base");

    // Same tensor under a module-qualified key, in bf16.
    let alt = dir.path().join("alt");
    std::fs::create_dir(&alt).unwrap();
    std::fs::copy(
        out.join("adapter_config.json"),
        alt.join("adapter_config.json"),
    )
    .unwrap();
    let peft = to_peft(&bank, 0);
    let bytes: Vec<u8> = peft
        .iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
        .collect();
    let view = TensorView::new(Dtype::BF16, vec![4, peft_width(3, 2, 6)], &bytes).unwrap();
    let data =
        safetensors::serialize([("base_model.model.prompt_embeddings", view)], None).unwrap();
    std::fs::write(alt.join("adapter_model.safetensors"), data).unwrap();
    let (got, info) = import_peft_adapter(&alt).unwrap();
    assert_eq!(info.tensor_name, "base_model.model.prompt_embeddings");
    let want = bank.select(0).to_flat();
    let e = rel_err(&got.to_flat(), &want);
    assert!(e > 0.0 && e < 4e-3, "bf16 round trip rel err {e:e}");
}

#[test]
fn peft_adapter_import_refusals_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    let bank = random_bank(&cfg, 1, 4, 78);
    let good = dir.path().join("good");
    export_peft_adapter(&good, &bank, 0, None).unwrap();
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(good.join("adapter_config.json")).unwrap())
            .unwrap();
    let case = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| -> String {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(
            good.join("adapter_model.safetensors"),
            d.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut c = base.clone();
        edit(&mut c);
        std::fs::write(d.join("adapter_config.json"), c.to_string()).unwrap();
        let msg = format!("{:#}", import_peft_adapter(&d).unwrap_err());
        assert!(msg.contains(&d.display().to_string()), "{name}: {msg}");
        msg
    };
    assert!(case("lora", &|c| c["peft_type"] = "LORA".into()).contains("PREFIX_TUNING"));
    assert!(
        case("seq2seq", &|c| c["num_transformer_submodules"] = 2.into())
            .contains("num_transformer_submodules")
    );
    assert!(case("tokens", &|c| c["num_virtual_tokens"] = 5.into()).contains("shape"));
    assert!(case("nolayers", &|c| {
        c.as_object_mut().unwrap().remove("num_layers");
    })
    .contains("num_layers"));
    assert!(case("heads", &|c| c["num_attention_heads"] = 5.into()).contains("divisible"));

    // Adapter config for a model without GQA support: check_model explains.
    let (_, mut info) = import_peft_adapter(&good).unwrap();
    info.num_attention_heads = 4;
    info.token_dim = 24;
    let msg = format!("{:#}", info.check_model(&cfg).unwrap_err());
    assert!(msg.contains("KV heads") && msg.contains("1901"), "{msg}");

    // Weights missing; pickle only.
    let d = dir.path().join("pickle");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(
        good.join("adapter_config.json"),
        d.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(d.join("adapter_model.bin"), b"pickle").unwrap();
    let msg = format!("{:#}", import_peft_adapter(&d).unwrap_err());
    assert!(msg.contains("safe_serialization"), "{msg}");

    // NaN in the weights; truncated weights.
    let d = dir.path().join("nan");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(
        good.join("adapter_config.json"),
        d.join("adapter_config.json"),
    )
    .unwrap();
    let mut peft = to_peft(&bank, 0);
    peft[3] = f32::NAN;
    let bytes: Vec<u8> = peft.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, vec![4, peft_width(3, 2, 6)], &bytes).unwrap();
    std::fs::write(
        d.join("adapter_model.safetensors"),
        safetensors::serialize([("prompt_embeddings", view)], None).unwrap(),
    )
    .unwrap();
    let msg = format!("{:#}", import_peft_adapter(&d).unwrap_err());
    assert!(
        msg.contains("non-finite") && msg.contains(&d.display().to_string()),
        "{msg}"
    );
    let full = std::fs::read(good.join("adapter_model.safetensors")).unwrap();
    std::fs::write(d.join("adapter_model.safetensors"), &full[..full.len() - 3]).unwrap();
    let msg = format!("{:#}", import_peft_adapter(&d).unwrap_err());
    assert!(msg.contains(&d.display().to_string()), "{msg}");
}

// ---------------------------------------------------------------- init from real words

/// A prefix made from a text's keys/values acts exactly like the text itself: the continuation's
/// logits after that prefix (real tokens at positions P, P+1, …) equal those of the model run on
/// text ++ continuation.
#[test]
fn init_from_text_prefix_acts_like_the_text() {
    use prefix_tune::reference::init::init_from_text;
    use prefix_tune::reference::model::{logits, Batch, RunOptions};
    use prefix_tune::reference::testing::{random_model, tiny_config};
    for arch in [Arch::Llama, Arch::Gpt2] {
        let cfg = tiny_config(arch, true);
        let m = random_model(&cfg, 0.3, 31);
        let text = [5u32, 17, 42, 8];
        let cont = [9u32, 33, 12, 50, 7];
        let bank = init_from_text(&m, &text).unwrap();
        assert_eq!(
            (bank.n_prefixes, bank.len, bank.n_layers),
            (1, text.len(), cfg.n_layers)
        );
        let one = |toks: &[u32]| Batch {
            batch: 1,
            seq: toks.len(),
            tokens: toks.to_vec(),
            labels: vec![None; toks.len()],
            valid_len: vec![toks.len()],
            prefix_index: vec![0],
        };
        let opts = RunOptions::default();
        let with_prefix = logits(&m, Some(&bank), &one(&cont), &opts);
        let full: Vec<u32> = text.iter().chain(&cont).copied().collect();
        let all = logits(&m, None, &one(&full), &opts);
        let tail = &all[text.len() * cfg.vocab_size..];
        let e = rel_err(&with_prefix, tail);
        assert!(e < 1e-12, "{arch:?}: rel err {e:e}");
        // And differs from running the continuation alone (the prefix matters).
        let alone = logits(&m, None, &one(&cont), &opts);
        assert!(rel_err(&alone, tail) > 1e-3, "{arch:?}");
    }
    let cfg = tiny_config(Arch::Llama, true);
    let m = random_model(&cfg, 0.3, 31);
    assert!(init_from_text(&m, &[]).is_err());
    assert!(init_from_text(&m, &[3, 999]).is_err());
}

#[test]
fn reparam_file_round_trips_and_refuses_bad_files() {
    use prefix_tune::prefix::{load_reparam, save_reparam};
    let dir = tempfile::tempdir().unwrap();
    let r: Reparam<f32> = Reparam::<f64>::random(3, 2, 6, 5, 12, 16, 8).cast();
    let path = dir.path().join("reparam.safetensors");
    save_reparam(&path, &r).unwrap();
    assert_eq!(load_reparam(&path).unwrap(), r);
    // Truncated.
    let full = std::fs::read(&path).unwrap();
    let bad = dir.path().join("cut.safetensors");
    std::fs::write(&bad, &full[..full.len() - 5]).unwrap();
    let msg = format!("{:#}", load_reparam(&bad).unwrap_err());
    assert!(msg.contains(&bad.display().to_string()), "{msg}");
    // A plain prefix file is not a reparameterization.
    let cfg = config();
    let pf = dir.path().join("prefix.safetensors");
    save_prefix(&pf, &random_bank(&cfg, 1, 5, 1), &meta_for(&cfg, 5)).unwrap();
    let msg = format!("{:#}", load_reparam(&pf).unwrap_err());
    assert!(
        msg.contains("prefix_tune_reparam") && msg.contains(&pf.display().to_string()),
        "{msg}"
    );
    // Inconsistent shapes (an output layer for another model).
    let mut wrong = r.clone();
    wrong.n_layers = 2;
    wrong.w2.truncate(wrong.out_dim() * wrong.hidden);
    wrong.b2.truncate(wrong.out_dim());
    let wp = dir.path().join("wrong.safetensors");
    save_reparam(&wp, &wrong).unwrap();
    let bytes = std::fs::read(&wp).unwrap();
    // Rewrite the metadata's n_layers to 3 by re-serializing with r's metadata.
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut meta = HashMap::new();
    for (k, v) in [
        ("prefix_tune_reparam", "1"),
        ("n_layers", "3"),
        ("kv_heads", "2"),
        ("head_dim", "6"),
    ] {
        meta.insert(k.to_string(), v.to_string());
    }
    let views: Vec<(String, TensorView)> = st.tensors();
    std::fs::write(&wp, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
    let msg = format!("{:#}", load_reparam(&wp).unwrap_err());
    assert!(msg.contains("inconsistent shapes"), "{msg}");
    // Non-finite values are refused when saving.
    let mut nan = r.clone();
    nan.w1[0] = f32::NAN;
    assert!(save_reparam(&dir.path().join("nan.safetensors"), &nan).is_err());
}
