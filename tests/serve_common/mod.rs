//! What the server tests share: the real `prefix-tune serve` binary started on a free loopback
//! port (and stopped when dropped), `curl` to talk to it, SSE parsing, prefix files, and
//! `prefix-tune generate` to compare with.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prefix_tune::model::LoadedModel;
use prefix_tune::prefix::{save_prefix, PrefixBank, PrefixMeta};
use prefix_tune::reference::model::Positions;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_prefix-tune");

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A running `prefix-tune serve`.
pub struct Server {
    child: Option<Child>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `prefix-tune serve --port 0 ARGS` and waits until it listens.
    pub fn start(args: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(["--port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting prefix-tune serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log2.lock().unwrap().push_str(&format!("{line}\n"));
                if let Some(addr) = line.strip_prefix("listening on http://") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.trim().to_string());
                    }
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "prefix-tune serve {args:?} did not start:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        Server {
            child: Some(child),
            addr,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Everything the server wrote on stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM and waits (at most `timeout`) for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let st = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -TERM failed");
        self.wait(timeout)
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let t0 = Instant::now();
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            if t0.elapsed() > timeout {
                let _ = child.kill();
                panic!(
                    "the server did not exit within {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asserts the server never panicked.
    pub fn assert_no_panic(&self) {
        let log = self.log();
        assert!(!log.contains("panicked"), "the server panicked:\n{log}");
    }

    /// `GET /metrics`, and one sample's value.
    pub fn metric(&self, name: &str) -> f64 {
        let r = curl(&self.url("/metrics"), "GET", None, &[]);
        assert_eq!(r.status, 200);
        prefix_tune::serve::metrics::sample(&r.body, name)
            .unwrap_or_else(|| panic!("no sample {name} in\n{}", r.body))
    }

    /// Waits until the running batch and the queue are empty.
    pub fn wait_idle(&self) {
        eventually("the batch and queue empty", || {
            self.metric("prefix_tune_batch_occupancy") == 0.0
                && self.metric("prefix_tune_queue_length") == 0.0
        });
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until `f` holds (at most 20 s).
pub fn eventually(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "timed out waiting: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A curl answer.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    /// Header lines, lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The curl command for one request (body from stdin).
pub fn curl_command(url: &str, method: &str, body: Option<&str>, headers: &[&str]) -> Command {
    let mut c = Command::new("curl");
    c.args(["-sS", "-i", "-N", "--max-time", "120", "-X", method, url]);
    for h in headers {
        c.args(["-H", h]);
    }
    if body.is_some() {
        c.args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            "@-",
        ]);
    }
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Splits curl's `-i` output.
pub fn parse_curl(out: &[u8]) -> Resp {
    let text = String::from_utf8_lossy(out).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {text:?}"));
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    Resp {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Starts a curl request in the background; [`finish`] collects it.
pub fn spawn_curl(url: &str, method: &str, body: Option<&str>, headers: &[&str]) -> Child {
    let mut child = curl_command(url, method, body, headers)
        .spawn()
        .expect("curl");
    let mut stdin = child.stdin.take().unwrap();
    if let Some(b) = body {
        stdin.write_all(b.as_bytes()).unwrap();
    }
    drop(stdin);
    child
}

pub fn finish(child: Child) -> Resp {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_curl(&out.stdout)
}

pub fn curl(url: &str, method: &str, body: Option<&str>, headers: &[&str]) -> Resp {
    finish(spawn_curl(url, method, body, headers))
}

pub fn post(server: &Server, path: &str, body: &Value) -> Resp {
    curl(&server.url(path), "POST", Some(&body.to_string()), &[])
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// A streamed completion reassembled: text, token ids, finish reason, usage, and whether it
/// ended with `[DONE]`.
#[derive(Debug, Default)]
pub struct Streamed {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish: Option<String>,
    pub usage: Option<Value>,
    pub done: bool,
    pub chunks: usize,
}

pub fn reassemble(body: &str, choice: u64) -> Streamed {
    let mut out = Streamed::default();
    for e in sse_events(body) {
        if e == "[DONE]" {
            out.done = true;
            continue;
        }
        assert!(!out.done, "data after [DONE]: {e}");
        let v: Value = serde_json::from_str(&e).unwrap_or_else(|x| panic!("{x}: {e}"));
        assert!(v.get("error").is_none(), "error event: {e}");
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            out.usage = Some(u.clone());
        }
        for c in v["choices"].as_array().unwrap() {
            if c["index"].as_u64() != Some(choice) {
                continue;
            }
            out.chunks += 1;
            let piece = c["text"]
                .as_str()
                .or_else(|| c["delta"]["content"].as_str())
                .unwrap_or("");
            out.text.push_str(piece);
            if let Some(ids) = c["token_ids"].as_array() {
                out.tokens
                    .extend(ids.iter().map(|t| t.as_u64().unwrap() as u32));
            }
            if let Some(f) = c["finish_reason"].as_str() {
                out.finish = Some(f.to_string());
            }
        }
    }
    out
}

/// Token ids of a JSON array.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list of ids: {v}"))
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

/// A random prefix file of length `len` for `m` (its fingerprint unless `fingerprint`).
pub fn prefix_file(
    m: &LoadedModel,
    dir: &Path,
    name: &str,
    len: usize,
    seed: u64,
    fingerprint: Option<&str>,
) -> PathBuf {
    let c = &m.weights.config;
    let bank = PrefixBank::<f32>::random(1, c.n_layers, c.n_kv_heads, len, c.head_dim, 1.0, seed);
    let meta = PrefixMeta::for_model(
        c,
        len,
        fingerprint.unwrap_or(&m.fingerprint),
        Positions::AfterPrefix,
        &serde_json::json!({}),
    );
    let path = dir.join(name);
    save_prefix(&path, &bank, &meta).unwrap();
    path
}

/// `prefix-tune generate ARGS --json`: one object per input.
pub fn generate_cli(args: &[&str]) -> Vec<Value> {
    let out = Command::new(BIN)
        .arg("generate")
        .args(args)
        .args(["--json", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "prefix-tune generate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A raw HTTP/1.1 request on a new connection; the connection is returned to read from.
pub fn raw_request(addr: &str, path: &str, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

/// Reads from `s` until `needle` has appeared; returns what was read.
pub fn read_until(s: &mut TcpStream, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        let n = s.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Reads everything until the peer closes or `[DONE]` arrives.
pub fn read_stream(s: &mut TcpStream) -> String {
    read_until(s, "data: [DONE]")
}
