//! `prefix-tune serve` (the OpenAI-compatible server, [`crate::serve`]) and `prefix-tune bench
//! serve` (its load test): arguments checked into a plan, then run.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use super::{load_model_arg, parse_positions, positive_usize};
use crate::engine::Device;
use crate::prefix::PrefixBank;
use crate::reference::model::Positions;
use crate::serve::load::{run_load, LoadOptions, LoadReport};
use crate::serve::registry::check_prefix_name;
use crate::serve::scheduler::SchedulerConfig;
use crate::serve::{serve_on, shutdown_signal, start, ServeOptions};

/// Arguments of `prefix-tune serve`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  prefix-tune serve --model SmolLM2-135M-Instruct.Q4_1.gguf --prefix e2e=run1 --prefix qa=qa-adapter
  curl http://127.0.0.1:8000/v1/completions -H 'content-type: application/json' \\
      -d '{\"model\": \"e2e\", \"prompt\": \"name[Aromi], food[Chinese]\", \"max_tokens\": 40, \"temperature\": 0}'
  (model: \"<base>\" for the base model, \"<base>:<prefix>\" or the bare prefix name for a prefix;
  GET /v1/models lists them)")]
pub struct ServeArgs {
    /// The model: an HF directory (config.json + safetensors + tokenizer) or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// A prefix to serve, NAME=PATH (a prefix file, training --out directory or PEFT adapter
    /// directory); without NAME= the file or directory name. Repeat for several.
    #[arg(long = "prefix", value_name = "[NAME=]PATH")]
    pub prefixes: Vec<String>,
    /// Address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// The base model's name in requests' "model" (default: the model's file or directory name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Positions of the real tokens for every prefix: after-prefix or from-zero. Default: the
    /// convention each prefix was trained with.
    #[arg(long, value_parser = parse_positions)]
    pub positions: Option<Positions>,
    /// A Jinja chat template file, instead of the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 32, value_parser = positive_usize)]
    pub max_batch: usize,
    /// Most sequences waiting for a place in the batch (past it: 429).
    #[arg(long, default_value_t = 256, value_parser = positive_usize)]
    pub max_queue: usize,
    /// Most prompt + generated tokens per sequence (default: the model's positions, at most 4096).
    #[arg(long, value_parser = positive_usize)]
    pub max_context: Option<usize>,
    /// Largest max_tokens a request may ask for (and the chat default).
    #[arg(long, default_value_t = 1024, value_parser = positive_usize)]
    pub max_tokens: usize,
    /// Largest n (choices per prompt).
    #[arg(long, default_value_t = 8, value_parser = positive_usize)]
    pub max_n: usize,
    /// Most prompt tokens a sequence feeds in one step (longer prompts are fed in chunks).
    #[arg(long, default_value_t = 128, value_parser = positive_usize)]
    pub prefill_chunk: usize,
    /// Most prompt tokens fed per scheduler iteration, all sequences together.
    #[arg(long, default_value_t = 256, value_parser = positive_usize)]
    pub prefill_budget: usize,
    /// Largest request body.
    #[arg(long, default_value_t = 1 << 20, value_parser = positive_usize)]
    pub max_body_bytes: usize,
    /// Most open connections (past it: 503).
    #[arg(long, default_value_t = 256, value_parser = positive_usize)]
    pub max_connections: usize,
    /// A file of API keys, one per line: requests must send `Authorization: Bearer KEY`. Also
    /// from PREFIX_TUNE_API_KEYS (comma-separated). Without either, no key is needed.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// A file holding the admin key that POST/DELETE /v1/prefixes need (also
    /// PREFIX_TUNE_ADMIN_KEY). Without it, loading and unloading prefixes is refused.
    #[arg(long)]
    pub admin_key_file: Option<PathBuf>,
    /// A directory POST /v1/prefixes may load from (repeat; default: any path the server can read).
    #[arg(long = "prefix-dir")]
    pub prefix_dirs: Vec<PathBuf>,
    /// Seconds SIGTERM waits for running requests before cancelling them.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,
}

/// `NAME=PATH`, or a path whose file name becomes the name.
fn parse_named_prefix(s: &str) -> Result<(String, PathBuf)> {
    ensure!(!s.is_empty(), "--prefix: empty argument");
    if let Some((name, path)) = s.split_once('=') {
        if !name.contains(['/', '\\']) && !Path::new(s).exists() {
            ensure!(!path.is_empty(), "--prefix {s}: no path after `{name}=`");
            check_prefix_name(name).with_context(|| format!("--prefix {s}"))?;
            return Ok((name.to_string(), PathBuf::from(path)));
        }
    }
    let path = PathBuf::from(s);
    let name = path
        .file_stem()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    check_prefix_name(&name).with_context(|| {
        format!("--prefix {s}: name it (NAME=PATH); clients choose it with \"model\": \"NAME\"")
    })?;
    Ok((name, path))
}

/// Keys from a file (one per line, blank lines and `#` comments skipped) and a variable.
fn read_keys(file: Option<&Path>, var: &str) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    if let Some(f) = file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
        ensure!(!keys.is_empty(), "{}: no key in the file", f.display());
    }
    if let Ok(v) = std::env::var(var) {
        keys.extend(
            v.split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(String::from),
        );
    }
    Ok(keys)
}

/// The base model's default name: the file name without extension, or the directory name.
fn default_served_name(model: &Path) -> String {
    let name = if model.is_file() {
        model.file_stem()
    } else {
        model.file_name()
    };
    name.and_then(|n| n.to_str()).unwrap_or("model").to_string()
}

/// The checked plan of `prefix-tune serve`.
struct ServePlan {
    model: PathBuf,
    addr: SocketAddr,
    prefixes: Vec<(String, PathBuf)>,
    opts: ServeOptions,
}

fn plan(a: ServeArgs) -> Result<ServePlan> {
    let prefixes: Vec<(String, PathBuf)> = a
        .prefixes
        .iter()
        .map(|s| parse_named_prefix(s))
        .collect::<Result<_>>()?;
    for (i, (n, p)) in prefixes.iter().enumerate() {
        if prefixes[..i].iter().any(|(m, _)| m == n) {
            bail!("--prefix: the name {n:?} is given twice");
        }
        ensure!(
            p.exists(),
            "--prefix {n}={}: no such file or directory",
            p.display()
        );
    }
    ensure!(
        a.model.exists(),
        "model {}: no such file or directory (give an HF model directory or a .gguf file)",
        a.model.display()
    );
    if let Some(f) = &a.chat_template {
        ensure!(f.is_file(), "--chat-template {}: no such file", f.display());
    }
    let served_name = a
        .served_model_name
        .clone()
        .unwrap_or_else(|| default_served_name(&a.model));
    ensure!(
        !served_name.is_empty() && !served_name.contains(':'),
        "--served-model-name {served_name:?}: must be non-empty and without ':' (clients write \
         \"<base>:<prefix>\")"
    );
    if let Some((n, _)) = prefixes.iter().find(|(n, _)| *n == served_name) {
        bail!("--prefix {n}: the same name as the base model; rename one");
    }
    let api_keys = read_keys(a.api_key_file.as_deref(), "PREFIX_TUNE_API_KEYS")?;
    let admin = read_keys(a.admin_key_file.as_deref(), "PREFIX_TUNE_ADMIN_KEY")?;
    ensure!(
        admin.len() <= 1,
        "give one admin key (--admin-key-file or PREFIX_TUNE_ADMIN_KEY), not {}",
        admin.len()
    );
    if !a.host.is_loopback() && api_keys.is_empty() {
        eprintln!(
            "warning: listening on {} without API keys: anyone who can reach it can use it \
             (--api-key-file)",
            a.host
        );
    }
    let max_context = a.max_context;
    if let Some(c) = max_context {
        ensure!(c >= 2, "--max-context {c}: must be at least 2");
    }
    Ok(ServePlan {
        model: a.model,
        addr: SocketAddr::new(a.host, a.port),
        prefixes,
        opts: ServeOptions {
            device: a.device,
            served_name,
            positions: a.positions,
            chat_template: a.chat_template,
            scheduler: SchedulerConfig {
                max_batch: a.max_batch,
                max_queue: a.max_queue,
                prefill_chunk: a.prefill_chunk,
                prefill_budget: a.prefill_budget,
            },
            max_context,
            max_tokens: a.max_tokens,
            max_n: a.max_n,
            max_body_bytes: a.max_body_bytes,
            max_connections: a.max_connections,
            api_keys,
            admin_key: admin.into_iter().next(),
            prefix_dirs: a.prefix_dirs,
            drain_timeout: Duration::from_secs(a.drain_timeout),
        },
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("prefix-tune-http")
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs `prefix-tune serve`.
pub fn run(a: ServeArgs) -> Result<()> {
    let p = plan(a)?;
    let model = load_model_arg(&p.model)?;
    let (app, scheduler) = start(model, &p.opts, &p.prefixes)?;
    let rt = runtime()?;
    let served = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(p.addr)
            .await
            .with_context(|| format!("listening on {}", p.addr))?;
        let addr = listener.local_addr()?;
        let mut names = vec![app.registry.base().to_string()];
        names.extend(
            app.registry
                .prefix_names()
                .iter()
                .map(|n| format!("{}:{n}", app.registry.base())),
        );
        eprintln!("models: {}", names.join(", "));
        eprintln!("listening on http://{addr}");
        serve_on(listener, app.clone(), shutdown_signal()).await
    });
    app.scheduler.drain();
    scheduler.join();
    served?;
    eprintln!("serve: stopped");
    Ok(())
}

/// Arguments of `prefix-tune bench serve`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  prefix-tune bench serve --model SmolLM2-135M-Instruct.Q4_1.gguf --prefixes 8 --clients 64 --requests 256
  prefix-tune bench serve --url 127.0.0.1:8000 --model-name smol:e2e --model-name smol:qa
  (with --model the server runs in this process, on loopback, with --prefixes random prefixes;
  it measures all prefixes mixed, then one prefix, unless --only says otherwise)")]
pub struct BenchServeArgs {
    /// Start a server in this process on this model (with random prefixes).
    #[arg(long, conflicts_with = "url", required_unless_present = "url")]
    pub model: Option<PathBuf>,
    /// Load a running server instead (host:port, on this machine).
    #[arg(long)]
    pub url: Option<String>,
    /// With --url: the models (tasks) to spread requests over (repeat).
    #[arg(long = "model-name", requires = "url")]
    pub model_names: Vec<String>,
    /// With --url: the API key to send.
    #[arg(long, requires = "url")]
    pub api_key: Option<String>,
    /// With --model: random prefixes to serve and mix.
    #[arg(long, default_value_t = 8, value_parser = positive_usize)]
    pub prefixes: usize,
    /// With --model: their length.
    #[arg(long, default_value_t = 10, value_parser = positive_usize)]
    pub prefix_len: usize,
    /// With --model: which runs: the mix of all prefixes, one prefix, or both.
    #[arg(long, value_enum, default_value_t = Only::Both)]
    pub only: Only,
    /// With --model: where the server runs.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// With --model: the server's --max-batch.
    #[arg(long, default_value_t = 64, value_parser = positive_usize)]
    pub max_batch: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64, value_parser = positive_usize)]
    pub clients: usize,
    /// Requests in all (per run).
    #[arg(long, default_value_t = 256, value_parser = positive_usize)]
    pub requests: usize,
    /// Tokens each request generates (ignore_eos).
    #[arg(long, default_value_t = 32, value_parser = positive_usize)]
    pub max_tokens: usize,
    /// Prompts, used in turn (default: a few short ones).
    #[arg(long = "prompt")]
    pub prompts: Vec<String>,
    /// With --model: rounds of the runs, alternating (mix, one, mix, one, ...), to see the
    /// noise of a shared machine; the ratio is of the medians.
    #[arg(long, default_value_t = 1, value_parser = positive_usize)]
    pub repeat: usize,
    /// Seconds one request may take.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// One JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
}

/// Which runs of the in-process load test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    Mix,
    One,
    Both,
}

const DEFAULT_PROMPTS: &[&str] = &[
    "The capital of France is",
    "Once upon a time, in a small village,",
    "name[Aromi], eatType[coffee shop], food[Chinese], area[city centre]",
    "def fibonacci(n):",
];

/// `/proc/loadavg`'s first three numbers.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// The CPU model and count.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let n = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {n} CPUs")
}

/// `YYYY-MM-DD HH:MM UTC` of a Unix time.
fn utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

fn print_report(label: &str, r: &LoadReport) {
    eprintln!(
        "{label}: {} requests: {} ok, {} failed, {} lost, {} inconsistent; {} tokens in {:.1}s = \
         {:.1} tokens/s; time to first token p50 {:.3}s p99 {:.3}s; per-token latency p50 \
         {:.4}s p99 {:.4}s",
        r.requests,
        r.ok,
        r.failed,
        r.lost,
        r.inconsistent,
        r.completion_tokens,
        r.wall_s,
        r.tokens_per_s,
        r.ttft_s.p50,
        r.ttft_s.p99,
        r.token_latency_s.p50,
        r.token_latency_s.p99
    );
    for e in &r.errors {
        eprintln!("  {e}");
    }
}

/// Runs `prefix-tune bench serve`.
pub fn bench(a: BenchServeArgs) -> Result<()> {
    let prompts: Vec<String> = if a.prompts.is_empty() {
        DEFAULT_PROMPTS.iter().map(|s| s.to_string()).collect()
    } else {
        a.prompts.clone()
    };
    let command: Vec<String> = std::env::args().collect();
    let started = crate::serve::registry::unix_now();
    let load_before = loadavg();
    let rt = runtime()?;
    let base_opts = |addr, models: Vec<String>, key: Option<String>| LoadOptions {
        addr,
        api_key: key,
        models,
        prompts: prompts.clone(),
        clients: a.clients,
        requests: a.requests,
        max_tokens: a.max_tokens,
        timeout: Duration::from_secs(a.timeout),
    };
    let mut runs: Vec<(String, LoadReport)> = Vec::new();
    let mut engine = String::from("external server");
    if let Some(url) = &a.url {
        let addr: SocketAddr = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .with_context(|| format!("--url {url}: give host:port, e.g. 127.0.0.1:8000"))?;
        ensure!(
            addr.ip().is_loopback(),
            "--url {url}: the load test only targets this machine (a loopback address)"
        );
        ensure!(
            !a.model_names.is_empty(),
            "--url: give the models to load with --model-name (repeat)"
        );
        let opts = base_opts(addr, a.model_names.clone(), a.api_key.clone());
        let r = rt.block_on(run_load(&opts))?;
        runs.push(("external".into(), r));
    } else {
        let model_path = a.model.as_ref().expect("clap requires --model or --url");
        let model = load_model_arg(model_path)?;
        let cfg = model.weights.config.clone();
        let base = default_served_name(model_path);
        let opts = ServeOptions {
            device: a.device,
            served_name: base.clone(),
            positions: None,
            chat_template: None,
            scheduler: SchedulerConfig {
                max_batch: a.max_batch,
                max_queue: a.requests.max(a.clients) + 16,
                prefill_chunk: 128,
                prefill_budget: 256,
            },
            max_context: None,
            max_tokens: a.max_tokens,
            max_n: 1,
            max_body_bytes: 1 << 20,
            max_connections: a.clients + 16,
            api_keys: Vec::new(),
            admin_key: None,
            prefix_dirs: Vec::new(),
            drain_timeout: Duration::from_secs(5),
        };
        let (app, scheduler) = start(model, &opts, &[])?;
        engine = scheduler.engine.clone();
        let mut names = Vec::new();
        for i in 0..a.prefixes {
            let bank = PrefixBank::<f32>::random(
                1,
                cfg.n_layers,
                cfg.n_kv_heads,
                a.prefix_len,
                cfg.head_dim,
                1.0,
                1000 + i as u64,
            );
            let name = format!("p{i}");
            app.registry
                .insert(&name, bank, Positions::AfterPrefix, None)?;
            names.push(format!("{base}:{name}"));
        }
        let result = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let server = tokio::spawn(serve_on(listener, app.clone(), async move {
                let _ = stop_rx.await;
            }));
            let mut out = Vec::new();
            let one_round: Vec<(&str, Vec<String>)> = match a.only {
                Only::Mix => vec![("mix", names.clone())],
                Only::One => vec![("one", vec![names[0].clone()])],
                Only::Both => vec![("mix", names.clone()), ("one", vec![names[0].clone()])],
            };
            for round in 0..a.repeat {
                for (label, models) in &one_round {
                    let t = Instant::now();
                    let r = run_load(&base_opts(addr, models.clone(), None)).await?;
                    eprintln!(
                        "({label} run {} of {} took {:.1}s)",
                        round + 1,
                        a.repeat,
                        t.elapsed().as_secs_f64()
                    );
                    out.push((
                        if *label == "mix" {
                            format!("mix of {} prefixes", names.len())
                        } else {
                            "one prefix".to_string()
                        },
                        r,
                    ));
                }
            }
            let _ = stop_tx.send(());
            server.await??;
            anyhow::Ok(out)
        });
        app.scheduler.drain();
        scheduler.join();
        runs = result?;
    }
    let load_after = loadavg();
    let mut report = json!({
        "date": utc(started),
        "machine": machine(),
        "engine": engine,
        "command": command.join(" "),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "clients": a.clients,
        "requests": a.requests,
        "max_tokens": a.max_tokens,
        "prefix_len": a.prefix_len,
        "repeat": a.repeat,
        "runs": runs.iter().map(|(l, r)| {
            let mut v = r.to_json();
            v["label"] = json!(l);
            v
        }).collect::<Vec<Value>>(),
    });
    // Runs alternate (mix, one, mix, one, ...): the ratio of the medians.
    let median = |want_mix: bool| {
        let mut v: Vec<f64> = runs
            .iter()
            .filter(|(l, _)| l.starts_with("mix") == want_mix)
            .map(|(_, r)| r.tokens_per_s)
            .collect();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    };
    if let (Some(mix), Some(one)) = (median(true), median(false)) {
        if one > 0.0 {
            report["median_tokens_per_s_mix"] = json!(mix);
            report["median_tokens_per_s_one"] = json!(one);
            report["mix_over_one"] = json!(mix / one);
        }
    }
    eprintln!(
        "{} | {} | {}\ncommand: {}\nload average before {load_before}, after {load_after}",
        report["date"].as_str().unwrap_or(""),
        report["machine"].as_str().unwrap_or(""),
        engine,
        command.join(" ")
    );
    for (l, r) in &runs {
        print_report(l, r);
    }
    if let Some(x) = report.get("mix_over_one") {
        eprintln!(
            "mix / one throughput (medians over {} round(s)): {:.3}",
            a.repeat,
            x.as_f64().unwrap_or(0.0)
        );
    }
    if a.json {
        println!("{report}");
    }
    let bad: usize = runs.iter().map(|(_, r)| r.failed + r.lost).sum();
    ensure!(bad == 0, "{bad} request(s) failed or were lost");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13 UTC");
    }

    #[test]
    fn named_prefixes() {
        assert_eq!(
            parse_named_prefix("e2e=runs/a").unwrap(),
            ("e2e".to_string(), PathBuf::from("runs/a"))
        );
        assert_eq!(parse_named_prefix("runs/run1").unwrap().0, "run1");
        assert_eq!(parse_named_prefix("x/p.safetensors").unwrap().0, "p");
        assert!(parse_named_prefix("a:b=x").is_err());
        assert!(parse_named_prefix("e2e=").is_err());
    }
}
