//! Fuzz entry points: each function takes arbitrary bytes and runs them through the real loading
//! code of one kind of untrusted input, from the bytes on (the path-taking loaders read the file
//! and call the same functions). The `cargo fuzz` targets in `fuzz/` call them, and
//! `tests/fuzz_corpus.rs` replays the committed corpus (`fuzz/corpus/<target>/`) and every fixed
//! crash (`fuzz/regressions/<target>/`) through them; RELIABILITY.md lists what was found.
//!
//! A function returns normally whether the input was accepted or refused. It panics only on a bug:
//! a panic in the loader, or a refusal whose message does not name the file (every error must).
//! Inputs holding two files (a directory's) are split at the first NUL byte, which no JSON text
//! holds: the JSON file before it, the second file after it.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::model::bytes::FileBytes;
use crate::model::config::{Arch, ModelConfig};
use crate::model::gguf::GgufFile;
use crate::model::safetensors::{hf_weights, parse_config, SafetensorsSet};
use crate::model::tokenizer::Tokenizer;

/// A fuzz entry point.
pub type Target = fn(&[u8]);

/// Every target: its name (the `fuzz/fuzz_targets/<name>.rs` file and corpus folder) and entry.
pub const TARGETS: &[(&str, Target)] = &[
    ("gguf", gguf),
    ("safetensors", safetensors),
    ("config_json", config_json),
    ("tokenizer_json", tokenizer_json),
    ("data_jsonl", data_jsonl),
    ("data_csv", data_csv),
    ("data_bigbench", data_bigbench),
    ("prefix_file", prefix_file),
    ("peft_adapter", peft_adapter),
    ("checkpoint", checkpoint),
];

/// The value, or `None` after checking that the error names `file`.
fn named<T>(r: Result<T>, file: &str) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(
                msg.contains(file),
                "the error does not name the file {file}: {msg}"
            );
            None
        }
    }
}

/// Splits a two-file input at its first NUL byte.
fn split_nul(data: &[u8]) -> (&[u8], Option<&[u8]>) {
    match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    }
}

/// Encodes and decodes a few texts (and the input's first bytes) with a loaded tokenizer, as
/// training and generation do; their errors need not name a file.
fn exercise_tokenizer(t: &Tokenizer, data: &[u8]) {
    let head = String::from_utf8_lossy(&data[..data.len().min(64)]).into_owned();
    for text in [
        "Hello, world! 123 4567",
        " name[Aromi], eatType[pub] <|im_start|>\n\tx",
        "naïve café — 日本語 🎉",
        &head,
    ] {
        if let Ok(ids) = t.encode(text) {
            let _ = t.decode(&ids);
        }
    }
}

/// A GGUF file: header, Llama config, the embedded tokenizer and every weight.
pub fn gguf(data: &[u8]) {
    const FILE: &str = "fuzz-model.gguf";
    let Some(g) = named(
        GgufFile::from_bytes(Path::new(FILE), FileBytes::Owned(data.to_vec())),
        FILE,
    ) else {
        return;
    };
    let _ = named(g.llama_config(), FILE);
    if let Some(t) = named(Tokenizer::from_gguf(&g), FILE) {
        exercise_tokenizer(&t, data);
    }
    let _ = named(g.llama_weights(), FILE);
}

/// Sizes small enough that a fuzzer can build matching tensors (the seeds are such models).
pub fn tiny_config(arch: Arch) -> ModelConfig {
    ModelConfig {
        arch,
        vocab_size: 8,
        d_model: 4,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: if arch == Arch::Llama { 1 } else { 2 },
        head_dim: 2,
        d_ff: 8,
        max_positions: 8,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        tied_embeddings: arch == Arch::Gpt2,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

/// A `model.safetensors`: the header (tensor table), every tensor converted to f32, and the
/// weights of a tiny GPT-2 and a tiny Llama assembled from it (shape checks, transposes).
pub fn safetensors(data: &[u8]) {
    const DIR: &str = "fuzz-model";
    let path = PathBuf::from(DIR).join("model.safetensors");
    let Some(st) = named(
        SafetensorsSet::from_bytes(vec![(path, FileBytes::Owned(data.to_vec()))]),
        DIR,
    ) else {
        return;
    };
    for name in st.names() {
        let _ = named(st.get_f32(name), DIR);
    }
    for arch in [Arch::Gpt2, Arch::Llama] {
        let _ = named(hf_weights(tiny_config(arch), &st, Path::new(DIR)), DIR);
    }
}

/// A `config.json`, then (after a NUL) a `generation_config.json`.
pub fn config_json(data: &[u8]) {
    const DIR: &str = "fuzz-model";
    let (cfg, gen) = split_nul(data);
    let gen_path = PathBuf::from(DIR).join("generation_config.json");
    let _ = named(
        parse_config(
            &PathBuf::from(DIR).join("config.json"),
            cfg,
            gen.map(|g| (gen_path.as_path(), g)),
        ),
        DIR,
    );
}

/// A `tokenizer.json`, then (after a NUL) a `tokenizer_config.json`; the tokenizer is then used.
pub fn tokenizer_json(data: &[u8]) {
    const DIR: &str = "fuzz-model";
    let (tok, cfg) = split_nul(data);
    let cfg_path = PathBuf::from(DIR).join("tokenizer_config.json");
    let t = Tokenizer::from_hf_bytes(
        &PathBuf::from(DIR).join("tokenizer.json"),
        tok,
        cfg.map(|c| (cfg_path.as_path(), c)),
        None,
        &[],
    );
    if let Some(t) = named(t, DIR) {
        exercise_tokenizer(&t, tok);
    }
}

/// A data file read as `name` (its extension picks the format) and as a file without an
/// extension (the format detected from the content).
fn data_file(name: &str, data: &[u8]) {
    let _ = named(crate::data::parse_examples(Path::new(name), data), name);
    let _ = named(
        crate::data::parse_examples(Path::new("fuzz-data"), data),
        "fuzz-data",
    );
}

/// A JSONL data file.
pub fn data_jsonl(data: &[u8]) {
    data_file("fuzz.jsonl", data);
}

/// An E2E CSV data file.
pub fn data_csv(data: &[u8]) {
    data_file("fuzz.csv", data);
}

/// A BIG-bench `task.json`.
pub fn data_bigbench(data: &[u8]) {
    data_file("task.json", data);
}

/// A prefix file (and the same bytes as a reparameterization file, the other safetensors +
/// metadata format prefix-tune reads).
pub fn prefix_file(data: &[u8]) {
    const FILE: &str = "fuzz-prefix.safetensors";
    let _ = named(
        crate::prefix::file::parse_prefix(Path::new(FILE), data),
        FILE,
    );
    let _ = named(
        crate::prefix::file::parse_reparam(Path::new(FILE), data),
        FILE,
    );
}

/// A PEFT adapter directory: `adapter_config.json`, then (after a NUL)
/// `adapter_model.safetensors` (an empty one when there is no NUL).
pub fn peft_adapter(data: &[u8]) {
    const DIR: &str = "fuzz-adapter";
    let (cfg, st) = split_nul(data);
    let _ = named(
        crate::prefix::peft::parse_peft_adapter(
            &PathBuf::from(DIR).join("adapter_config.json"),
            cfg,
            &PathBuf::from(DIR).join("adapter_model.safetensors"),
            st.unwrap_or(&[]),
        ),
        DIR,
    );
}

/// A checkpoint's `trainer.safetensors`, and the trainable parameters rebuilt from it as
/// `train --resume` does.
pub fn checkpoint(data: &[u8]) {
    const DIR: &str = "fuzz-run";
    let path = PathBuf::from(DIR)
        .join("checkpoint")
        .join("trainer.safetensors");
    let ck = crate::checkpoint::parse_checkpoint::<crate::train::TrainerState>(&path, data);
    if let Some(ck) = named(ck, DIR) {
        let _ = ck.state.trainable.build(&ck.params);
    }
}
