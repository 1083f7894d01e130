//! Continuous batching: one thread owns the engine and runs the batch; requests join it between
//! decode steps and leave it as soon as they finish, each with its own prefix (or none).
//!
//! Every iteration of the loop:
//! 1. takes sequences from the bounded queue while the batch has room (at most `max_batch`) and
//!    their first prompt chunks fit the iteration's prefill budget, and starts them in a cache of
//!    their own ([`BatchEngine::start`]): a prompt longer than `prefill_chunk` is fed a chunk at
//!    a time, so a long prompt never stalls the running streams for more than a chunk;
//! 2. joins that cache into the running one ([`BatchEngine::join`]);
//! 3. runs one step of every running sequence: its last token, or the next chunk of its prompt;
//! 4. samples a token for every sequence whose prompt is done, streams its text (stop strings
//!    and end-of-sequence tokens end it) and retires the finished and the cancelled (a client
//!    that went away closes its channel) with [`BatchEngine::retain`].
//!
//! An engine error (or panic) fails the sequences of that call with a message and drops the
//! batch; the loop goes on. Draining (SIGTERM) refuses new work and finishes what was accepted.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use rand::rngs::StdRng;
use tokio::sync::mpsc::UnboundedSender;

use super::engine::{BatchEngine, NewSeq};
use super::metrics::Metrics;
use super::registry::Task;
use super::text::TextStream;
use crate::engine::DecodeCache;
use crate::generate::{argmax, log_softmax, request_rng, sample_token, Strategy};
use crate::model::tokenizer::Tokenizer;

/// Sizes of the batch and the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Most sequences waiting for a place in the batch.
    pub max_queue: usize,
    /// Most prompt tokens one sequence feeds in one step.
    pub prefill_chunk: usize,
    /// Most prompt tokens (all sequences) fed in one iteration (at least one per sequence).
    pub prefill_budget: usize,
}

/// How one sequence is generated.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqParams {
    /// Greedy or sampling (beam search is not served).
    pub strategy: Strategy,
    /// Which generator of the seed this sequence draws from ([`request_rng`]).
    pub rng_index: usize,
    /// Most new tokens (at least 1).
    pub max_tokens: usize,
    /// Texts that end the sequence (not included in its text).
    pub stop: Vec<String>,
    /// Tokens that end the sequence (empty: run to `max_tokens`).
    pub eos: Vec<u32>,
    /// Log-probabilities of each chosen token and of this many alternatives.
    pub logprobs: Option<usize>,
}

/// One sequence to generate: a prompt, a choice index within its request, and where its events
/// go.
#[derive(Debug)]
pub struct Job {
    pub task: Task,
    pub prompt: Arc<Vec<u32>>,
    pub choice: usize,
    pub params: Arc<SeqParams>,
    pub events: UnboundedSender<Event>,
    /// When the request arrived (time to first token is measured from here).
    pub arrived: Instant,
}

/// Why a sequence finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens`.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Log-probabilities (natural log, of the model's distribution before temperature and
/// filtering) of a chosen token and the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f64,
    pub top: Vec<(u32, f64)>,
}

/// What a sequence reports to its request.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A generated token and the text it adds (possibly empty: held back, or an end-of-sequence
    /// token).
    Token {
        choice: usize,
        token: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// The sequence ended; `text` is the last of its text.
    Finished {
        choice: usize,
        reason: FinishReason,
        text: String,
        completion_tokens: usize,
    },
    /// The sequence could not be generated.
    Failed { choice: usize, message: String },
}

/// Why a submission was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The queue is full: try again later.
    QueueFull,
    /// The server is shutting down.
    Draining,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Job>,
    draining: bool,
    abort: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    config: SchedulerConfig,
    metrics: Arc<Metrics>,
}

/// The handle requests are submitted through (cheap to clone).
#[derive(Clone, Debug)]
pub struct SchedulerHandle {
    shared: Arc<Shared>,
}

/// The running scheduler: its handle and its thread.
#[derive(Debug)]
pub struct Scheduler {
    pub handle: SchedulerHandle,
    /// What the engine said it is.
    pub engine: String,
    thread: JoinHandle<()>,
}

impl SchedulerHandle {
    /// Queues all sequences of one request, or none of them.
    pub fn submit(&self, jobs: Vec<Job>) -> std::result::Result<(), Refusal> {
        let mut st = self.shared.state.lock().expect("scheduler lock");
        if st.draining {
            return Err(Refusal::Draining);
        }
        if st.queue.len() + jobs.len() > self.shared.config.max_queue {
            return Err(Refusal::QueueFull);
        }
        st.queue.extend(jobs);
        self.shared.metrics.queued.set(st.queue.len());
        drop(st);
        self.shared.wake.notify_all();
        Ok(())
    }

    /// Refuses new submissions; what was accepted runs to its end, then the thread stops.
    pub fn drain(&self) {
        self.shared.state.lock().expect("scheduler lock").draining = true;
        self.shared.wake.notify_all();
    }

    /// Ends every queued and running sequence now (with a `Failed` event) and stops.
    pub fn abort(&self) {
        let mut st = self.shared.state.lock().expect("scheduler lock");
        st.draining = true;
        st.abort = true;
        drop(st);
        self.shared.wake.notify_all();
    }

    pub fn is_draining(&self) -> bool {
        self.shared.state.lock().expect("scheduler lock").draining
    }

    pub fn config(&self) -> SchedulerConfig {
        self.shared.config
    }
}

impl Scheduler {
    /// Starts the scheduler thread; `make_engine` runs on it (engines need not be `Send`).
    /// Returns when the engine is ready, or with its error.
    pub fn start<F>(
        make_engine: F,
        tokenizer: Arc<Tokenizer>,
        config: SchedulerConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Scheduler>
    where
        F: FnOnce() -> Result<Box<dyn BatchEngine>> + Send + 'static,
    {
        anyhow::ensure!(
            config.max_batch >= 1 && config.prefill_chunk >= 1 && config.prefill_budget >= 1,
            "the batch size, prefill chunk and prefill budget must be at least 1"
        );
        metrics.max_batch.set(config.max_batch);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            config,
            metrics,
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("prefix-tune-scheduler".into())
            .spawn(move || {
                let engine = match make_engine() {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(engine.describe()));
                Runner::new(engine, tokenizer, s2).run();
            })
            .context("starting the scheduler thread")?;
        let engine = ready_rx
            .recv()
            .map_err(|_| anyhow!("the scheduler thread ended while opening the engine"))??;
        Ok(Scheduler {
            handle: SchedulerHandle { shared },
            engine,
            thread,
        })
    }

    /// Waits for the thread to stop (after [`SchedulerHandle::drain`] or `abort`).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// Why a slot leaves the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Done {
    Finished,
    Cancelled,
}

/// A running sequence.
struct Slot {
    job: Job,
    /// Prompt tokens fed so far.
    fed: usize,
    generated: usize,
    /// The token to feed next (`None` while the prompt is being fed).
    last: Option<u32>,
    text: TextStream,
    rng: Option<StdRng>,
    last_token_at: Option<Instant>,
    done: Option<Done>,
}

impl Slot {
    fn new(job: Job) -> Self {
        let rng = match job.params.strategy {
            Strategy::Sample(s) => Some(request_rng(s.seed, job.params.rng_index)),
            _ => None,
        };
        Slot {
            text: TextStream::new(&job.params.stop),
            job,
            fed: 0,
            generated: 0,
            last: None,
            rng,
            last_token_at: None,
            done: None,
        }
    }

    fn send(&mut self, e: Event) {
        if self.job.events.send(e).is_err() {
            self.done = Some(Done::Cancelled);
        }
    }

    fn fail(&mut self, message: &str) {
        let choice = self.job.choice;
        self.send(Event::Failed {
            choice,
            message: message.to_string(),
        });
        self.done = Some(Done::Finished);
    }
}

/// The scheduler thread's state.
struct Runner {
    engine: Box<dyn BatchEngine>,
    tok: Arc<Tokenizer>,
    shared: Arc<Shared>,
    cache: Option<Box<dyn DecodeCache>>,
    slots: Vec<Slot>,
    vocab: usize,
}

/// Runs an engine call, turning a panic into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(anyhow!("internal error in the engine's {what}: {msg}"))
        }
    }
}

impl Runner {
    fn new(engine: Box<dyn BatchEngine>, tok: Arc<Tokenizer>, shared: Arc<Shared>) -> Self {
        let vocab = engine.config().vocab_size;
        Runner {
            engine,
            tok,
            shared,
            cache: None,
            slots: Vec::new(),
            vocab,
        }
    }

    fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    fn run(mut self) {
        loop {
            let Some(admitted) = self.next_admissions() else {
                return;
            };
            if !admitted.is_empty() {
                self.start(admitted);
            }
            self.cancel_gone();
            if !self.slots.is_empty() {
                self.step();
            }
        }
    }

    /// Waits for work and takes the sequences to admit now; `None` when the thread is to stop.
    fn next_admissions(&mut self) -> Option<Vec<Job>> {
        let cfg = self.shared.config;
        let shared = self.shared.clone();
        let mut st = shared.state.lock().expect("scheduler lock");
        loop {
            if st.abort {
                let queued: Vec<Job> = st.queue.drain(..).collect();
                drop(st);
                for j in queued {
                    let _ = j.events.send(Event::Failed {
                        choice: j.choice,
                        message: "the server is shutting down".into(),
                    });
                }
                for s in &mut self.slots {
                    s.fail("the server is shutting down");
                }
                self.retire();
                self.metrics().queued.set(0);
                return None;
            }
            // Sequences whose client went away while they waited.
            let before = st.queue.len();
            st.queue.retain(|j| !j.events.is_closed());
            self.metrics()
                .cancelled
                .add((before - st.queue.len()) as u64);
            let mut admitted = Vec::new();
            let mut budget = cfg.prefill_budget;
            while self.slots.len() + admitted.len() < cfg.max_batch {
                let Some(j) = st.queue.front() else { break };
                let first = j.prompt.len().min(cfg.prefill_chunk);
                if !admitted.is_empty() && first > budget {
                    break;
                }
                budget = budget.saturating_sub(first);
                admitted.push(st.queue.pop_front().expect("front exists"));
            }
            self.metrics().queued.set(st.queue.len());
            if !admitted.is_empty() || !self.slots.is_empty() {
                return Some(admitted);
            }
            if st.draining && st.queue.is_empty() {
                return None;
            }
            st = shared
                .wake
                .wait_timeout(st, Duration::from_millis(200))
                .expect("scheduler lock")
                .0;
        }
    }

    /// Starts `jobs` (their first prompt chunks) and joins them into the batch.
    fn start(&mut self, jobs: Vec<Job>) {
        let chunk = self.shared.config.prefill_chunk;
        let mut slots: Vec<Slot> = jobs.into_iter().map(Slot::new).collect();
        for s in &mut slots {
            s.fed = s.job.prompt.len().min(chunk);
            self.shared
                .metrics
                .prompt_tokens
                .add(s.job.prompt.len() as u64);
        }
        let seqs: Vec<NewSeq<'_>> = slots
            .iter()
            .map(|s| NewSeq {
                prefix: s.job.task.prefix().cloned(),
                positions: s.job.task.positions(),
                tokens: &s.job.prompt[..s.fed],
            })
            .collect();
        let engine = &mut self.engine;
        let started = guarded("prefill", || engine.start(&seqs));
        drop(seqs);
        let (new_cache, logits) = match started {
            Ok(x) => x,
            Err(e) => {
                let msg = format!("{e:#}");
                for s in &mut slots {
                    s.fail(&msg);
                }
                return;
            }
        };
        let vocab = self.vocab;
        for (row, s) in slots.iter_mut().enumerate() {
            if s.fed == s.job.prompt.len() {
                let z = &logits[row * vocab..(row + 1) * vocab];
                sample(s, z, &self.tok, &self.shared.metrics);
            }
        }
        let joined = match self.cache.as_mut() {
            None => {
                self.cache = Some(new_cache);
                Ok(())
            }
            Some(c) => {
                let engine = &mut self.engine;
                guarded("join", || engine.join(c.as_mut(), new_cache))
            }
        };
        self.slots.extend(slots);
        match joined {
            Ok(()) => self.retire(),
            Err(e) => self.fail_all(&format!("{e:#}")),
        }
    }

    /// Retires the sequences whose client went away.
    fn cancel_gone(&mut self) {
        let mut any = false;
        for s in &mut self.slots {
            if s.done.is_none() && s.job.events.is_closed() {
                s.done = Some(Done::Cancelled);
                any = true;
            }
        }
        if any {
            self.retire();
        }
    }

    /// One step of the whole batch.
    fn step(&mut self) {
        let cfg = self.shared.config;
        let mut budget = cfg.prefill_budget;
        let mut fed_now = vec![0; self.slots.len()];
        let tokens: Vec<Vec<u32>> = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| match s.last {
                Some(t) => vec![t],
                None => {
                    let left = s.job.prompt.len() - s.fed;
                    let n = left.min(cfg.prefill_chunk).min(budget.max(1));
                    budget = budget.saturating_sub(n);
                    fed_now[i] = n;
                    s.job.prompt[s.fed..s.fed + n].to_vec()
                }
            })
            .collect();
        let Some(cache) = self.cache.as_mut() else {
            self.fail_all("internal error: running sequences without a cache");
            return;
        };
        let engine = &mut self.engine;
        let logits = match guarded("decode step", || engine.step(cache.as_mut(), &tokens)) {
            Ok(l) => l,
            Err(e) => {
                self.fail_all(&format!("{e:#}"));
                return;
            }
        };
        self.metrics().steps.add(1);
        self.metrics().step_sequences.add(self.slots.len() as u64);
        let vocab = self.vocab;
        for (row, s) in self.slots.iter_mut().enumerate() {
            let z = &logits[row * vocab..(row + 1) * vocab];
            if s.last.is_some() {
                sample(s, z, &self.tok, &self.shared.metrics);
            } else {
                s.fed += fed_now[row];
                if s.fed == s.job.prompt.len() {
                    sample(s, z, &self.tok, &self.shared.metrics);
                }
            }
        }
        self.retire();
    }

    /// Fails every running sequence and drops the batch.
    fn fail_all(&mut self, message: &str) {
        for s in &mut self.slots {
            if s.done.is_none() {
                s.fail(message);
            }
        }
        self.slots.clear();
        self.cache = None;
        self.update_gauges();
    }

    /// Removes the finished and cancelled sequences from the batch.
    fn retire(&mut self) {
        let keep: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].done.is_none())
            .collect();
        if keep.len() < self.slots.len() {
            let cancelled = self
                .slots
                .iter()
                .filter(|s| s.done == Some(Done::Cancelled))
                .count();
            self.metrics().cancelled.add(cancelled as u64);
            if keep.is_empty() {
                self.cache = None;
                self.slots.clear();
            } else {
                let retained = match self.cache.as_mut() {
                    Some(c) => {
                        let engine = &mut self.engine;
                        guarded("retire", || engine.retain(c.as_mut(), &keep))
                    }
                    None => Err(anyhow!("internal error: running sequences without a cache")),
                };
                let mut i = 0;
                self.slots.retain(|_| {
                    i += 1;
                    keep.contains(&(i - 1))
                });
                if let Err(e) = retained {
                    self.fail_all(&format!("{e:#}"));
                    return;
                }
            }
        }
        self.update_gauges();
    }

    fn update_gauges(&mut self) {
        let sharing = match self.cache.as_mut() {
            Some(c) => self.engine.sharing(c.as_mut()),
            None => Default::default(),
        };
        let m = &self.shared.metrics;
        m.running.set(self.slots.len());
        m.prefix_sequences.set(sharing.sequences_with_prefix);
        m.prefixes_held.set(sharing.prefixes_held);
        m.prefix_bytes.set(sharing.prefix_bytes);
    }
}

/// Chooses the next token of `s` from its logits `z`, reports it, and marks the slot done when
/// it ends the sequence.
fn sample(s: &mut Slot, z: &[f32], tok: &Tokenizer, metrics: &Metrics) {
    if s.done.is_some() {
        return;
    }
    let p = s.job.params.clone();
    let t = match (&p.strategy, s.rng.as_mut()) {
        (Strategy::Sample(sp), Some(rng)) => sample_token(z, sp, rng),
        _ => argmax(z),
    } as u32;
    let logprob = p.logprobs.map(|k| {
        let lp = log_softmax(z);
        let mut order: Vec<usize> = (0..lp.len()).collect();
        let k = k.min(order.len());
        if k > 0 {
            order.select_nth_unstable_by(k - 1, |&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
            order.truncate(k);
            order.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
        } else {
            order.clear();
        }
        TokenLogprob {
            logprob: lp[t as usize],
            top: order.iter().map(|&i| (i as u32, lp[i])).collect(),
        }
    });
    let now = Instant::now();
    match s.last_token_at {
        None => metrics.ttft.observe((now - s.job.arrived).as_secs_f64()),
        Some(prev) => metrics.token_latency.observe((now - prev).as_secs_f64()),
    }
    s.last_token_at = Some(now);
    s.generated += 1;
    metrics.generation_tokens.add(1);
    let choice = s.job.choice;
    let mut finish = None;
    let text = if p.eos.contains(&t) {
        finish = Some(FinishReason::Stop);
        String::new()
    } else {
        match s.text.push(tok, t) {
            Ok(d) => {
                if d.stopped {
                    finish = Some(FinishReason::Stop);
                }
                d.text
            }
            Err(e) => {
                s.fail(&format!("decoding the generated tokens: {e:#}"));
                return;
            }
        }
    };
    if finish.is_none() && s.generated >= p.max_tokens {
        finish = Some(FinishReason::Length);
    }
    s.send(Event::Token {
        choice,
        token: t,
        text,
        logprob,
    });
    match finish {
        None => s.last = Some(t),
        Some(reason) => {
            let tail = match s.text.finish(tok) {
                Ok(d) => d.text,
                Err(e) => {
                    s.fail(&format!("decoding the generated tokens: {e:#}"));
                    return;
                }
            };
            let completion_tokens = s.generated;
            s.send(Event::Finished {
                choice,
                reason,
                text: tail,
                completion_tokens,
            });
            if s.done.is_none() {
                s.done = Some(Done::Finished);
            }
        }
    }
}
