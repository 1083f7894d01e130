//! The real SmolLM2-135M-Instruct Q4_1 GGUF from the asset cache, checked against HF transformers
//! loading the same file (fixtures written by `tools/oracle/smollm2_*.py`).
//!
//! Skipped with a message when the file is absent, unless `PREFIX_TUNE_REQUIRE_ASSETS=1`.
//! Add further checks as new `#[test]` functions using [`smollm2`], which loads the model once.

mod common;

use prefix_tune::model::{Arch, LoadedModel};
use prefix_tune::reference::real::rel_err;

fn smollm2() -> Option<&'static LoadedModel> {
    common::smollm2("smollm2")
}

fn fixture(name: &str) -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn config_sizes() {
    let Some(m) = smollm2() else { return };
    let c = &m.weights.config;
    assert_eq!(c.arch, Arch::Llama);
    assert_eq!(
        (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim),
        (30, 576, 9, 3, 64)
    );
    assert_eq!((c.vocab_size, c.d_ff, c.max_positions), (49152, 1536, 8192));
    assert!(
        (c.rope_theta - 100000.0).abs() < 1e-6,
        "rope_theta {}",
        c.rope_theta
    );
    assert!((c.norm_eps - 1e-5).abs() < 1e-9, "norm_eps {}", c.norm_eps);
    assert!(c.tied_embeddings && m.weights.lm_head.is_none());
    assert_eq!(m.weights.layers.len(), 30);
    assert_eq!(m.weights.tok_emb.len(), 49152 * 576);
    assert_eq!(m.fingerprint.len(), 32);
    // 134.5M parameters with the head tied.
    let n = m.weights.n_params();
    assert!((134_000_000..135_000_000).contains(&n), "n_params {n}");
}

/// Whether SmolLM2's "split every numeral" rule can change GPT-2 regex pre-tokenization of `text`.
fn digit_rule_matters(text: &str) -> bool {
    let c: Vec<char> = text.chars().collect();
    c.iter().any(|ch| ch.is_numeric() && !ch.is_ascii_digit())
        || c.windows(3)
            .any(|w| w[0].is_whitespace() && w[1].is_whitespace() && w[2].is_numeric())
}

#[test]
fn tokenizer_matches_transformers() {
    let Some(m) = smollm2() else { return };
    let fx = fixture("smollm2_tokens.json");
    let t = &m.tokenizer;
    assert_eq!(
        t.bos_token_id(),
        fx["bos_token_id"].as_u64().map(|x| x as u32)
    );
    assert_eq!(
        t.eos_token_ids(),
        &[fx["eos_token_id"].as_u64().unwrap() as u32]
    );
    assert_eq!(t.add_bos(), fx["add_bos_token"].as_bool().unwrap());
    assert_eq!(t.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
    let samples = fx["samples"].as_array().unwrap();
    let mut differ = 0;
    for s in samples {
        let text = s["text"].as_str().unwrap();
        let got = t.encode(text).unwrap();
        // The file's pre-tokenizer ("smollm": digits one by one, then GPT-2's byte-level regex).
        assert_eq!(got, ids(&s["smollm_pretok"]), "tokens of {text:?}");
        // transformers' GGUF loader has no "smollm" entry and splits with GPT-2's regex alone. The
        // two can only disagree where splitting off a numeral changes what the regex sees: at a
        // non-ASCII numeral (½, ①, ...) or at whitespace runs right before a numeral ("\r\n4").
        if got != ids(&s["hf_gguf"]) {
            differ += 1;
            assert!(
                digit_rule_matters(text),
                "{text:?}: differs from transformers ({:?}) where the digit rule cannot explain it",
                ids(&s["hf_gguf"])
            );
        }
        // Byte-level BPE round-trips any text.
        assert_eq!(t.decode(&got).unwrap(), text, "decode(encode({text:?}))");
    }
    eprintln!(
        "{} samples; {differ} differ from transformers' GGUF tokenizer, all where the digit rule applies",
        samples.len()
    );
    assert!(
        differ * 10 < samples.len(),
        "too many samples differ from transformers: {differ}"
    );
}

#[test]
fn weights_match_transformers() {
    let Some(m) = smollm2() else { return };
    let fx = fixture("smollm2_weights.json");
    let w = &m.weights;
    let cols = fx["cols"].as_u64().unwrap() as usize;
    let mut worst = 0.0f64;
    for t in fx["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let shape: Vec<usize> = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let (data, width): (&[f32], usize) = if name == "model.embed_tokens.weight" {
            (&w.tok_emb, w.config.d_model)
        } else if name == "model.norm.weight" {
            (&w.final_norm_w, w.config.d_model)
        } else {
            let rest = name.strip_prefix("model.layers.").unwrap();
            let (i, field) = rest.split_once('.').unwrap();
            let l = &w.layers[i.parse::<usize>().unwrap()];
            let v: &[f32] = match field {
                "input_layernorm.weight" => &l.attn_norm_w,
                "post_attention_layernorm.weight" => &l.mlp_norm_w,
                "self_attn.q_proj.weight" => &l.wq,
                "self_attn.k_proj.weight" => &l.wk,
                "self_attn.v_proj.weight" => &l.wv,
                "self_attn.o_proj.weight" => &l.wo,
                "mlp.gate_proj.weight" => &l.w_in,
                "mlp.up_proj.weight" => l.w_up.as_deref().unwrap(),
                "mlp.down_proj.weight" => &l.w_out,
                other => panic!("unknown field {other}"),
            };
            (v, *shape.last().unwrap())
        };
        assert_eq!(data.len(), shape.iter().product::<usize>(), "{name} size");
        let rows: Vec<usize> = match t["rows"].as_array() {
            None => vec![0],
            Some(r) => r.iter().map(|x| x.as_u64().unwrap() as usize).collect(),
        };
        for (r, want) in rows.iter().zip(t["values"].as_array().unwrap()) {
            let want: Vec<f64> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            let got = &data[r * width..r * width + cols.min(want.len())];
            let e = rel_err(got, &want);
            worst = worst.max(e);
            assert!(e < 1e-6, "{name} row {r}: rel err {e:e}");
        }
    }
    eprintln!("weights vs transformers: worst rel err {worst:e}");
}

#[test]
fn decode_rejects_out_of_range_ids() {
    let Some(m) = smollm2() else { return };
    let err = m.tokenizer.decode(&[1, 49152]).unwrap_err();
    assert!(err.to_string().contains("49152"), "{err}");
}
