//! `prefix-tune serve`: an OpenAI-compatible HTTP server over one frozen model and any number of
//! prefixes, with continuous batching of requests that mix prefixes.
//!
//! - [`api`]: request checking and response/chunk JSON (OpenAI's shapes and error bodies);
//! - [`chat`]: chat templates (GGUF metadata, HF tokenizer configuration, or a file);
//! - [`registry`]: the tasks (base model, prefixes by name), loaded and unloaded at run time;
//! - [`scheduler`]: the continuous-batching loop on its own thread, owning the engine;
//! - [`engine`]: the interface the scheduler drives, for the CPU reference and the GPU engine;
//! - [`text`]: incremental detokenization and stop strings;
//! - [`metrics`]: Prometheus counters and histograms;
//! - [`http`]: routes, keys, limits, SSE, the connection limit, graceful shutdown;
//! - [`load`]: the load-test client (`prefix-tune bench serve`).
//!
//! [`App`] is what the handlers share; [`start`] loads everything and starts the scheduler,
//! [`serve_on`] runs the HTTP server until a shutdown signal, then drains.

pub mod api;
pub mod chat;
pub mod engine;
pub mod http;
pub mod load;
pub mod metrics;
pub mod registry;
pub mod scheduler;
pub mod text;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use self::api::Limits;
use self::chat::ChatTemplate;
use self::engine::{BatchEngine, CpuBatchEngine};
use self::metrics::Metrics;
use self::registry::Registry;
use self::scheduler::{Scheduler, SchedulerConfig, SchedulerHandle};
use crate::engine::Device;
use crate::model::config::{ModelConfig, ModelWeights};
use crate::model::tokenizer::Tokenizer;
use crate::model::LoadedModel;
use crate::reference::model::Positions;

/// Everything the handlers share.
pub struct App {
    pub registry: Registry,
    pub tokenizer: Arc<Tokenizer>,
    pub config: ModelConfig,
    pub fingerprint: String,
    pub chat: Option<ChatTemplate>,
    /// End-of-sequence tokens: the tokenizer's and the model configuration's.
    pub eos: Vec<u32>,
    pub limits: Limits,
    pub scheduler: SchedulerHandle,
    pub metrics: Arc<Metrics>,
    pub api_keys: Vec<String>,
    pub admin_key: Option<String>,
    pub max_body_bytes: usize,
    /// Directories `POST /v1/prefixes` may read from (canonical; empty: any path).
    pub prefix_dirs: Vec<PathBuf>,
    pub connections: Arc<Semaphore>,
    pub max_connections: usize,
    pub drain_timeout: Duration,
}

/// How to serve (the checked command line).
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub device: Device,
    /// The base model's name in `model` fields.
    pub served_name: String,
    /// Positions forced for every prefix (default: each prefix's own).
    pub positions: Option<Positions>,
    pub chat_template: Option<PathBuf>,
    pub scheduler: SchedulerConfig,
    /// Prompt + generated tokens per sequence (default: the model's positions, at most 4096).
    pub max_context: Option<usize>,
    pub max_tokens: usize,
    pub max_n: usize,
    pub max_body_bytes: usize,
    pub max_connections: usize,
    pub api_keys: Vec<String>,
    pub admin_key: Option<String>,
    pub prefix_dirs: Vec<PathBuf>,
    pub drain_timeout: Duration,
}

/// The default context: the model's positions, at most this.
const DEFAULT_MAX_CONTEXT: usize = 4096;

/// Loads the prefixes and chat template, opens the engine on the scheduler thread and returns
/// what the handlers share, with the scheduler.
pub fn start(
    model: LoadedModel,
    opts: &ServeOptions,
    prefixes: &[(String, PathBuf)],
) -> Result<(Arc<App>, Scheduler)> {
    let LoadedModel {
        weights,
        tokenizer,
        source,
        fingerprint,
    } = model;
    let config = weights.config.clone();
    let tokenizer = Arc::new(tokenizer);
    let registry = Registry::new(&opts.served_name, opts.positions);
    for (name, path) in prefixes {
        let t = registry
            .load(name, path, &config, &fingerprint)
            .with_context(|| format!("--prefix {name}={}", path.display()))?;
        eprintln!(
            "prefix {name}: {} (length {}, positions {})",
            path.display(),
            t.prefix.bank.len,
            crate::prefix::file::positions_name(t.positions)
        );
    }
    let chat = ChatTemplate::for_model(&source, opts.chat_template.as_deref(), &tokenizer)?;
    match &chat {
        Some(c) => eprintln!("chat template: {}", c.source),
        None => eprintln!(
            "note: {} has no chat template; /v1/chat/completions answers 400 (give \
             --chat-template FILE)",
            source.display()
        ),
    }
    let mut eos = tokenizer.eos_token_ids().to_vec();
    for &e in &config.eos_token_ids {
        if !eos.contains(&e) {
            eos.push(e);
        }
    }
    let max_context = opts
        .max_context
        .unwrap_or(config.max_positions.min(DEFAULT_MAX_CONTEXT));
    if max_context < 2 {
        bail!("--max-context {max_context}: must be at least 2 (a prompt token and a new one)");
    }
    let limits = Limits {
        max_context,
        max_prompt_tokens: max_context - 1,
        max_tokens: opts.max_tokens.min(max_context - 1),
        max_n: opts.max_n,
        max_sequences: opts.scheduler.max_queue,
    };
    let kv_bytes = 2 * config.n_layers * config.n_kv_heads * config.head_dim * 4;
    eprintln!(
        "limits: batch {} sequences, queue {}, context {max_context} tokens (KV cache up to \
         {:.0} MiB on the CPU engine), max_tokens {}, n {}",
        opts.scheduler.max_batch,
        opts.scheduler.max_queue,
        (opts.scheduler.max_batch * max_context * kv_bytes) as f64 / (1u64 << 20) as f64,
        limits.max_tokens,
        opts.max_n
    );
    let metrics = Arc::new(Metrics::default());
    let weights = Arc::new(weights);
    let device = opts.device;
    let w2 = weights.clone();
    let scheduler = Scheduler::start(
        move || open_batch_engine(w2, device),
        tokenizer.clone(),
        opts.scheduler,
        metrics.clone(),
    )?;
    drop(weights);
    eprintln!("engine: {}", scheduler.engine);
    let mut prefix_dirs = Vec::new();
    for d in &opts.prefix_dirs {
        prefix_dirs.push(
            d.canonicalize()
                .with_context(|| format!("--prefix-dir {}", d.display()))?,
        );
    }
    let app = Arc::new(App {
        registry,
        tokenizer,
        config,
        fingerprint,
        chat,
        eos,
        limits,
        scheduler: scheduler.handle.clone(),
        metrics,
        api_keys: opts.api_keys.clone(),
        admin_key: opts.admin_key.clone(),
        max_body_bytes: opts.max_body_bytes,
        prefix_dirs,
        connections: Arc::new(Semaphore::new(opts.max_connections)),
        max_connections: opts.max_connections,
        drain_timeout: opts.drain_timeout,
    });
    Ok((app, scheduler))
}

/// The engine for `device` (`auto`: the GPU engine when it can run, else the CPU).
pub fn open_batch_engine(
    weights: Arc<ModelWeights<f32>>,
    device: Device,
) -> Result<Box<dyn BatchEngine>> {
    use crate::cuda::engine::CudaEngine;
    match device {
        Device::Cpu => Ok(Box::new(CpuBatchEngine::new(weights))),
        Device::Cuda => match CudaEngine::new(weights) {
            Ok(e) => Ok(Box::new(e)),
            Err(e) => bail!("--device cuda: {e:#}"),
        },
        Device::Auto => match CudaEngine::new(weights.clone()) {
            Ok(e) => Ok(Box::new(e)),
            Err(e) => {
                if crate::cuda::gpu_available().is_ok() {
                    eprintln!(
                        "note: a GPU is present but the GPU engine cannot run: {e:#}; using the CPU"
                    );
                }
                Ok(Box::new(CpuBatchEngine::new(weights)))
            }
        },
    }
}

/// Serves HTTP on `listener` until `shutdown` completes; then refuses new requests (503),
/// lets the accepted ones finish (at most the drain timeout, after which they are cancelled)
/// and returns.
pub async fn serve_on(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let app2 = app.clone();
    let graceful = async move {
        shutdown.await;
        app2.scheduler.drain();
        let _ = tx.send(());
    };
    let listener = http::LimitedListener {
        inner: listener,
        app: app.clone(),
    };
    let server = axum::serve(listener, http::router(app.clone())).with_graceful_shutdown(graceful);
    let mut server = std::pin::pin!(std::future::IntoFuture::into_future(server));
    let timeout = app.drain_timeout;
    tokio::select! {
        r = &mut server => r.context("serving HTTP")?,
        _ = async { if rx.await.is_ok() { tokio::time::sleep(timeout).await } else { std::future::pending::<()>().await } } => {
            eprintln!(
                "serve: requests still running after the drain timeout ({}s): cancelling them",
                timeout.as_secs_f64()
            );
            app.scheduler.abort();
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut server).await;
        }
    }
    Ok(())
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => eprintln!("serve: SIGTERM: draining running requests"),
            _ = tokio::signal::ctrl_c() => eprintln!("serve: interrupted: draining running requests"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
