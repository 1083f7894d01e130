//! The server's counters, gauges and histograms, and their Prometheus text exposition
//! (`GET /metrics`, format 0.0.4). Written by the HTTP handlers and the scheduler; every update
//! is a few atomic operations or a short lock.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A histogram with fixed bucket bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    /// Per bucket (not cumulative); the last is +Inf.
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum of the observations, in nanoseconds.
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add((seconds.max(0.0) * 1e9) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cum = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cum += c.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => format!("{b}"),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cum}");
        }
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

/// Bucket bounds of the time-to-first-token histogram (seconds).
const TTFT_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Bucket bounds of the per-token latency histogram (seconds).
const TOKEN_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A gauge holding a whole number.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: usize) {
        self.0.store(v as u64, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, v: u64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Everything `/metrics` shows.
#[derive(Debug)]
pub struct Metrics {
    /// Requests answered, by (endpoint, HTTP status).
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    /// Sequences cancelled because their client went away.
    pub cancelled: Counter,
    /// Connections refused at the connection limit.
    pub refused_connections: Counter,
    /// Decode steps run, and the sum over steps of the sequences in the batch (their ratio is
    /// the mean batch occupancy).
    pub steps: Counter,
    pub step_sequences: Counter,
    /// Sequences in the running batch now, and the most it takes.
    pub running: Gauge,
    pub max_batch: Gauge,
    /// Sequences waiting to be admitted.
    pub queued: Gauge,
    pub open_connections: Gauge,
    /// Prefixes as the running batch holds them: sequences with a prefix, distinct prefixes
    /// in memory, and their bytes.
    pub prefix_sequences: Gauge,
    pub prefixes_held: Gauge,
    pub prefix_bytes: Gauge,
    pub ttft: Histogram,
    pub token_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            cancelled: Counter::default(),
            refused_connections: Counter::default(),
            steps: Counter::default(),
            step_sequences: Counter::default(),
            running: Gauge::default(),
            max_batch: Gauge::default(),
            queued: Gauge::default(),
            open_connections: Gauge::default(),
            prefix_sequences: Gauge::default(),
            prefixes_held: Gauge::default(),
            prefix_bytes: Gauge::default(),
            ttft: Histogram::new(TTFT_BOUNDS),
            token_latency: Histogram::new(TOKEN_BOUNDS),
        }
    }
}

/// Escapes a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Counts one answered request.
    pub fn request(&self, endpoint: &str, status: u16) {
        let mut m = self.requests.lock().expect("metrics lock");
        *m.entry((endpoint.to_string(), status)).or_insert(0) += 1;
    }

    /// Requests answered on `endpoint` with `status` so far.
    pub fn requests(&self, endpoint: &str, status: u16) -> u64 {
        let m = self.requests.lock().expect("metrics lock");
        m.get(&(endpoint.to_string(), status)).copied().unwrap_or(0)
    }

    /// The Prometheus text exposition; `loaded_prefixes` is the registry's count.
    pub fn render(&self, loaded_prefixes: usize) -> String {
        let mut out = String::new();
        let mut simple = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {v}");
        };
        simple(
            "prefix_tune_prompt_tokens_total",
            "counter",
            "Prompt tokens of admitted sequences.",
            self.prompt_tokens.get(),
        );
        simple(
            "prefix_tune_generation_tokens_total",
            "counter",
            "Tokens generated.",
            self.generation_tokens.get(),
        );
        simple(
            "prefix_tune_cancelled_sequences_total",
            "counter",
            "Sequences cancelled because their client disconnected.",
            self.cancelled.get(),
        );
        simple(
            "prefix_tune_refused_connections_total",
            "counter",
            "Connections answered 503 at the connection limit.",
            self.refused_connections.get(),
        );
        simple(
            "prefix_tune_decode_steps_total",
            "counter",
            "Decode steps of the running batch.",
            self.steps.get(),
        );
        simple(
            "prefix_tune_decode_step_sequences_total",
            "counter",
            "Sum over decode steps of the sequences in the batch (divided by steps: the mean occupancy).",
            self.step_sequences.get(),
        );
        simple(
            "prefix_tune_batch_occupancy",
            "gauge",
            "Sequences in the running batch.",
            self.running.get(),
        );
        simple(
            "prefix_tune_batch_capacity",
            "gauge",
            "Most sequences in the running batch (--max-batch).",
            self.max_batch.get(),
        );
        simple(
            "prefix_tune_queue_length",
            "gauge",
            "Sequences waiting to be admitted into the batch.",
            self.queued.get(),
        );
        simple(
            "prefix_tune_open_connections",
            "gauge",
            "Open HTTP connections.",
            self.open_connections.get(),
        );
        simple(
            "prefix_tune_loaded_prefixes",
            "gauge",
            "Prefixes loaded (tasks besides the base model).",
            loaded_prefixes as u64,
        );
        simple(
            "prefix_tune_batch_prefix_sequences",
            "gauge",
            "Sequences of the running batch decoding with a prefix.",
            self.prefix_sequences.get(),
        );
        simple(
            "prefix_tune_batch_prefixes_held",
            "gauge",
            "Prefix key/value copies the running batch holds (distinct prefixes when shared).",
            self.prefixes_held.get(),
        );
        simple(
            "prefix_tune_batch_prefix_bytes",
            "gauge",
            "Bytes of the prefix keys/values the running batch holds.",
            self.prefix_bytes.get(),
        );
        {
            let m = self.requests.lock().expect("metrics lock");
            let _ = writeln!(
                out,
                "# HELP prefix_tune_requests_total HTTP requests answered."
            );
            let _ = writeln!(out, "# TYPE prefix_tune_requests_total counter");
            for ((endpoint, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "prefix_tune_requests_total{{endpoint=\"{}\",status=\"{status}\"}} {n}",
                    label(endpoint)
                );
            }
        }
        self.ttft.render(
            &mut out,
            "prefix_tune_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
        );
        self.token_latency.render(
            &mut out,
            "prefix_tune_time_per_output_token_seconds",
            "Between consecutive generated tokens of a sequence.",
        );
        out
    }
}

/// The value of the sample `name` (with its labels, exactly as written) in an exposition.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        for x in [0.05, 0.1, 0.5, 2.0] {
            h.observe(x);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert_eq!(sample(&out, "x_bucket{le=\"0.1\"}"), Some(2.0));
        assert_eq!(sample(&out, "x_bucket{le=\"1\"}"), Some(3.0));
        assert_eq!(sample(&out, "x_bucket{le=\"+Inf\"}"), Some(4.0));
        assert_eq!(sample(&out, "x_count"), Some(4.0));
        assert!((sample(&out, "x_sum").unwrap() - 2.65).abs() < 1e-6);
    }

    #[test]
    fn exposition_has_every_family_with_type_lines() {
        let m = Metrics::default();
        m.request("/v1/completions", 200);
        m.request("/v1/completions", 200);
        m.request("/v1/chat/completions", 400);
        m.generation_tokens.add(7);
        let text = m.render(3);
        assert_eq!(
            sample(
                &text,
                "prefix_tune_requests_total{endpoint=\"/v1/completions\",status=\"200\"}"
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, "prefix_tune_generation_tokens_total"),
            Some(7.0)
        );
        assert_eq!(sample(&text, "prefix_tune_loaded_prefixes"), Some(3.0));
        // Every sample's family has a TYPE line before it.
        let mut typed = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_string());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                    .unwrap_or(name);
                assert!(typed.contains(family), "{name} has no TYPE line");
            }
        }
    }
}
