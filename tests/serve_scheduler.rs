//! The serving engine interface and the continuous-batching scheduler of `prefix-tune serve`,
//! without HTTP:
//!
//! - the CPU batch engine: sequences started, joined into a running batch mid-way, stepped and
//!   retired give exactly the logits each sequence gets decoded alone; sequences hold their
//!   prefix once (counted by identity, and the count is shown to see copies);
//! - the GPU engine (on a card or the simulated device) doing the same joins and
//!   retirements tracks the CPU reference (fp16 tolerance);
//! - the scheduler: requests arriving while others run, with mixed prefixes of different
//!   lengths and position conventions, chunked prefill and a batch smaller than the load, give
//!   token for token what `generate` gives each alone (greedy and seeded sampling); a cancelled
//!   or failed sequence leaves the batch and the next request runs; a full queue and a draining
//!   scheduler refuse.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use half::f16;
use prefix_tune::cuda::engine::CudaEngine;
use prefix_tune::engine::CpuEngine;
use prefix_tune::generate::{argmax, generate, GenerateOptions, Request, Sampling, Strategy};
use prefix_tune::model::config::{Arch, ModelConfig, ModelWeights};
use prefix_tune::model::{load_model, LoadedModel};
use prefix_tune::prefix::PrefixBank;
use prefix_tune::reference::decode::{decode_step, KvCache, SharedPrefix};
use prefix_tune::reference::model::{Positions, RunOptions};
use prefix_tune::reference::real::rel_err;
use prefix_tune::reference::testing::{random_bank, random_model, tiny_config};
use prefix_tune::serve::engine::{BatchEngine, CpuBatchEngine, NewSeq};
use prefix_tune::serve::metrics::Metrics;
use prefix_tune::serve::registry::{PrefixTask, Task};
use prefix_tune::serve::scheduler::{
    Event, FinishReason, Job, Refusal, Scheduler, SchedulerConfig, SeqParams,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

fn fixture(name: &str) -> LoadedModel {
    load_model(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

fn shared(bank: PrefixBank<f32>) -> SharedPrefix<f32> {
    SharedPrefix {
        bank: Arc::new(bank),
        index: 0,
    }
}

fn random_prefix(cfg: &ModelConfig, len: usize, seed: u64) -> SharedPrefix<f32> {
    shared(PrefixBank::random(
        1,
        cfg.n_layers,
        cfg.n_kv_heads,
        len,
        cfg.head_dim,
        0.8,
        seed,
    ))
}

/// A sequence of the engine tests: its prefix, convention, prompt and the tokens fed after it.
struct Seq {
    prefix: Option<SharedPrefix<f32>>,
    positions: Positions,
    prompt: Vec<u32>,
    next: Vec<u32>,
}

/// Sequence `s` decoded alone with the reference: the logits after its prompt and after each
/// of `next`.
fn alone(w: &ModelWeights<f32>, s: &Seq) -> Vec<Vec<f32>> {
    let mut cache = KvCache::with_prefixes(&w.config, &[(s.prefix.clone(), s.positions)]).unwrap();
    let mut out = vec![decode_step(w, &mut cache, std::slice::from_ref(&s.prompt)).unwrap()];
    for &t in &s.next {
        out.push(decode_step(w, &mut cache, &[vec![t]]).unwrap());
    }
    out
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

#[test]
fn cpu_batch_engine_joins_and_retires_like_sequences_alone() {
    for family in ["llama_tiny", "gpt2_tiny"] {
        let m = fixture(family);
        let cfg = m.weights.config.clone();
        let w = Arc::new(m.weights);
        let a = random_prefix(&cfg, 3, 1);
        let b = random_prefix(&cfg, 5, 2);
        let c = random_prefix(&cfg, 2, 3);
        let seq =
            |prefix: Option<&SharedPrefix<f32>>, positions, prompt: &[u32], next: &[u32]| Seq {
                prefix: prefix.cloned(),
                positions,
                prompt: prompt.to_vec(),
                next: next.to_vec(),
            };
        let after = Positions::AfterPrefix;
        let seqs = [
            seq(Some(&a), after, &[5, 9, 11], &[3, 4, 5, 6]),
            seq(None, after, &[7, 7], &[8, 9]),
            seq(Some(&b), after, &[1, 2, 3, 4, 5, 6], &[10, 11, 12]),
            seq(Some(&c), Positions::FromZero, &[13], &[14, 15, 16]),
            seq(Some(&a), after, &[20, 21], &[22, 23, 24]),
        ];
        let want: Vec<Vec<Vec<f32>>> = seqs.iter().map(|s| alone(&w, s)).collect();
        let v = cfg.vocab_size;
        let check = |got: &[f32], rows: &[(usize, usize)], what: &str| {
            assert_eq!(got.len(), rows.len() * v, "{family} {what}");
            for (r, &(s, k)) in rows.iter().enumerate() {
                // The same math; only the matrix products' blocking over the batch's rows
                // may round differently.
                let row = &got[r * v..(r + 1) * v];
                let e = rel_err(&f64s(row), &f64s(&want[s][k]));
                assert!(
                    e <= 1e-5,
                    "{family} {what}: sequence {s} step {k}: rel err {e:.2e}"
                );
                assert_eq!(
                    argmax(row),
                    argmax(&want[s][k]),
                    "{family} {what}: sequence {s} step {k}: greedy token"
                );
            }
        };
        let mut e = CpuBatchEngine::new(w.clone());
        let new = |ids: &[usize]| -> Vec<NewSeq<'_>> {
            ids.iter()
                .map(|&i| NewSeq {
                    prefix: seqs[i].prefix.clone(),
                    positions: seqs[i].positions,
                    tokens: &seqs[i].prompt,
                })
                .collect()
        };
        // Sequences 0 and 1 start; one step; 2, 3, 4 join; sequence 1 leaves after its tokens.
        let (mut cache, l) = e.start(&new(&[0, 1])).unwrap();
        check(&l, &[(0, 0), (1, 0)], "prefill of 0 and 1");
        let l = e.step(cache.as_mut(), &[vec![3], vec![8]]).unwrap();
        check(&l, &[(0, 1), (1, 1)], "step 1");
        let (more, l) = e.start(&new(&[2, 3, 4])).unwrap();
        check(&l, &[(2, 0), (3, 0), (4, 0)], "prefill of 2, 3, 4");
        e.join(cache.as_mut(), more).unwrap();
        assert_eq!(cache.batch(), 5);
        let l = e
            .step(
                cache.as_mut(),
                &[vec![4], vec![9], vec![10], vec![14], vec![22]],
            )
            .unwrap();
        check(
            &l,
            &[(0, 2), (1, 2), (2, 1), (3, 1), (4, 1)],
            "step 2 (joined)",
        );
        // Sequences with a prefix hold it once: 0 and 4 share A.
        let sh = e.sharing(cache.as_mut());
        assert_eq!(
            (sh.sequences_with_prefix, sh.prefixes_held),
            (4, 3),
            "{family}"
        );
        let per = |p: &SharedPrefix<f32>| 2 * p.bank.n_layers * p.bank.prefix_len_elems() * 4;
        assert_eq!(sh.prefix_bytes, per(&a) + per(&b) + per(&c), "{family}");
        // A's holders: `a`, the two `seqs` using it, and the cache's two sequences (no copy).
        assert_eq!(Arc::strong_count(&a.bank), 3 + 2, "{family}: A's holders");
        e.retain(cache.as_mut(), &[0, 2, 3, 4]).unwrap();
        let l = e
            .step(cache.as_mut(), &[vec![5], vec![11], vec![15], vec![23]])
            .unwrap();
        check(&l, &[(0, 3), (2, 2), (3, 2), (4, 2)], "step 3 (retired 1)");
        // Several tokens in one step for some rows, one for others (a prefill chunk next to
        // decoding rows): the logits are those of each row's last token.
        let l = e
            .step(cache.as_mut(), &[vec![6], vec![12], vec![16], vec![24]])
            .unwrap();
        check(&l, &[(0, 4), (2, 3), (3, 3), (4, 3)], "step 4");
        drop(cache);
        assert_eq!(
            Arc::strong_count(&a.bank),
            3,
            "{family}: the cache let go of A"
        );
    }
}

#[test]
fn prefix_sharing_is_counted_by_identity() {
    // The checker itself: sequences with equal but separately held prefixes count as copies.
    let m = fixture("llama_tiny");
    let cfg = &m.weights.config;
    let a = random_prefix(cfg, 4, 9);
    let shared_twice = KvCache::with_prefixes(
        cfg,
        &[
            (Some(a.clone()), Positions::AfterPrefix),
            (Some(a.clone()), Positions::AfterPrefix),
        ],
    )
    .unwrap();
    let copies = KvCache::with_prefixes(
        cfg,
        &[
            (Some(shared((*a.bank).clone())), Positions::AfterPrefix),
            (Some(shared((*a.bank).clone())), Positions::AfterPrefix),
        ],
    )
    .unwrap();
    assert_eq!(shared_twice.sharing().prefixes_held, 1);
    assert_eq!(copies.sharing().prefixes_held, 2);
    assert_eq!(
        copies.sharing().prefix_bytes,
        2 * shared_twice.sharing().prefix_bytes
    );
    // KvCache::new (generate's path) holds its bank once for all sequences too.
    let bank = PrefixBank::<f32>::random(2, cfg.n_layers, cfg.n_kv_heads, 3, cfg.head_dim, 1.0, 4);
    let c = KvCache::new(
        cfg,
        Some(&bank),
        &[Some(0), Some(1), Some(0)],
        Positions::AfterPrefix,
    )
    .unwrap();
    assert_eq!(c.sharing().prefixes_held, 2);
    assert!(Arc::ptr_eq(
        &c.prefix(0).unwrap().bank,
        &c.prefix(1).unwrap().bank
    ));
}

/// Models with head dim 64 (what the GPU kernels take), weights and prefixes in fp16 values.
fn tiny_setup(arch: Arch, seed: u64) -> (Arc<ModelWeights<f32>>, Vec<SharedPrefix<f32>>) {
    let mut cfg = tiny_config(arch, arch == Arch::Gpt2);
    cfg.head_dim = 64;
    cfg.d_model = 64;
    cfg.vocab_size = 71;
    cfg.n_heads = 2;
    cfg.n_kv_heads = if arch == Arch::Llama { 1 } else { 2 };
    let w = Arc::new(
        random_model(&cfg, 0.08, seed)
            .cast::<f32>()
            .rounded_to_f16(),
    );
    let round = |mut b: PrefixBank<f32>| {
        for v in b.k.iter_mut().chain(b.v.iter_mut()) {
            v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32());
        }
        shared(b)
    };
    let p3 = round(random_bank(&cfg, 1, 3, 0.5, seed + 1).cast::<f32>());
    let p5 = round(random_bank(&cfg, 1, 5, 0.5, seed + 2).cast::<f32>());
    (w, vec![p3, p5])
}

#[test]
fn gpu_engine_joins_and_retires_like_the_cpu() {
    if !common::host_gpu_or_skip("gpu_engine_joins_and_retires_like_the_cpu") {
        return;
    }
    for arch in [Arch::Llama, Arch::Gpt2] {
        let (w, p) = tiny_setup(arch, 21);
        let mut cpu = CpuBatchEngine::new(w.clone());
        let mut gpu = CudaEngine::new(w.clone()).unwrap();
        gpu.set_decode_headroom(2); // joins of caches of different capacities, and growth
        let after = Positions::AfterPrefix;
        let prompts: [Vec<u32>; 4] = [vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9, 10], vec![11]];
        let prefixes = [
            Some(p[0].clone()),
            None,
            Some(p[1].clone()),
            Some(p[0].clone()),
        ];
        let positions = [after, after, after, Positions::FromZero];
        let new = |ids: &[usize]| -> Vec<NewSeq<'_>> {
            ids.iter()
                .map(|&i| NewSeq {
                    prefix: prefixes[i].clone(),
                    positions: positions[i],
                    tokens: &prompts[i],
                })
                .collect()
        };
        let close = |a: &[f32], b: &[f32], what: &str| {
            let e = rel_err(&f64s(a), &f64s(b));
            assert!(e <= 1e-2, "{arch:?} {what}: logits rel err {e:.3e}");
        };
        let engines: [&mut dyn BatchEngine; 2] = [&mut cpu, &mut gpu];
        let mut logs = Vec::new();
        for e in engines {
            let mut log = Vec::new();
            // Three sequences with two prefixes and none start together (the GPU prefills one
            // group per prefix and joins them, in the order asked).
            let (mut cache, l) = e.start(&new(&[0, 1, 2])).unwrap();
            log.push(l);
            log.push(
                e.step(cache.as_mut(), &[vec![12], vec![13], vec![14]])
                    .unwrap(),
            );
            let (more, l) = e.start(&new(&[3])).unwrap();
            log.push(l);
            e.join(cache.as_mut(), more).unwrap();
            log.push(
                e.step(cache.as_mut(), &[vec![15], vec![16], vec![17], vec![18]])
                    .unwrap(),
            );
            e.retain(cache.as_mut(), &[0, 2, 3]).unwrap();
            for t in 0..4u32 {
                log.push(
                    e.step(cache.as_mut(), &[vec![19 + t], vec![30 + t], vec![40 + t]])
                        .unwrap(),
                );
            }
            // A row fed several tokens at once (a prefill chunk) next to single tokens.
            log.push(
                e.step(cache.as_mut(), &[vec![50], vec![51, 52, 53], vec![54]])
                    .unwrap(),
            );
            let sh = e.sharing(cache.as_mut());
            assert_eq!(sh.sequences_with_prefix, 3, "{arch:?}");
            logs.push((log, sh.prefixes_held));
        }
        let (cpu_log, cpu_held) = &logs[0];
        let (gpu_log, gpu_held) = &logs[1];
        for (i, (a, b)) in cpu_log.iter().zip(gpu_log).enumerate() {
            close(b, a, &format!("call {i}"));
        }
        // The CPU holds the two prefixes once; the GPU cache copies them per sequence.
        assert_eq!((*cpu_held, *gpu_held), (2, 3), "{arch:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The scheduler.

fn task(name: &str, p: &SharedPrefix<f32>, positions: Positions) -> Task {
    Task::Prefix(Arc::new(PrefixTask {
        name: name.into(),
        prefix: p.clone(),
        positions,
        source: None,
        created: 0,
    }))
}

struct Gen {
    tokens: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
    failed: Option<String>,
}

/// Drains the events of a one-choice request.
fn collect(rx: &mut UnboundedReceiver<Event>) -> Gen {
    let mut g = Gen {
        tokens: Vec::new(),
        text: String::new(),
        finish: None,
        failed: None,
    };
    while let Some(e) = rx.blocking_recv() {
        match e {
            Event::Token { token, text, .. } => {
                g.tokens.push(token);
                g.text.push_str(&text);
            }
            Event::Finished { reason, text, .. } => {
                g.text.push_str(&text);
                g.finish = Some(reason);
                break;
            }
            Event::Failed { message, .. } => {
                g.failed = Some(message);
                break;
            }
        }
    }
    g
}

fn start(m: &LoadedModel, config: SchedulerConfig) -> (Scheduler, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    let w = Arc::new(m.weights.clone());
    let s = Scheduler::start(
        move || Ok(Box::new(CpuBatchEngine::new(w)) as Box<dyn BatchEngine>),
        Arc::new(tokenizer_of(m)),
        config,
        metrics.clone(),
    )
    .unwrap();
    (s, metrics)
}

/// The fixture's tokenizer (a second copy for the scheduler).
fn tokenizer_of(m: &LoadedModel) -> prefix_tune::model::tokenizer::Tokenizer {
    load_model(&m.source).unwrap().tokenizer
}

fn eos_of(m: &LoadedModel) -> Vec<u32> {
    let mut eos = m.tokenizer.eos_token_ids().to_vec();
    eos.extend(&m.weights.config.eos_token_ids);
    eos
}

fn job(t: Task, prompt: &[u32], params: SeqParams) -> (Job, UnboundedReceiver<Event>) {
    let (tx, rx) = unbounded_channel();
    (
        Job {
            task: t,
            prompt: Arc::new(prompt.to_vec()),
            choice: 0,
            params: Arc::new(params),
            events: tx,
            arrived: Instant::now(),
        },
        rx,
    )
}

fn params(strategy: Strategy, max_tokens: usize, eos: &[u32]) -> SeqParams {
    SeqParams {
        strategy,
        rng_index: 0,
        max_tokens,
        stop: Vec::new(),
        eos: eos.to_vec(),
        logprobs: None,
    }
}

/// What `generate` gives one request alone.
fn generate_alone(
    m: &LoadedModel,
    prefix: Option<&SharedPrefix<f32>>,
    positions: Positions,
    prompt: &[u32],
    strategy: Strategy,
    max_tokens: usize,
) -> Vec<u32> {
    let mut engine = CpuEngine::new(Arc::new(m.weights.clone()));
    let opts = GenerateOptions {
        max_new_tokens: max_tokens,
        strategy,
        eos: eos_of(m),
        run: RunOptions { positions },
        batch_size: 1,
    };
    let req = Request {
        prompt: prompt.to_vec(),
        prefix: prefix.map(|_| 0),
    };
    generate(&mut engine, prefix.map(|p| &*p.bank), &[req], &opts).unwrap()[0]
        .tokens
        .clone()
}

#[test]
fn scheduler_output_equals_generate_with_requests_joining_mid_batch() {
    for family in ["llama_tiny", "gpt2_tiny"] {
        let m = fixture(family);
        let cfg = m.weights.config.clone();
        let pa = random_prefix(&cfg, 2, 11);
        let pb = random_prefix(&cfg, 6, 12);
        // A batch smaller than the load, prompts longer than a chunk, a small prefill budget.
        let config = SchedulerConfig {
            max_batch: 3,
            max_queue: 64,
            prefill_chunk: 4,
            prefill_budget: 6,
        };
        let (sched, metrics) = start(&m, config);
        let eos = eos_of(&m);
        let tasks = [
            (
                task("a", &pa, Positions::AfterPrefix),
                Some(&pa),
                Positions::AfterPrefix,
            ),
            (
                task("b", &pb, Positions::FromZero),
                Some(&pb),
                Positions::FromZero,
            ),
            (Task::Base, None, Positions::AfterPrefix),
        ];
        let text = |s: &str| m.tokenizer.encode(s).unwrap();
        let sampling = |seed| {
            Strategy::Sample(Sampling {
                temperature: 0.9,
                top_k: Some(20),
                top_p: Some(0.95),
                seed,
            })
        };
        let cases: Vec<(usize, Vec<u32>, Strategy, usize)> = vec![
            (0, text("the cat sat on the mat"), Strategy::Greedy, 9),
            (1, text("a"), Strategy::Greedy, 12),
            (2, text("once upon a time there was"), Strategy::Greedy, 7),
            (0, text("hello"), sampling(5), 10),
            (1, text("the quick brown fox jumps"), Strategy::Greedy, 8),
            (2, text("xy"), Strategy::Greedy, 11),
            (0, text("zzz zzz zzz zzz"), Strategy::Greedy, 6),
            (1, text("dogs"), sampling(77), 9),
            (2, text("the cat"), sampling(5), 5),
        ];
        let want: Vec<Vec<u32>> = cases
            .iter()
            .map(|(t, p, s, n)| generate_alone(&m, tasks[*t].1, tasks[*t].2, p, *s, *n))
            .collect();
        let submit = |i: usize| {
            let (t, p, s, n) = &cases[i];
            let (j, rx) = job(tasks[*t].0.clone(), p, params(*s, *n, &eos));
            sched.handle.submit(vec![j]).unwrap();
            rx
        };
        // A first wave; the second arrives once the first is decoding.
        let mut rxs: Vec<_> = (0..4).map(submit).collect();
        let first = rxs[0].blocking_recv().expect("a first event");
        let Event::Token { token, .. } = first else {
            panic!("{family}: first event {first:?}")
        };
        rxs.extend((4..cases.len()).map(submit));
        let mut got: Vec<Gen> = rxs.iter_mut().map(collect).collect();
        got[0].tokens.insert(0, token);
        for (i, g) in got.iter().enumerate() {
            assert!(g.failed.is_none(), "{family} case {i}: {:?}", g.failed);
            assert_eq!(
                g.tokens, want[i],
                "{family} case {i}: tokens differ from generate"
            );
            let finish = if eos.contains(g.tokens.last().unwrap()) {
                FinishReason::Stop
            } else {
                FinishReason::Length
            };
            assert_eq!(g.finish, Some(finish), "{family} case {i}");
            if i > 0 {
                let body = match finish {
                    FinishReason::Stop => &g.tokens[..g.tokens.len() - 1],
                    FinishReason::Length => &g.tokens[..],
                };
                assert_eq!(
                    g.text,
                    m.tokenizer.decode(body).unwrap(),
                    "{family} case {i}"
                );
            }
        }
        // It batched: more sequences than one per step on average, never more than the batch.
        let (steps, seqs) = (metrics.steps.get(), metrics.step_sequences.get());
        assert!(
            seqs > steps,
            "{family}: {seqs} sequence-steps in {steps} steps"
        );
        assert!(seqs <= 3 * steps);
        eventually("the batch empties", || {
            metrics.running.get() == 0 && metrics.queued.get() == 0
        });
        assert_eq!(metrics.cancelled.get(), 0);
        sched.handle.drain();
        sched.join();
    }
}

#[test]
fn stop_strings_end_a_sequence_before_them() {
    let m = fixture("llama_tiny");
    let (sched, _) = start(
        &m,
        SchedulerConfig {
            max_batch: 2,
            max_queue: 8,
            prefill_chunk: 16,
            prefill_budget: 16,
        },
    );
    let prompt = m.tokenizer.encode("the cat sat on").unwrap();
    let full = generate_alone(
        &m,
        None,
        Positions::AfterPrefix,
        &prompt,
        Strategy::Greedy,
        12,
    );
    let text = m.tokenizer.decode(&full).unwrap();
    // Stop at the text of the generation's 5th..6th characters.
    let cut: String = text.chars().skip(4).take(2).collect();
    let before = &text[..text.find(&cut).unwrap()];
    let mut p = params(Strategy::Greedy, 12, &[]);
    p.stop = vec!["never-appears".into(), cut.clone()];
    let (j, mut rx) = job(Task::Base, &prompt, p);
    sched.handle.submit(vec![j]).unwrap();
    let g = collect(&mut rx);
    assert_eq!(
        g.finish,
        Some(FinishReason::Stop),
        "stop {cut:?} in {text:?}"
    );
    assert_eq!(g.text, before, "stop {cut:?} in {text:?}");
    assert!(g.tokens.len() < full.len());
    sched.handle.drain();
    sched.join();
}

/// Waits until `f` holds (at most 10 s).
fn eventually(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "timed out waiting: {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn cancelled_and_failed_sequences_leave_the_batch() {
    let config = SchedulerConfig {
        max_batch: 2,
        max_queue: 2,
        prefill_chunk: 64,
        prefill_budget: 64,
    };
    // A client that goes away after its first token: its sequence (which would run for a
    // million tokens) leaves the batch.
    let m = fixture("llama_tiny");
    let (sched, metrics) = start(&m, config);
    let prompt = m.tokenizer.encode("the cat").unwrap();
    let (j, mut rx) = job(
        Task::Base,
        &prompt,
        params(Strategy::Greedy, 1_000_000, &[]),
    );
    sched.handle.submit(vec![j]).unwrap();
    assert!(matches!(rx.blocking_recv(), Some(Event::Token { .. })));
    drop(rx);
    eventually("the cancelled sequence leaves", || {
        metrics.cancelled.get() == 1 && metrics.running.get() == 0
    });
    sched.handle.drain();
    sched.join();

    // A sequence the engine refuses (GPT-2 has 64 positions; the HTTP layer would have said
    // so first): an error for it, and the scheduler goes on.
    let m = fixture("gpt2_tiny");
    let eos = eos_of(&m);
    let (sched, metrics) = start(&m, config);
    let prompt = m.tokenizer.encode("the cat").unwrap();
    let long: Vec<u32> = (0..60).map(|i| 3 + i % 50).collect();
    let (j, mut rx) = job(Task::Base, &long, params(Strategy::Greedy, 20, &[]));
    sched.handle.submit(vec![j]).unwrap();
    let g = collect(&mut rx);
    let msg = g.failed.expect("the over-long sequence fails");
    assert!(msg.contains("positions"), "{msg}");
    eventually("the failed sequence leaves", || metrics.running.get() == 0);
    // The next request runs normally.
    let (j, mut rx) = job(Task::Base, &prompt, params(Strategy::Greedy, 6, &eos));
    sched.handle.submit(vec![j]).unwrap();
    let g = collect(&mut rx);
    assert!(g.failed.is_none());
    assert_eq!(
        g.tokens,
        generate_alone(
            &m,
            None,
            Positions::AfterPrefix,
            &prompt,
            Strategy::Greedy,
            6
        )
    );
    // The queue holds 2: a request of 3 sequences is refused whole.
    let three: Vec<Job> = (0..3)
        .map(|_| job(Task::Base, &prompt, params(Strategy::Greedy, 4, &eos)).0)
        .collect();
    assert_eq!(sched.handle.submit(three), Err(Refusal::QueueFull));
    // Draining refuses new work and stops the thread once idle.
    sched.handle.drain();
    let (j, _rx) = job(Task::Base, &prompt, params(Strategy::Greedy, 4, &eos));
    assert_eq!(sched.handle.submit(vec![j]), Err(Refusal::Draining));
    sched.join();
}
