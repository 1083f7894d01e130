//! KV-cache decoding and generation against the full-sequence forward, on tiny random models of
//! both families.
//!
//! - `reference::decode`: the logits of every step (prefills of different lengths, multi-token
//!   and one-token steps, sequences dropped from the batch) equal `reference::model::logits` of
//!   the whole sequence so far, with two different prefixes and no prefix in one batch, for both
//!   position conventions (f64 rel ≤ 1e-10, f32 rel ≤ 1e-5).
//! - `generate`: greedy picks the argmax of the full-sequence logits at every step; a batch mixing
//!   prefixes equals each request run alone with its prefix; beam search with one beam is greedy,
//!   and with as many beams as the vocabulary finds the exhaustive best two-token continuation
//!   under HF's length-penalty scoring; sampling is reproducible for a seed, differs across
//!   seeds, and with top-k = 1 is greedy; generation stops at an EOS token;
//! - against HF transformers' own `generate` on the tiny fixture models (greedy and beam search
//!   with several beam counts, length penalties and EOS ids; greedy with the PEFT prefix).

use std::sync::Arc;

use prefix_tune::engine::{CpuEngine, Engine};
use prefix_tune::generate::{
    argmax, generate, Finish, GenerateOptions, Generation, Request, Sampling, Strategy,
};
use prefix_tune::model::{Arch, ModelWeights};
use prefix_tune::prefix::PrefixBank;
use prefix_tune::reference::decode::{decode_step, KvCache};
use prefix_tune::reference::model::{logits, Batch, Positions, RunOptions};
use prefix_tune::reference::real::{rel_err, Real};
use prefix_tune::reference::testing::{random_bank, random_model, tiny_config};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const F64_TOL: f64 = 1e-10;
const F32_TOL: f64 = 1e-5;

fn model(arch: Arch, seed: u64) -> ModelWeights<f64> {
    // Llama with an untied head, GPT-2 tied (as the real models).
    let cfg = tiny_config(arch, arch == Arch::Gpt2);
    random_model(&cfg, 0.3, seed)
}

fn random_tokens(rng: &mut StdRng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// Logits `[V]` at the last position of `tokens` run alone (full-sequence forward).
fn full_last_logits<T: Real>(
    m: &ModelWeights<T>,
    bank: Option<&PrefixBank<T>>,
    prefix: Option<usize>,
    tokens: &[u32],
    positions: Positions,
) -> Vec<T> {
    let n = tokens.len();
    let batch = Batch {
        batch: 1,
        seq: n,
        tokens: tokens.to_vec(),
        labels: vec![None; n],
        valid_len: vec![n],
        prefix_index: vec![prefix.unwrap_or(0)],
    };
    let bank = prefix.and(bank);
    let all = logits(m, bank, &batch, &RunOptions { positions });
    let v = m.config.vocab_size;
    all[(n - 1) * v..n * v].to_vec()
}

/// Decodes three sequences (prefix 0, prefix 1, none) in one cache, in uneven chunks, and
/// returns the worst relative error of any step's logits against the full forward.
fn decode_worst<T: Real>(arch: Arch, positions: Positions, seed: u64) -> f64 {
    let m: ModelWeights<T> = model(arch, seed).cast();
    let cfg = m.config.clone();
    let bank: PrefixBank<T> = random_bank(&cfg, 2, 3, 0.5, seed + 1).cast();
    let mut rng = StdRng::seed_from_u64(seed + 2);
    let prefixes = [Some(0), Some(1), None];
    let lens = [9usize, 6, 11];
    let seqs: Vec<Vec<u32>> = lens
        .iter()
        .map(|&n| random_tokens(&mut rng, n, cfg.vocab_size))
        .collect();
    let mut cache = KvCache::new(&cfg, Some(&bank), &prefixes, positions).unwrap();
    let mut fed = [0usize; 3];
    // Sequences still in the cache, in cache order.
    let mut live: Vec<usize> = vec![0, 1, 2];
    let mut worst = 0.0f64;
    let mut step = 0;
    while !live.is_empty() {
        let chunks: Vec<Vec<u32>> = live
            .iter()
            .map(|&s| {
                // Prefill of 4, 2 and 3 tokens, then alternately 1 and 2 tokens per step.
                let want = if step == 0 {
                    [4, 2, 3][s]
                } else {
                    1 + (step + s) % 2
                };
                let n = want.min(lens[s] - fed[s]);
                seqs[s][fed[s]..fed[s] + n].to_vec()
            })
            .collect();
        let out = decode_step(&m, &mut cache, &chunks).unwrap();
        let v = cfg.vocab_size;
        for (row, &s) in live.iter().enumerate() {
            fed[s] += chunks[row].len();
            assert_eq!(cache.tokens(row), fed[s]);
            let want =
                full_last_logits(&m, Some(&bank), prefixes[s], &seqs[s][..fed[s]], positions);
            worst = worst.max(rel_err(&out[row * v..(row + 1) * v], &want));
        }
        let keep: Vec<usize> = (0..live.len())
            .filter(|&r| fed[live[r]] < lens[live[r]])
            .collect();
        cache.reorder(&keep).unwrap();
        live = keep.iter().map(|&r| live[r]).collect();
        step += 1;
    }
    worst
}

#[test]
fn decode_matches_full_forward() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        for positions in [Positions::AfterPrefix, Positions::FromZero] {
            let e64 = decode_worst::<f64>(arch, positions, 11);
            let e32 = decode_worst::<f32>(arch, positions, 11);
            println!("decode {arch:?} {positions:?}: rel err f64 {e64:.2e}, f32 {e32:.2e}");
            assert!(
                e64 <= F64_TOL,
                "{arch:?} {positions:?}: f64 rel err {e64:e}"
            );
            assert!(
                e32 <= F32_TOL,
                "{arch:?} {positions:?}: f32 rel err {e32:e}"
            );
        }
    }
}

#[test]
fn decode_rejects_bad_input() {
    let m: ModelWeights<f64> = model(Arch::Gpt2, 3);
    let cfg = m.config.clone();
    let bank = random_bank(&cfg, 1, 4, 0.5, 4);
    assert!(KvCache::new(&cfg, Some(&bank), &[Some(1)], Positions::AfterPrefix).is_err());
    assert!(KvCache::<f64>::new(&cfg, None, &[Some(0)], Positions::AfterPrefix).is_err());
    let mut cache = KvCache::new(&cfg, Some(&bank), &[Some(0)], Positions::AfterPrefix).unwrap();
    assert!(
        decode_step(&m, &mut cache, &[vec![]]).is_err(),
        "empty step"
    );
    assert!(
        decode_step(&m, &mut cache, &[vec![cfg.vocab_size as u32]]).is_err(),
        "token id"
    );
    // GPT-2's 40 learned positions: 4 prefix + 37 tokens do not fit, and the cache is unchanged.
    let long = vec![1u32; cfg.max_positions - 4 + 1];
    let err = decode_step(&m, &mut cache, &[long]).unwrap_err();
    assert!(format!("{err}").contains("positions"), "{err}");
    assert_eq!(cache.tokens(0), 0);
    assert!(cache.reorder(&[1]).is_err());
}

fn engine(arch: Arch, seed: u64) -> (CpuEngine, ModelWeights<f32>) {
    let m: ModelWeights<f32> = model(arch, seed).cast();
    (CpuEngine::new(Arc::new(m.clone())), m)
}

fn opts(strategy: Strategy, max_new_tokens: usize, eos: Vec<u32>) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        strategy,
        eos,
        run: RunOptions::default(),
        batch_size: 8,
    }
}

/// Four requests: prefixes 0, 1, none, 0, prompts of different lengths.
fn requests(vocab: usize, seed: u64) -> Vec<Request> {
    let mut rng = StdRng::seed_from_u64(seed);
    [(Some(0), 3), (Some(1), 5), (None, 2), (Some(0), 4)]
        .iter()
        .map(|&(prefix, n)| Request {
            prompt: random_tokens(&mut rng, n, vocab),
            prefix,
        })
        .collect()
}

#[test]
fn greedy_is_argmax_of_full_logits() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        let (mut eng, m) = engine(arch, 21);
        let bank: PrefixBank<f32> = random_bank(&m.config, 2, 4, 0.5, 22).cast();
        let reqs = requests(m.config.vocab_size, 23);
        // No EOS here, so every request runs the full length.
        let out = generate(
            &mut eng,
            Some(&bank),
            &reqs,
            &opts(Strategy::Greedy, 8, vec![]),
        )
        .unwrap();
        for (r, g) in reqs.iter().zip(&out) {
            assert_eq!(g.tokens.len(), 8);
            assert_eq!(g.finish, Finish::Length);
            let mut seq = r.prompt.clone();
            for &t in &g.tokens {
                let z = full_last_logits(&m, Some(&bank), r.prefix, &seq, Positions::AfterPrefix);
                assert_eq!(
                    argmax(&z) as u32,
                    t,
                    "{arch:?}: greedy token differs from argmax"
                );
                seq.push(t);
            }
        }
    }
}

#[test]
fn generation_stops_at_eos() {
    let (mut eng, m) = engine(Arch::Llama, 31);
    let reqs = requests(m.config.vocab_size, 32);
    let bank: PrefixBank<f32> = random_bank(&m.config, 2, 4, 0.5, 33).cast();
    let free = generate(
        &mut eng,
        Some(&bank),
        &reqs,
        &opts(Strategy::Greedy, 6, vec![]),
    )
    .unwrap();
    // Make request 1's third greedy token an EOS: it stops there, the others are unchanged
    // unless they meet that token too.
    let eos = free[1].tokens[2];
    let stopped = generate(
        &mut eng,
        Some(&bank),
        &reqs,
        &opts(Strategy::Greedy, 6, vec![eos]),
    )
    .unwrap();
    for (a, b) in free.iter().zip(&stopped) {
        match a.tokens.iter().position(|&t| t == eos) {
            Some(i) => {
                assert_eq!(b.tokens, a.tokens[..=i]);
                assert_eq!(b.finish, Finish::Eos);
            }
            None => assert_eq!(b.tokens, a.tokens),
        }
    }
    assert_eq!(
        stopped[1].tokens.len(),
        free[1].tokens.iter().position(|&t| t == eos).unwrap() + 1
    );
}

/// Each request run alone with only its own prefix (or none). A sampled request's generator is
/// seeded by its index in the list, so the lone request keeps its index: it is the last of a
/// list of `i + 1` copies run one per batch.
fn alone(
    eng: &mut CpuEngine,
    bank: &PrefixBank<f32>,
    reqs: &[Request],
    o: &GenerateOptions,
) -> Vec<Generation> {
    let mut o = o.clone();
    o.batch_size = 1;
    reqs.iter()
        .enumerate()
        .map(|(i, r)| {
            let one = r.prefix.map(|p| bank.select(p));
            let req = Request {
                prompt: r.prompt.clone(),
                prefix: r.prefix.map(|_| 0),
            };
            let copies = vec![req; i + 1];
            generate(eng, one.as_ref(), &copies, &o)
                .unwrap()
                .pop()
                .unwrap()
        })
        .collect()
}

#[test]
fn mixed_prefix_batch_equals_each_alone() {
    let sampling = Sampling {
        temperature: 1.3,
        top_k: Some(20),
        top_p: Some(0.9),
        seed: 7,
    };
    for arch in [Arch::Gpt2, Arch::Llama] {
        let (mut eng, m) = engine(arch, 41);
        let bank: PrefixBank<f32> = random_bank(&m.config, 2, 4, 0.5, 42).cast();
        let reqs = requests(m.config.vocab_size, 43);
        let eos = m.config.eos_token_ids.clone();
        for strategy in [
            Strategy::Greedy,
            Strategy::Sample(sampling),
            Strategy::Beam {
                beams: 3,
                length_penalty: 1.0,
            },
        ] {
            let o = opts(strategy, 7, eos.clone());
            let batched = generate(&mut eng, Some(&bank), &reqs, &o).unwrap();
            let single = alone(&mut eng, &bank, &reqs, &o);
            for (i, (a, b)) in batched.iter().zip(&single).enumerate() {
                assert_eq!(a.tokens, b.tokens, "{arch:?} {strategy:?}: request {i}");
                assert_eq!(a.finish, b.finish);
            }
            // The prefixes matter: request 0 and 3 use prefix 0; running 0 with prefix 1 differs.
            let swapped = Request {
                prompt: reqs[0].prompt.clone(),
                prefix: Some(1),
            };
            let other = generate(
                &mut eng,
                Some(&bank),
                &[swapped],
                &opts(Strategy::Greedy, 7, vec![]),
            )
            .unwrap();
            let base = generate(
                &mut eng,
                Some(&bank),
                &reqs[..1],
                &opts(Strategy::Greedy, 7, vec![]),
            )
            .unwrap();
            assert_ne!(
                other[0].tokens, base[0].tokens,
                "{arch:?}: prefix has no effect"
            );
        }
    }
}

#[test]
fn one_beam_is_greedy() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        let (mut eng, m) = engine(arch, 51);
        let bank: PrefixBank<f32> = random_bank(&m.config, 2, 4, 0.5, 52).cast();
        let reqs = requests(m.config.vocab_size, 53);
        let greedy0 = generate(
            &mut eng,
            Some(&bank),
            &reqs,
            &opts(Strategy::Greedy, 9, vec![]),
        )
        .unwrap();
        // An EOS that greedy meets mid-way for some request, to cover finished hypotheses.
        for eos in [m.config.eos_token_ids.clone(), vec![greedy0[0].tokens[3]]] {
            let greedy = generate(
                &mut eng,
                Some(&bank),
                &reqs,
                &opts(Strategy::Greedy, 9, eos.clone()),
            )
            .unwrap();
            for lp in [1.0, 0.5, 2.0] {
                let beam = Strategy::Beam {
                    beams: 1,
                    length_penalty: lp,
                };
                let out =
                    generate(&mut eng, Some(&bank), &reqs, &opts(beam, 9, eos.clone())).unwrap();
                for (i, (a, b)) in greedy.iter().zip(&out).enumerate() {
                    assert_eq!(a.tokens, b.tokens, "{arch:?} lp {lp}: request {i}");
                    assert_eq!(a.finish, b.finish);
                }
            }
        }
    }
}

/// Log-softmax in f64 of a row.
fn log_probs(z: &[f32]) -> Vec<f64> {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + z.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    z.iter().map(|&x| x as f64 - lse).collect()
}

#[test]
fn wide_beam_finds_exhaustive_best() {
    for (arch, lp) in [(Arch::Gpt2, 0.7), (Arch::Llama, 1.6)] {
        let (mut eng, m) = engine(arch, 61);
        let bank: PrefixBank<f32> = random_bank(&m.config, 1, 3, 0.5, 62).cast();
        let vocab = m.config.vocab_size;
        let mut rng = StdRng::seed_from_u64(63);
        let prompt = random_tokens(&mut rng, 4, vocab);
        // The most likely first token is made an EOS, so one-token hypotheses compete.
        let z1 = full_last_logits(&m, Some(&bank), Some(0), &prompt, Positions::AfterPrefix);
        let eos = vec![argmax(&z1) as u32];
        let lp1 = log_probs(&z1);
        let mut best = (f64::NEG_INFINITY, vec![]);
        for t1 in 0..vocab as u32 {
            if eos.contains(&t1) {
                let s = lp1[t1 as usize];
                if s > best.0 {
                    best = (s, vec![t1]);
                }
                continue;
            }
            let mut seq = prompt.clone();
            seq.push(t1);
            let lp2 = log_probs(&full_last_logits(
                &m,
                Some(&bank),
                Some(0),
                &seq,
                Positions::AfterPrefix,
            ));
            for t2 in 0..vocab as u32 {
                let s = (lp1[t1 as usize] + lp2[t2 as usize]) / 2f64.powf(lp);
                if s > best.0 {
                    best = (s, vec![t1, t2]);
                }
            }
        }
        let beam = Strategy::Beam {
            beams: vocab,
            length_penalty: lp,
        };
        let req = Request {
            prompt,
            prefix: Some(0),
        };
        let out = generate(&mut eng, Some(&bank), &[req], &opts(beam, 2, eos)).unwrap();
        assert_eq!(out[0].tokens, best.1, "{arch:?}");
        let score = out[0].score.unwrap();
        assert!(
            (score - best.0).abs() <= 1e-5 * best.0.abs(),
            "{arch:?}: score {score} vs exhaustive {}",
            best.0
        );
    }
}

#[test]
fn sampling_is_seeded_and_top_k_one_is_greedy() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        let (mut eng, m) = engine(arch, 71);
        let bank: PrefixBank<f32> = random_bank(&m.config, 2, 4, 0.5, 72).cast();
        let reqs = requests(m.config.vocab_size, 73);
        let s = |seed, top_k| {
            Strategy::Sample(Sampling {
                temperature: 2.0,
                top_k,
                top_p: None,
                seed,
            })
        };
        let a = generate(&mut eng, Some(&bank), &reqs, &opts(s(5, None), 10, vec![])).unwrap();
        let b = generate(&mut eng, Some(&bank), &reqs, &opts(s(5, None), 10, vec![])).unwrap();
        let c = generate(&mut eng, Some(&bank), &reqs, &opts(s(6, None), 10, vec![])).unwrap();
        assert_eq!(a, b, "{arch:?}: same seed, different samples");
        assert_ne!(a, c, "{arch:?}: different seeds, same samples");
        let greedy = generate(
            &mut eng,
            Some(&bank),
            &reqs,
            &opts(Strategy::Greedy, 10, vec![]),
        )
        .unwrap();
        assert_ne!(a, greedy, "{arch:?}: sampling at temperature 2 is greedy");
        let k1 = generate(
            &mut eng,
            Some(&bank),
            &reqs,
            &opts(s(5, Some(1)), 10, vec![]),
        )
        .unwrap();
        assert_eq!(k1, greedy, "{arch:?}: top-k 1 differs from greedy");
        // A tiny top-p keeps only the most likely token, too.
        let p = Strategy::Sample(Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: Some(1e-9),
            seed: 9,
        });
        let p0 = generate(&mut eng, Some(&bank), &reqs, &opts(p, 10, vec![])).unwrap();
        assert_eq!(p0, greedy, "{arch:?}: top-p → 0 differs from greedy");
    }
}

#[test]
fn sampling_follows_the_distribution() {
    // Empirical frequencies of the first token against softmax(z / T) restricted to the top k.
    let (mut eng, m) = engine(Arch::Llama, 81);
    let vocab = m.config.vocab_size;
    let prompt = vec![5u32, 9, 14];
    let z = full_last_logits(&m, None, None, &prompt, Positions::AfterPrefix);
    let (temp, k) = (1.5, 5usize);
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| z[b].total_cmp(&z[a]));
    let kept = &order[..k];
    let w: Vec<f64> = kept
        .iter()
        .map(|&i| ((z[i] - z[kept[0]]) as f64 / temp).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let n = 2000;
    let reqs = vec![
        Request {
            prompt,
            prefix: None,
        };
        n
    ];
    let mut o = opts(
        Strategy::Sample(Sampling {
            temperature: temp,
            top_k: Some(k),
            top_p: None,
            seed: 3,
        }),
        1,
        vec![],
    );
    o.batch_size = 500;
    let out = generate(&mut eng, None, &reqs, &o).unwrap();
    let mut counts = vec![0usize; vocab];
    for g in &out {
        counts[g.tokens[0] as usize] += 1;
    }
    for (j, &i) in kept.iter().enumerate() {
        let p = w[j] / total;
        let f = counts[i] as f64 / n as f64;
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        assert!(
            (f - p).abs() <= 5.0 * sd + 1e-3,
            "token {i}: frequency {f} vs p {p}"
        );
    }
    let outside: usize = (0..vocab)
        .filter(|i| !kept.contains(i))
        .map(|i| counts[i])
        .sum();
    assert_eq!(outside, 0, "tokens outside the top k were sampled");
}

#[test]
fn bad_options_are_refused() {
    let (mut eng, m) = engine(Arch::Gpt2, 91);
    let reqs = requests(m.config.vocab_size, 92);
    let bank: PrefixBank<f32> = random_bank(&m.config, 2, 4, 0.5, 93).cast();
    let bad = [
        Strategy::Sample(Sampling {
            temperature: -1.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }),
        Strategy::Sample(Sampling {
            temperature: f64::NAN,
            top_k: None,
            top_p: None,
            seed: 0,
        }),
        Strategy::Sample(Sampling {
            temperature: 1.0,
            top_k: Some(0),
            top_p: None,
            seed: 0,
        }),
        Strategy::Sample(Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: Some(1.5),
            seed: 0,
        }),
        Strategy::Beam {
            beams: 0,
            length_penalty: 1.0,
        },
        Strategy::Beam {
            beams: 2,
            length_penalty: f64::NAN,
        },
    ];
    for s in bad {
        assert!(
            generate(&mut eng, Some(&bank), &reqs, &opts(s, 3, vec![])).is_err(),
            "{s:?}"
        );
    }
    // A prefix index past the bank, and an empty prompt.
    let r = [Request {
        prompt: vec![1],
        prefix: Some(2),
    }];
    assert!(generate(
        &mut eng,
        Some(&bank),
        &r,
        &opts(Strategy::Greedy, 3, vec![])
    )
    .is_err());
    let r = [Request {
        prompt: vec![],
        prefix: None,
    }];
    assert!(generate(
        &mut eng,
        Some(&bank),
        &r,
        &opts(Strategy::Greedy, 3, vec![])
    )
    .is_err());
    let _ = eng.describe();
}

/// HF transformers' own generations on the tiny fixture models (`tests/fixtures/generate_hf.json`,
/// made by `tools/oracle/generate_oracle.py` in float64): greedy and beam search (several beam
/// counts and length penalties, with the model's EOS and with a frequent token as EOS), and greedy
/// with the fixture's PEFT prefix.
#[test]
fn matches_hf_generate_on_fixtures() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("generate_hf.json")).unwrap())
            .unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let max_new = fx["max_new_tokens"].as_u64().unwrap() as usize;
    let mut checked = 0;
    for (family, fam) in fx["families"].as_object().unwrap() {
        let dir = root.join(fam["model_dir"].as_str().unwrap());
        let m = prefix_tune::model::load_model(&dir).unwrap();
        let mut eng = CpuEngine::new(Arc::new(m.weights.clone()));
        for case in fam["cases"].as_array().unwrap() {
            let req = [Request {
                prompt: ids(&case["prompt_ids"]),
                prefix: None,
            }];
            let eos = vec![case["eos"].as_u64().unwrap() as u32];
            let greedy = generate(
                &mut eng,
                None,
                &req,
                &opts(Strategy::Greedy, max_new, eos.clone()),
            )
            .unwrap();
            assert_eq!(greedy[0].tokens, ids(&case["greedy"]), "{family} {case}");
            for b in case["beams"].as_array().unwrap() {
                let strategy = Strategy::Beam {
                    beams: b["num_beams"].as_u64().unwrap() as usize,
                    length_penalty: b["length_penalty"].as_f64().unwrap(),
                };
                let out =
                    generate(&mut eng, None, &req, &opts(strategy, max_new, eos.clone())).unwrap();
                assert_eq!(
                    out[0].tokens,
                    ids(&b["tokens"]),
                    "{family} {strategy:?} eos {eos:?}: {}",
                    case["prompt"]
                );
                checked += 1;
            }
        }
        let (bank, _) =
            prefix_tune::prefix::import_peft_adapter(&dir.join("peft_adapter")).unwrap();
        let eos = vec![fam["model_eos"].as_u64().unwrap() as u32];
        for case in fam["peft_greedy"].as_array().unwrap() {
            let req = [Request {
                prompt: ids(&case["prompt_ids"]),
                prefix: Some(0),
            }];
            let out = generate(
                &mut eng,
                Some(&bank),
                &req,
                &opts(Strategy::Greedy, max_new, eos.clone()),
            )
            .unwrap();
            assert_eq!(
                out[0].tokens,
                ids(&case["tokens"]),
                "{family} PEFT greedy: {}",
                case["prompt"]
            );
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} generations checked");
}
