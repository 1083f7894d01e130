//! A bounded load test of an OpenAI-compatible server on loopback: `clients` concurrent clients
//! send `requests` streamed greedy completions in all (`ignore_eos`, so each generates
//! `max_tokens` tokens), spread over a list of models (tasks), and stop by themselves. Every
//! request is checked: HTTP 200, one chunk per token, a finish reason, `usage`, `data: [DONE]`;
//! anything else counts as failed (an error answer) or lost (a stream that ended early). Greedy
//! answers to the same model and prompt must also be identical across the run.
//!
//! Measured: throughput (generated tokens / wall time), time to first token (request sent →
//! first token's chunk) and per-token latency (gaps between a stream's token chunks), p50/p99.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

/// What to send.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub addr: SocketAddr,
    pub api_key: Option<String>,
    /// Request `i` uses `models[i % len]`.
    pub models: Vec<String>,
    /// Request `i` uses `prompts[(i / models.len()) % len]`.
    pub prompts: Vec<String>,
    pub clients: usize,
    pub requests: usize,
    pub max_tokens: usize,
    /// Per request, from sending to `[DONE]`.
    pub timeout: Duration,
}

/// What one request did.
#[derive(Clone, Debug, Default)]
struct Outcome {
    ok: bool,
    lost: bool,
    error: Option<String>,
    text: String,
    tokens: usize,
    ttft: Option<f64>,
    gaps: Vec<f64>,
}

/// Percentiles of a sample (nearest rank); zeros when empty.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Quantiles {
    pub p50: f64,
    pub p99: f64,
    pub mean: f64,
}

impl Quantiles {
    pub fn of(mut xs: Vec<f64>) -> Self {
        if xs.is_empty() {
            return Quantiles::default();
        }
        xs.sort_by(f64::total_cmp);
        let at = |q: f64| xs[((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1];
        Quantiles {
            p50: at(0.50),
            p99: at(0.99),
            mean: xs.iter().sum::<f64>() / xs.len() as f64,
        }
    }
}

/// The result of a run.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub requests: usize,
    pub ok: usize,
    pub failed: usize,
    pub lost: usize,
    /// (model, prompt) pairs whose greedy answers differed between requests.
    pub inconsistent: usize,
    /// The first few error messages.
    pub errors: Vec<String>,
    pub completion_tokens: usize,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    pub ttft_s: Quantiles,
    pub token_latency_s: Quantiles,
}

impl LoadReport {
    pub fn to_json(&self) -> Value {
        let q = |x: &Quantiles| json!({"p50": x.p50, "p99": x.p99, "mean": x.mean});
        json!({
            "requests": self.requests,
            "ok": self.ok,
            "failed": self.failed,
            "lost": self.lost,
            "inconsistent": self.inconsistent,
            "errors": self.errors,
            "completion_tokens": self.completion_tokens,
            "wall_s": self.wall_s,
            "tokens_per_s": self.tokens_per_s,
            "ttft_s": q(&self.ttft_s),
            "token_latency_s": q(&self.token_latency_s),
        })
    }
}

/// A keep-alive HTTP/1.1 connection of one client.
struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

async fn connect(addr: SocketAddr) -> Result<Conn> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Conn { sender })
}

/// One streamed completion.
async fn one_request(conn: &mut Conn, opts: &LoadOptions, model: &str, prompt: &str) -> Outcome {
    let body = json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": opts.max_tokens,
        "temperature": 0,
        "stream": true,
        "ignore_eos": true,
        "return_token_ids": true,
    })
    .to_string();
    let mut req = Request::post("/v1/completions")
        .header("host", opts.addr.to_string())
        .header("content-type", "application/json");
    if let Some(k) = &opts.api_key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = match req.body(Full::new(Bytes::from(body))) {
        Ok(r) => r,
        Err(e) => return failed(format!("building the request: {e}")),
    };
    let sent = Instant::now();
    let resp = match conn.sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            return Outcome {
                lost: true,
                error: Some(format!("sending: {e}")),
                ..Default::default()
            }
        }
    };
    let status = resp.status();
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut out = Outcome::default();
    let mut last: Option<Instant> = None;
    let mut finished = false;
    let mut done = false;
    let mut usage_tokens = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                out.lost = true;
                out.error = Some(format!("reading the stream: {e}"));
                return out;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        if !status.is_success() {
            continue;
        }
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let line = String::from_utf8_lossy(&event);
            let Some(payload) = line.trim().strip_prefix("data: ") else {
                continue;
            };
            if payload == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = match serde_json::from_str(payload) {
                Ok(v) => v,
                Err(e) => return failed(format!("a chunk is not JSON ({e}): {payload}")),
            };
            if let Some(e) = v.get("error") {
                return failed(format!("error event: {e}"));
            }
            if let Some(u) = v.get("usage").and_then(|u| u.get("completion_tokens")) {
                usage_tokens = u.as_u64().map(|x| x as usize);
            }
            let Some(c) = v["choices"].get(0) else {
                continue;
            };
            let n = c["token_ids"].as_array().map_or(0, Vec::len);
            if n > 0 {
                let now = Instant::now();
                match last {
                    None => out.ttft = Some((now - sent).as_secs_f64()),
                    Some(p) => out.gaps.push((now - p).as_secs_f64()),
                }
                last = Some(now);
                out.tokens += n;
            }
            out.text.push_str(c["text"].as_str().unwrap_or(""));
            if !c["finish_reason"].is_null() {
                finished = true;
            }
        }
    }
    if !status.is_success() {
        return failed(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&buf)
                .chars()
                .take(300)
                .collect::<String>()
        ));
    }
    if !(done && finished) {
        out.lost = true;
        out.error = Some(format!(
            "the stream ended without {}",
            if finished {
                "[DONE]"
            } else {
                "a finish reason"
            }
        ));
        return out;
    }
    if usage_tokens != Some(out.tokens) || out.tokens != opts.max_tokens {
        return failed(format!(
            "{} token chunks, usage says {usage_tokens:?}, {} asked",
            out.tokens, opts.max_tokens
        ));
    }
    out.ok = true;
    out
}

fn failed(msg: String) -> Outcome {
    Outcome {
        error: Some(msg),
        ..Default::default()
    }
}

/// Runs the load test and reports.
pub async fn run_load(opts: &LoadOptions) -> Result<LoadReport> {
    if opts.models.is_empty() || opts.prompts.is_empty() || opts.clients == 0 {
        bail!("the load test needs at least one model, one prompt and one client");
    }
    let next = Arc::new(AtomicUsize::new(0));
    let results: Arc<Mutex<Vec<(usize, Outcome)>>> = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..opts.clients.min(opts.requests.max(1)) {
        let next = next.clone();
        let results = results.clone();
        let opts = opts.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn: Option<Conn> = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= opts.requests {
                    break;
                }
                let model = &opts.models[i % opts.models.len()];
                let prompt = &opts.prompts[(i / opts.models.len()) % opts.prompts.len()];
                if conn.is_none() {
                    match connect(opts.addr).await {
                        Ok(c) => conn = Some(c),
                        Err(e) => {
                            results
                                .lock()
                                .expect("results")
                                .push((i, failed(format!("{e:#}"))));
                            continue;
                        }
                    }
                }
                let c = conn.as_mut().expect("connected");
                let outcome =
                    match tokio::time::timeout(opts.timeout, one_request(c, &opts, model, prompt))
                        .await
                    {
                        Ok(o) => o,
                        Err(_) => Outcome {
                            lost: true,
                            error: Some(format!("no answer within {:?}", opts.timeout)),
                            ..Default::default()
                        },
                    };
                if !outcome.ok {
                    conn = None; // start afresh after any trouble
                }
                results.lock().expect("results").push((i, outcome));
            }
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| anyhow!("a load client panicked: {e}"))?;
    }
    let wall = t0.elapsed().as_secs_f64();
    let results = std::mem::take(&mut *results.lock().expect("results"));
    let mut r = LoadReport {
        requests: opts.requests,
        wall_s: wall,
        ..Default::default()
    };
    let mut ttft = Vec::new();
    let mut gaps = Vec::new();
    let mut answers: HashMap<(String, String), Vec<String>> = HashMap::new();
    for (i, o) in &results {
        if o.ok {
            r.ok += 1;
            r.completion_tokens += o.tokens;
            ttft.extend(o.ttft);
            gaps.extend(&o.gaps);
            let key = (
                opts.models[i % opts.models.len()].clone(),
                opts.prompts[(i / opts.models.len()) % opts.prompts.len()].clone(),
            );
            answers.entry(key).or_default().push(o.text.clone());
        } else if o.lost {
            r.lost += 1;
        } else {
            r.failed += 1;
        }
        if let Some(e) = &o.error {
            if r.errors.len() < 5 {
                r.errors.push(format!("request {i}: {e}"));
            }
        }
    }
    // A request that never reported is lost too.
    r.lost += opts.requests.saturating_sub(results.len());
    r.inconsistent = answers
        .values()
        .filter(|texts| texts.iter().any(|t| t != &texts[0]))
        .count();
    r.tokens_per_s = r.completion_tokens as f64 / wall.max(1e-9);
    r.ttft_s = Quantiles::of(ttft);
    r.token_latency_s = Quantiles::of(gaps);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::Quantiles;

    #[test]
    fn nearest_rank_quantiles() {
        let q = Quantiles::of((1..=100).map(f64::from).collect());
        assert_eq!((q.p50, q.p99), (50.0, 99.0));
        assert!((q.mean - 50.5).abs() < 1e-12);
        let one = Quantiles::of(vec![3.0]);
        assert_eq!((one.p50, one.p99), (3.0, 3.0));
        assert_eq!(Quantiles::of(vec![]), Quantiles::default());
    }
}
