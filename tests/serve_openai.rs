//! `prefix-tune serve` driven by the official `openai` Python client (pinned in
//! `tools/serve/requirements.txt`, installed by `tools/serve/setup_client.sh` into
//! `$PREFIX_TUNE_CACHE/serve-venv` from the package registry; nothing else is fetched):
//! completions and chat, streamed and not, mixed prefixes in concurrent requests equal to
//! `prefix-tune generate`, errors raised as the client's exception classes, and a stream the
//! client abandons. The checks themselves are `tools/serve/openai_client_check.py`.
//!
//! Skipped, visibly, when the venv cannot be made; a failure instead under
//! `PREFIX_TUNE_REQUIRE_ASSETS=1`.

mod common;
mod serve_common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use prefix_tune::engine::CpuEngine;
use prefix_tune::generate::{generate, GenerateOptions, Request, Strategy};
use prefix_tune::model::load_model;
use prefix_tune::prefix::load_prefix;
use prefix_tune::reference::model::RunOptions;
use serde_json::json;
use serve_common::*;

/// The venv's python, or `None` after a visible skip.
fn client_python(test: &str) -> Option<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/serve/setup_client.sh");
    let out = Command::new("bash").arg(&script).output();
    match out {
        Ok(o) if o.status.success() => {
            let stdout = String::from_utf8_lossy(&o.stdout);
            stdout.lines().last().map(|l| l.trim().to_string())
        }
        Ok(o) => {
            common::skip(
                "PREFIX_TUNE_REQUIRE_ASSETS",
                test,
                &format!(
                    "the openai client venv could not be made: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            );
            None
        }
        Err(e) => {
            common::skip(
                "PREFIX_TUNE_REQUIRE_ASSETS",
                test,
                &format!("running {}: {e}", script.display()),
            );
            None
        }
    }
}

const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

#[test]
fn the_openai_client_drives_the_server() {
    let Some(python) = client_python("the_openai_client_drives_the_server") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("llama_tiny");
    let m = load_model(&model).unwrap();
    let pa = prefix_file(&m, tmp.path(), "a.safetensors", 3, 1, None);
    let pb = prefix_file(&m, tmp.path(), "b.safetensors", 7, 2, None);
    let tpl = tmp.path().join("chatml.jinja");
    std::fs::write(&tpl, CHATML).unwrap();
    let keys = tmp.path().join("keys");
    std::fs::write(&keys, "sk-client\n").unwrap();
    let (sa, sb) = (format!("a={}", s(&pa)), format!("b={}", s(&pb)));
    let server = Server::start(&[
        "--model",
        s(&model),
        "--prefix",
        &sa,
        "--prefix",
        &sb,
        "--chat-template",
        s(&tpl),
        "--api-key-file",
        s(&keys),
        "--max-context",
        "100000",
        "--max-tokens",
        "50000",
        "--max-batch",
        "6",
        "--device",
        "cpu",
    ]);
    // Expected completions: generate over the same inputs and prefixes.
    let cases = [
        ("a", "the cat sat on"),
        ("llama_tiny:b", "once upon"),
        ("llama_tiny", "hello there"),
        ("b", "zz"),
    ];
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
        s(&model),
        "--prefix",
        &sa,
        "--prefix",
        &sb,
        "--inputs",
        s(&jsonl),
        "--max-new-tokens",
        "9",
    ]);
    let spec_cases: Vec<_> = cases
        .iter()
        .zip(&want)
        .map(|((model, text), w)| {
            json!({
                "model": model, "prompt": text, "max_tokens": 9,
                "tokens": w["tokens"], "text": w["text"],
                "finish": if w["finish"] == "eos" { "stop" } else { "length" },
            })
        })
        .collect();
    // Expected chat: generate on the rendered template's tokens with prefix a.
    let rendered = "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n";
    let (bank, _) = load_prefix(&pa).unwrap();
    let mut eos = m.tokenizer.eos_token_ids().to_vec();
    eos.extend(&m.weights.config.eos_token_ids);
    let chat_tokens = generate(
        &mut CpuEngine::new(Arc::new(m.weights.clone())),
        Some(&bank),
        &[Request {
            prompt: m.tokenizer.encode(rendered).unwrap(),
            prefix: Some(0),
        }],
        &GenerateOptions {
            max_new_tokens: 7,
            strategy: Strategy::Greedy,
            eos: eos.clone(),
            run: RunOptions::default(),
            batch_size: 1,
        },
    )
    .unwrap()[0]
        .tokens
        .clone();
    let body = match chat_tokens.split_last() {
        Some((last, rest)) if eos.contains(last) => rest,
        _ => &chat_tokens[..],
    };
    let spec = json!({
        "base_url": server.url("/v1"),
        "api_key": "sk-client",
        "metrics_url": server.url("/metrics"),
        "models": ["llama_tiny", "llama_tiny:a", "llama_tiny:b"],
        "cases": spec_cases,
        "chat": {
            "model": "a",
            "messages": [{"role": "user", "content": "the cat"}],
            "max_tokens": 7,
            "tokens": chat_tokens,
            "text": m.tokenizer.decode(body).unwrap(),
        },
        "long_model": "llama_tiny:b",
    });
    let spec_path = tmp.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let check = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/serve/openai_client_check.py");
    let out = Command::new(&python)
        .arg(&check)
        .arg(&spec_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    assert!(
        out.status.success(),
        "the openai client checks failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    server.wait_idle();
    server.assert_no_panic();
}
