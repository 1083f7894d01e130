//! `prefix-tune serve` as a real process driven by `curl` (and raw sockets where a client must
//! misbehave), on the tiny HF fixtures:
//!
//! - concurrent completions mixing prefixes (two prefix files of different lengths, a PEFT
//!   adapter, the base model), streamed and not, equal `prefix-tune generate` token for token;
//!   `n` with a seed equals generate's sampling of the same input repeated;
//! - chat: refused without a template, and a `--chat-template` rendered and streamed;
//! - every kind of bad input gets an OpenAI-style error with the right status, and the server
//!   is left idle and working;
//! - prefixes loaded and unloaded at run time (admin key), a prefix for another model refused;
//! - a client that disconnects mid-stream frees its place; overload gets 429 / 503 with
//!   `Retry-After`; SIGTERM lets running streams finish and stops;
//! - on the real SmolLM2 (skipped without it, required under `PREFIX_TUNE_REQUIRE_ASSETS=1`):
//!   a completion and a chat with its GGUF chat template equal `generate` on the same tokens.

mod common;
mod serve_common;

use std::time::Duration;

use prefix_tune::model::load_model;
use serde_json::{json, Value};
use serve_common::*;

fn llama() -> std::path::PathBuf {
    fixture("llama_tiny")
}

#[test]
fn concurrent_mixed_prefix_completions_equal_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load_model(&llama()).unwrap();
    let pa = prefix_file(&m, tmp.path(), "a.safetensors", 3, 1, None);
    let pb = prefix_file(&m, tmp.path(), "b.safetensors", 6, 2, None);
    let peft = llama().join("peft_adapter");
    let spec = |n: &str, p: &std::path::Path| format!("{n}={}", s(p));
    let (sa, sb, sc) = (spec("a", &pa), spec("b", &pb), spec("c", &peft));
    let server = Server::start(&[
        "--model",
        s(&llama()),
        "--prefix",
        &sa,
        "--prefix",
        &sb,
        "--prefix",
        &sc,
        "--max-batch",
        "4",
        "--prefill-chunk",
        "5",
        "--device",
        "cpu",
    ]);
    // Models as a client may name them: bare prefix names, base:prefix, the base.
    let cases = [
        ("a", "the cat sat on"),
        ("llama_tiny:b", "once upon"),
        ("c", "hello there"),
        ("llama_tiny", "the cat sat on"),
        ("b", "a"),
        ("llama_tiny:a", "zzz zzz"),
        ("llama_tiny:c", "the dog"),
        ("llama_tiny", "xyz"),
    ];
    let max_tokens = 10;
    let jsonl = tmp.path().join("inputs.jsonl");
    let lines: Vec<String> = cases
        .iter()
        .map(|(model, text)| {
            let prefix = model.rsplit(':').next().filter(|p| *p != "llama_tiny");
            json!({"input": text, "prefix": prefix}).to_string()
        })
        .collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let want = generate_cli(&[
        "--model",
        s(&llama()),
        "--prefix",
        &sa,
        "--prefix",
        &sb,
        "--prefix",
        &sc,
        "--inputs",
        s(&jsonl),
        "--max-new-tokens",
        &max_tokens.to_string(),
    ]);
    for stream in [false, true] {
        let children: Vec<_> = cases
            .iter()
            .map(|(model, text)| {
                let body = json!({
                    "model": model, "prompt": text, "max_tokens": max_tokens,
                    "temperature": 0, "stream": stream, "return_token_ids": true,
                });
                spawn_curl(
                    &server.url("/v1/completions"),
                    "POST",
                    Some(&body.to_string()),
                    &[],
                )
            })
            .collect();
        for (i, child) in children.into_iter().enumerate() {
            let r = finish(child);
            assert_eq!(r.status, 200, "case {i}: {}", r.body);
            let w = &want[i];
            let finish_want = match w["finish"].as_str().unwrap() {
                "eos" => "stop",
                _ => "length",
            };
            let prompt_tokens = {
                let t = &m.tokenizer;
                t.add_bos() as usize + t.encode(cases[i].1).unwrap().len()
            };
            let (tokens, text, finish_got, usage) = if stream {
                assert_eq!(
                    r.header("content-type"),
                    Some("text/event-stream"),
                    "case {i}"
                );
                let st = reassemble(&r.body, 0);
                assert!(st.done, "case {i}: no [DONE]:\n{}", r.body);
                (st.tokens, st.text, st.finish, st.usage.expect("usage"))
            } else {
                let v = r.json();
                assert_eq!(v["object"], "text_completion");
                assert_eq!(v["model"], cases[i].0);
                let c = &v["choices"][0];
                (
                    ids(&c["token_ids"]),
                    c["text"].as_str().unwrap().to_string(),
                    c["finish_reason"].as_str().map(String::from),
                    v["usage"].clone(),
                )
            };
            assert_eq!(
                tokens,
                ids(&w["tokens"]),
                "case {i} (stream {stream}): tokens"
            );
            assert_eq!(text, w["text"].as_str().unwrap(), "case {i}: text");
            assert_eq!(finish_got.as_deref(), Some(finish_want), "case {i}");
            assert_eq!(usage["completion_tokens"], tokens.len(), "case {i}");
            assert_eq!(usage["prompt_tokens"], prompt_tokens, "case {i}");
            assert_eq!(
                usage["total_tokens"],
                prompt_tokens + tokens.len(),
                "case {i}"
            );
        }
    }
    // n = 3 with a seed: choice j is what generate samples for the input repeated (its j-th).
    let text = "the cat";
    let body = json!({
        "model": "a", "prompt": text, "max_tokens": 8, "n": 3, "temperature": 0.9,
        "top_k": 30, "seed": 42, "return_token_ids": true,
    });
    let v = post(&server, "/v1/completions", &body).json();
    let want = generate_cli(&[
        "--model",
        s(&llama()),
        "--prefix",
        s(&pa),
        "--input",
        text,
        "--input",
        text,
        "--input",
        text,
        "--max-new-tokens",
        "8",
        "--temperature",
        "0.9",
        "--top-k",
        "30",
        "--seed",
        "42",
    ]);
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (j, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], j);
        assert_eq!(ids(&c["token_ids"]), ids(&want[j]["tokens"]), "choice {j}");
    }
    assert_ne!(
        choices[0]["token_ids"], choices[1]["token_ids"],
        "n choices are identical"
    );
    // usage counts the prompt once and every choice's tokens.
    let total: usize = choices
        .iter()
        .map(|c| c["token_ids"].as_array().unwrap().len())
        .sum();
    assert_eq!(v["usage"]["completion_tokens"], total);
    // Logprobs: the chosen token's log-probability and the top alternatives, most likely first.
    let body =
        json!({"model": "b", "prompt": "the", "max_tokens": 3, "temperature": 0, "logprobs": 2});
    let v = post(&server, "/v1/completions", &body).json();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3, "{lp}");
    for (k, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 2, "{lp}");
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        // Greedy: the chosen token is the most likely one.
        let chosen = lp["token_logprobs"][k].as_f64().unwrap();
        assert!((chosen - best).abs() < 1e-9 && chosen <= 0.0, "{lp}");
    }
    // GET /v1/models lists the base and every prefix with its parent.
    let v = curl(&server.url("/v1/models"), "GET", None, &[]).json();
    let listed: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        ["llama_tiny", "llama_tiny:a", "llama_tiny:b", "llama_tiny:c"]
    );
    assert_eq!(v["data"][2]["parent"], "llama_tiny");
    assert_eq!(v["data"][2]["prefix_len"], 6);
    server.wait_idle();
    server.assert_no_panic();
}

/// A ChatML template written out.
const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

#[test]
fn chat_needs_a_template_and_uses_it() {
    let server = Server::start(&["--model", s(&llama()), "--device", "cpu"]);
    let chat = json!({"model": "llama_tiny", "messages": [{"role": "user", "content": "hi"}]});
    let r = post(&server, "/v1/chat/completions", &chat);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "no_chat_template");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("chat template"));
    drop(server);

    let tmp = tempfile::tempdir().unwrap();
    let tpl = tmp.path().join("chatml.jinja");
    std::fs::write(&tpl, CHATML).unwrap();
    let server = Server::start(&[
        "--model",
        s(&llama()),
        "--chat-template",
        s(&tpl),
        "--max-context",
        "512",
        "--device",
        "cpu",
    ]);
    let m = load_model(&llama()).unwrap();
    let messages = json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "the cat"}]},
    ]);
    let rendered = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n";
    let prompt = m.tokenizer.encode(rendered).unwrap();
    let body = json!({"model": "llama_tiny", "messages": messages, "max_tokens": 6,
                      "temperature": 0, "return_token_ids": true});
    let r = post(&server, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    let c = &v["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    // The same tokens as generating from the rendered prompt's tokens.
    let mut engine = prefix_tune::engine::CpuEngine::new(std::sync::Arc::new(m.weights.clone()));
    let mut eos = m.tokenizer.eos_token_ids().to_vec();
    eos.extend(&m.weights.config.eos_token_ids);
    let want = prefix_tune::generate::generate(
        &mut engine,
        None,
        &[prefix_tune::generate::Request {
            prompt,
            prefix: None,
        }],
        &prefix_tune::generate::GenerateOptions {
            max_new_tokens: 6,
            strategy: prefix_tune::generate::Strategy::Greedy,
            eos,
            run: Default::default(),
            batch_size: 1,
        },
    )
    .unwrap();
    assert_eq!(ids(&c["token_ids"]), want[0].tokens);
    // Streamed: the role first, then the content, a finish reason, usage, [DONE].
    let mut body = body;
    body["stream"] = json!(true);
    let r = post(&server, "/v1/chat/completions", &body);
    let events = sse_events(&r.body);
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let st = reassemble(&r.body, 0);
    assert!(st.done);
    assert_eq!(st.text, c["message"]["content"].as_str().unwrap());
    assert_eq!(st.tokens, want[0].tokens);
    assert_eq!(st.usage.unwrap()["completion_tokens"], want[0].tokens.len());
    // stream_options.include_usage: a last chunk with no choices carries the usage.
    body["stream_options"] = json!({"include_usage": true});
    let r = post(&server, "/v1/chat/completions", &body);
    let events = sse_events(&r.body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let u: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(u["choices"].as_array().unwrap().len(), 0);
    assert_eq!(u["usage"]["prompt_tokens"], v["usage"]["prompt_tokens"]);
    server.assert_no_panic();
}

#[test]
fn bad_input_gets_openai_errors_and_nothing_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys");
    std::fs::write(&keys, "# API keys\nsk-test-1\nsk-test-2\n").unwrap();
    let server = Server::start(&[
        "--model",
        s(&llama()),
        "--api-key-file",
        s(&keys),
        "--max-body-bytes",
        "4096",
        "--max-n",
        "2",
        "--max-tokens",
        "20",
        "--max-context",
        "48",
        "--device",
        "cpu",
    ]);
    let auth = "authorization: Bearer sk-test-2";
    let long = "x".repeat(60);
    let forty = "y".repeat(40);
    let big = format!(
        "{{\"model\": \"llama_tiny\", \"prompt\": \"{}\"}}",
        "z".repeat(5000)
    );
    // (what, method, path, body, with key, status, param, code)
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a str,
        String,
        bool,
        u16,
        Option<&'a str>,
        Option<&'a str>,
    );
    let ok = |v: Value| v.to_string();
    let cases: Vec<Case> = vec![
        (
            "no API key",
            "POST",
            "/v1/completions",
            ok(json!({"model": "llama_tiny", "prompt": "a"})),
            false,
            401,
            None,
            Some("invalid_api_key"),
        ),
        (
            "models without a key",
            "GET",
            "/v1/models",
            String::new(),
            false,
            401,
            None,
            Some("invalid_api_key"),
        ),
        (
            "malformed JSON",
            "POST",
            "/v1/completions",
            "{\"model\": ".into(),
            true,
            400,
            None,
            Some("invalid_json"),
        ),
        (
            "not an object",
            "POST",
            "/v1/completions",
            "[1, 2]".into(),
            true,
            400,
            None,
            None,
        ),
        (
            "missing model",
            "POST",
            "/v1/completions",
            ok(json!({"prompt": "a"})),
            true,
            400,
            Some("model"),
            None,
        ),
        (
            "model of the wrong type",
            "POST",
            "/v1/completions",
            ok(json!({"model": 5, "prompt": "a"})),
            true,
            400,
            Some("model"),
            None,
        ),
        (
            "unknown model",
            "POST",
            "/v1/completions",
            ok(json!({"model": "gpt-4", "prompt": "a"})),
            true,
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            "unknown prefix",
            "POST",
            "/v1/completions",
            ok(json!({"model": "llama_tiny:nope", "prompt": "a"})),
            true,
            404,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            "max_tokens of the wrong type",
            "POST",
            "/v1/completions",
            ok(json!({"model": "llama_tiny", "prompt": "a", "max_tokens": "ten"})),
            true,
            400,
            Some("max_tokens"),
            None,
        ),
        (
            "max_tokens over the limit",
            "POST",
            "/v1/completions",
            ok(json!({"model": "llama_tiny", "prompt": "a", "max_tokens": 21})),
            true,
            400,
            Some("max_tokens"),
            None,
        ),
        (
            "max_tokens 0",
            "POST",
            "/v1/completions",
            ok(json!({"model": "llama_tiny", "prompt": "a", "max_tokens": 0})),
            true,
            400,
            Some("max_tokens"),
            None,
        ),
        (
            "temperature out of range",
            "POST",
            "/v1/completions",
            ok(json!({"model": "llama_tiny", "prompt": "a", "temperature": 5})),
            true,
            400,
            Some("temperature"),
            None,
        ),
        (
            "top_p out of range",
            "POST",
            "/v1/completions",
            ok(json!({"model": "llama_tiny", "prompt": "a", "top_p": 0})),
            true,
            400,
            Some("top_p"),
            None,
        ),
        (
            "stream of the wrong type",
            "POST",
            "/v1/completions",
            ok(json!({"model": "llama_tiny", "prompt": "a", "stream": "yes"})),
            true,
            400,
            Some("stream"),
            None,
        ),
        (
            "n over the limit",
            "POST",
            "/v1/completions",
            ok(json!({"model": "llama_tiny", "prompt": "a", "n": 3})),
            true,
            400,
            Some("n"),
            None,
        ),
        (
            "five stop strings",
            "POST",
            "/v1/completions",
            ok(json!({"model": "llama_tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]})),
            true,
            400,
            Some("stop"),
            None,
        ),
        (
            "stop of the wrong type",
            "POST",
            "/v1/completions",
            ok(json!({"model": "llama_tiny", "prompt": "a", "stop": 3})),
            true,
            400,
            Some("stop"),
            None,
        ),
        (
            "prompt over the context",
            "POST",
            "/v1/completions",
            ok(json!({"model": "llama_tiny", "prompt": long})),
            true,
            400,
            Some("prompt"),
            Some("context_length_exceeded"),
        ),
        (
            "prompt + max_tokens over the context",
            "POST",
            "/v1/completions",
            ok(json!({"model": "llama_tiny", "prompt": forty, "max_tokens": 20})),
            true,
            400,
            Some("max_tokens"),
            Some("context_length_exceeded"),
        ),
        (
            "token id outside the vocabulary",
            "POST",
            "/v1/completions",
            ok(json!({"model": "llama_tiny", "prompt": [1, 100000]})),
            true,
            400,
            Some("prompt"),
            None,
        ),
        (
            "prompt of the wrong type",
            "POST",
            "/v1/completions",
            ok(json!({"model": "llama_tiny", "prompt": {"text": "a"}})),
            true,
            400,
            Some("prompt"),
            None,
        ),
        (
            "empty prompt list",
            "POST",
            "/v1/completions",
            ok(json!({"model": "llama_tiny", "prompt": []})),
            true,
            400,
            Some("prompt"),
            None,
        ),
        (
            "unsupported penalty",
            "POST",
            "/v1/completions",
            ok(json!({"model": "llama_tiny", "prompt": "a", "presence_penalty": 0.5})),
            true,
            400,
            Some("presence_penalty"),
            None,
        ),
        (
            "echo",
            "POST",
            "/v1/completions",
            ok(json!({"model": "llama_tiny", "prompt": "a", "echo": true})),
            true,
            400,
            Some("echo"),
            None,
        ),
        (
            "messages of the wrong type",
            "POST",
            "/v1/chat/completions",
            ok(json!({"model": "llama_tiny", "messages": "hi"})),
            true,
            400,
            Some("messages"),
            None,
        ),
        (
            "message without a role",
            "POST",
            "/v1/chat/completions",
            ok(json!({"model": "llama_tiny", "messages": [{"content": "hi"}]})),
            true,
            400,
            Some("messages[0].role"),
            None,
        ),
        (
            "image content",
            "POST",
            "/v1/chat/completions",
            ok(
                json!({"model": "llama_tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            ),
            true,
            400,
            Some("messages[0].content[0]"),
            None,
        ),
        (
            "body over the limit",
            "POST",
            "/v1/completions",
            big,
            true,
            413,
            None,
            Some("request_too_large"),
        ),
        (
            "unknown endpoint",
            "GET",
            "/v1/nothing",
            String::new(),
            true,
            404,
            None,
            Some("unknown_url"),
        ),
        (
            "wrong method",
            "GET",
            "/v1/completions",
            String::new(),
            true,
            405,
            None,
            None,
        ),
    ];
    for (what, method, path, body, with_key, status, param, code) in &cases {
        let headers: Vec<&str> = if *with_key { vec![auth] } else { vec![] };
        let r = curl(
            &server.url(path),
            method,
            (!body.is_empty()).then_some(body.as_str()),
            &headers,
        );
        assert_eq!(r.status, *status, "{what}: {}", r.body);
        let v = r.json();
        let e = &v["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
        assert!(e["type"].is_string(), "{what}: {v}");
        if let Some(p) = param {
            assert_eq!(e["param"], *p, "{what}: {v}");
            // The message names the field.
            let field = p.split(['.', '[']).next().unwrap();
            assert!(
                e["message"].as_str().unwrap().contains(field),
                "{what}: {v}"
            );
        }
        if let Some(c) = code {
            assert_eq!(e["code"], *c, "{what}: {v}");
        }
    }
    // A wrong key, then a good request: it works, and nothing is left in the batch or queue.
    let r = curl(
        &server.url("/v1/completions"),
        "POST",
        Some(&json!({"model": "llama_tiny", "prompt": "a"}).to_string()),
        &["authorization: Bearer sk-wrong"],
    );
    assert_eq!(r.status, 401);
    let r = curl(
        &server.url("/v1/completions"),
        "POST",
        Some(
            &json!({"model": "llama_tiny", "prompt": "the", "max_tokens": 5, "temperature": 0})
                .to_string(),
        ),
        &[auth],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["choices"][0]["finish_reason"].is_string());
    // Unknown fields are ignored (as vLLM does).
    let r = curl(
        &server.url("/v1/completions"),
        "POST",
        Some(&json!({"model": "llama_tiny", "prompt": "the", "max_tokens": 2, "user": "me", "some_new_field": [1]}).to_string()),
        &[auth],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    server.wait_idle();
    let m =
        server.metric("prefix_tune_requests_total{endpoint=\"/v1/completions\",status=\"400\"}");
    assert!(m >= 15.0, "400s counted: {m}");
    // /health and /metrics need no key.
    assert_eq!(curl(&server.url("/health"), "GET", None, &[]).status, 200);
    server.assert_no_panic();
}

#[test]
fn prefixes_load_and_unload_at_run_time() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load_model(&llama()).unwrap();
    let late = prefix_file(&m, tmp.path(), "late.safetensors", 4, 7, None);
    let other = prefix_file(&m, tmp.path(), "other.safetensors", 4, 8, Some("00ff00ff"));
    // Without an admin key the endpoints are refused.
    let server = Server::start(&["--model", s(&llama()), "--device", "cpu"]);
    let body = json!({"name": "late", "path": s(&late)});
    let r = post(&server, "/v1/prefixes", &body);
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("admin-key"), "{}", r.body);
    assert_eq!(
        curl(&server.url("/v1/prefixes/late"), "DELETE", None, &[]).status,
        403
    );
    drop(server);

    let key = tmp.path().join("admin");
    std::fs::write(&key, "adm-secret\n").unwrap();
    let server = Server::start(&[
        "--model",
        s(&llama()),
        "--admin-key-file",
        s(&key),
        "--device",
        "cpu",
    ]);
    let admin = "authorization: Bearer adm-secret";
    let load = |body: &Value, headers: &[&str]| {
        curl(
            &server.url("/v1/prefixes"),
            "POST",
            Some(&body.to_string()),
            headers,
        )
    };
    assert_eq!(load(&body, &[]).status, 401);
    assert_eq!(load(&body, &["authorization: Bearer nope"]).status, 401);
    let r = load(&body, &[admin]);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["id"], "llama_tiny:late");
    assert_eq!(r.json()["prefix_len"], 4);
    let listed = curl(&server.url("/v1/models"), "GET", None, &[]).body;
    assert!(listed.contains("llama_tiny:late"), "{listed}");
    // It generates what generate does with that file.
    let req = json!({"model": "late", "prompt": "the cat", "max_tokens": 8, "temperature": 0,
                     "return_token_ids": true});
    let got = post(&server, "/v1/completions", &req).json();
    let want = generate_cli(&[
        "--model",
        s(&llama()),
        "--prefix",
        s(&late),
        "--input",
        "the cat",
        "--max-new-tokens",
        "8",
    ]);
    assert_eq!(
        ids(&got["choices"][0]["token_ids"]),
        ids(&want[0]["tokens"])
    );
    // Loaded twice, made for another model, missing, badly named, badly formed: refused.
    let r = load(&body, &[admin]);
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (409, json!("already_exists"))
    );
    let r = load(&json!({"name": "other", "path": s(&other)}), &[admin]);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("another model"), "{}", r.body);
    let r = load(
        &json!({"name": "gone", "path": s(&tmp.path().join("none"))}),
        &[admin],
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("no such file"), "{}", r.body);
    let r = load(&json!({"name": "a b", "path": s(&late)}), &[admin]);
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("name"))
    );
    let r = load(&json!({"name": "x"}), &[admin]);
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("path"))
    );
    let r = curl(&server.url("/v1/prefixes"), "POST", Some("{oops"), &[admin]);
    assert_eq!(r.status, 400);
    // Unloaded: gone from the models and from requests; unloading again is a 404.
    assert_eq!(
        curl(&server.url("/v1/prefixes/late"), "DELETE", None, &[]).status,
        401
    );
    let r = curl(&server.url("/v1/prefixes/late"), "DELETE", None, &[admin]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["deleted"], true);
    assert_eq!(post(&server, "/v1/completions", &req).status, 404);
    assert!(!curl(&server.url("/v1/models"), "GET", None, &[])
        .body
        .contains("late"));
    assert_eq!(
        curl(&server.url("/v1/prefixes/late"), "DELETE", None, &[admin]).status,
        404
    );
    server.assert_no_panic();
    drop(server);

    // With --prefix-dir, paths outside it are refused.
    let inside = tmp.path().join("inside");
    std::fs::create_dir(&inside).unwrap();
    let ok = prefix_file(&m, &inside, "ok.safetensors", 2, 9, None);
    let server = Server::start(&[
        "--model",
        s(&llama()),
        "--admin-key-file",
        s(&key),
        "--prefix-dir",
        s(&inside),
        "--device",
        "cpu",
    ]);
    let r = curl(
        &server.url("/v1/prefixes"),
        "POST",
        Some(&body.to_string()),
        &[admin],
    );
    assert_eq!(r.status, 403, "{}", r.body);
    let r = curl(
        &server.url("/v1/prefixes"),
        "POST",
        Some(&json!({"name": "ok", "path": s(&ok)}).to_string()),
        &[admin],
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

/// A server whose requests can run for a long time (the tiny Llama has no position limit).
fn long_server(extra: &[&str]) -> Server {
    let mut args = vec![
        "--model",
        "",
        "--max-context",
        "200000",
        "--max-tokens",
        "100000",
        "--device",
        "cpu",
    ];
    let model = llama();
    let model = s(&model).to_string();
    args[1] = &model;
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn long_stream_body(max_tokens: usize) -> String {
    json!({"model": "llama_tiny", "prompt": "the cat", "max_tokens": max_tokens,
           "temperature": 0, "stream": true, "ignore_eos": true})
    .to_string()
}

#[test]
fn a_client_disconnecting_mid_stream_frees_its_place() {
    let server = long_server(&["--max-batch", "2"]);
    let mut conn = raw_request(&server.addr, "/v1/completions", &long_stream_body(90000));
    let got = read_until(&mut conn, "data: {");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert_eq!(server.metric("prefix_tune_batch_occupancy"), 1.0);
    drop(conn); // the client goes away mid-stream
    eventually("the sequence is cancelled", || {
        server.metric("prefix_tune_cancelled_sequences_total") == 1.0
            && server.metric("prefix_tune_batch_occupancy") == 0.0
    });
    let r = post(
        &server,
        "/v1/completions",
        &json!({"model": "llama_tiny", "prompt": "a", "max_tokens": 3}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    server.assert_no_panic();
}

#[test]
fn overload_gets_429_and_503_with_retry_after() {
    let server = long_server(&[
        "--max-batch",
        "1",
        "--max-queue",
        "1",
        "--max-connections",
        "4",
    ]);
    // One stream runs, one waits in the queue: the next request is refused with 429.
    let mut running = raw_request(&server.addr, "/v1/completions", &long_stream_body(90000));
    read_until(&mut running, "data: {");
    let queued = raw_request(&server.addr, "/v1/completions", &long_stream_body(10));
    eventually("one request queued", || {
        server.metric("prefix_tune_queue_length") == 1.0
    });
    let r = post(
        &server,
        "/v1/completions",
        &json!({"model": "llama_tiny", "prompt": "a"}),
    );
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["code"], "queue_full");
    // Four connections open (two streams and two idle): a fifth gets 503 and Retry-After.
    let idle: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(&server.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let r = curl(&server.url("/health"), "GET", None, &[]);
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("connections"));
    drop(idle);
    drop(running);
    drop(queued);
    server.wait_idle();
    let r = post(
        &server,
        "/v1/completions",
        &json!({"model": "llama_tiny", "prompt": "a", "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(server.metric("prefix_tune_refused_connections_total") >= 1.0);
    server.assert_no_panic();
}

#[test]
fn sigterm_drains_running_streams_then_stops() {
    let mut server = long_server(&["--max-batch", "1"]);
    let n = 3000;
    let mut conns: Vec<_> = (0..3)
        .map(|_| raw_request(&server.addr, "/v1/completions", &long_stream_body(n)))
        .collect();
    let head = read_until(&mut conns[0], "data: {");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // SIGTERM while the first stream runs and the others wait.
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    for (i, c) in conns.iter_mut().enumerate() {
        let mut body = read_stream(c);
        if i == 0 {
            body = format!("{head}{body}");
        }
        let body = body.split_once("\r\n\r\n").map_or(body.as_str(), |x| x.1);
        // Chunked transfer encoding: keep only the SSE lines.
        let sse: String = body
            .lines()
            .filter(|l| l.starts_with("data: ") || l.is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        let st = reassemble(&sse, 0);
        assert!(
            st.done,
            "stream {i} did not finish: {}",
            &sse[sse.len().saturating_sub(300)..]
        );
        assert_eq!(st.finish.as_deref(), Some("length"), "stream {i}");
        assert_eq!(st.usage.unwrap()["completion_tokens"], n, "stream {i}");
    }
    let status = server.wait(Duration::from_secs(60));
    assert!(status.success(), "exit status {status}:\n{}", server.log());
    let log = server.log();
    assert!(
        log.contains("SIGTERM") && log.contains("serve: stopped"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn smollm2_completion_and_chat_equal_generate() {
    let Some(_) = common::smollm2("smollm2_completion_and_chat_equal_generate") else {
        return;
    };
    let path = prefix_tune::assets::smollm2_gguf_path();
    let m = common::smollm2("smollm2").unwrap();
    let server = Server::start(&["--model", s(&path), "--device", "cpu"]);
    assert!(
        server.log().contains("tokenizer.chat_template"),
        "{}",
        server.log()
    );
    let base = "SmolLM2-135M-Instruct.Q4_1";
    let text = "The capital of France is";
    let v = post(
        &server,
        "/v1/completions",
        &json!({"model": base, "prompt": text, "max_tokens": 8, "temperature": 0, "return_token_ids": true}),
    )
    .json();
    // The chat prompt as HF's apply_chat_template writes it for this template.
    let chatml = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let chat = post(
        &server,
        "/v1/chat/completions",
        &json!({"model": base, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 12, "temperature": 0, "return_token_ids": true}),
    )
    .json();
    let want = generate_cli(&[
        "--model",
        s(&path),
        "--input",
        text,
        "--input",
        chatml,
        "--max-new-tokens",
        "12",
    ]);
    let completion = ids(&v["choices"][0]["token_ids"]);
    assert_eq!(
        completion[..],
        ids(&want[0]["tokens"])[..8],
        "completion tokens"
    );
    assert!(
        v["choices"][0]["text"].as_str().unwrap().contains("Paris"),
        "{v}"
    );
    assert_eq!(
        chat["usage"]["prompt_tokens"],
        m.tokenizer.encode(chatml).unwrap().len(),
        "the chat template's prompt differs from ChatML: {chat}"
    );
    assert_eq!(
        ids(&chat["choices"][0]["token_ids"]),
        ids(&want[1]["tokens"]),
        "chat tokens"
    );
    assert_eq!(chat["choices"][0]["message"]["content"], want[1]["text"]);
    eprintln!(
        "smollm2 chat answer: {}",
        chat["choices"][0]["message"]["content"]
    );
    server.assert_no_panic();
}
