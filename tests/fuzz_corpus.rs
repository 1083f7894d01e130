//! The fuzz corpus, replayed: every file of `fuzz/seeds/<target>/`, `fuzz/corpus/<target>/` and
//! `fuzz/regressions/<target>/` goes through the same entry function as the `cargo fuzz` target
//! (`prefix_tune::fuzzing`), which must neither panic nor take long (RELIABILITY.md has the
//! campaign). Then one test per fixed finding checks the error the input now gets.
//!
//! `cargo test --release --test fuzz_corpus -- --ignored write_seed_corpus` rewrites the seeds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use prefix_tune::fuzzing::{tiny_config, TARGETS};
use prefix_tune::model::config::Arch;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A generous bound for one input here (the campaign's hang limit is 1 s; CI machines are shared).
const MAX_PER_INPUT: Duration = Duration::from_secs(5);

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn every_target_has_a_fuzz_target_file_and_a_corpus() {
    let mut listed: Vec<String> = files_in(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter_map(|p| p.file_stem()?.to_str().map(str::to_string))
        .filter(|n| !n.starts_with('_'))
        .collect();
    listed.sort();
    let mut names: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    assert_eq!(
        listed, names,
        "fuzz/fuzz_targets/ and fuzzing::TARGETS differ"
    );
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for n in &names {
        assert!(
            manifest.contains(&format!("name = \"{n}\"")),
            "fuzz/Cargo.toml has no [[bin]] {n}"
        );
        let seeds = files_in(&fuzz_dir().join("seeds").join(n)).len();
        let corpus = files_in(&fuzz_dir().join("corpus").join(n)).len();
        assert!(
            seeds > 0 && corpus > 0,
            "target {n}: {seeds} seeds, {corpus} corpus files"
        );
    }
}

#[test]
fn corpus_replays_without_panic_or_hang() {
    // A panic inside a target is caught and reported with its input (the default hook's message
    // still shows on stderr).
    let mut failures = Vec::new();
    let mut counts = Vec::new();
    for (name, f) in TARGETS {
        let mut n = 0;
        let mut slowest = (Duration::ZERO, PathBuf::new());
        for sub in ["seeds", "corpus", "regressions"] {
            for path in files_in(&fuzz_dir().join(sub).join(name)) {
                let bytes = std::fs::read(&path).unwrap();
                let t = Instant::now();
                let r = std::panic::catch_unwind(|| f(&bytes));
                let took = t.elapsed();
                n += 1;
                if let Err(e) = r {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("{}: panicked: {msg}", path.display()));
                }
                if took > MAX_PER_INPUT {
                    failures.push(format!("{}: took {took:?}", path.display()));
                }
                if took > slowest.0 {
                    slowest = (took, path);
                }
            }
        }
        counts.push(format!(
            "{name}: {n} inputs, slowest {:?} ({})",
            slowest.0,
            slowest.1.file_name().unwrap_or_default().to_string_lossy()
        ));
    }
    eprintln!("{}", counts.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Seeds: small valid inputs of every format, so the fuzzer starts from the real structure.

fn lcg_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect()
}

/// A safetensors file of named f32/f16 tensors.
fn st_file(
    tensors: &[(String, Vec<usize>, Dtype)],
    meta: Option<HashMap<String, String>>,
) -> Vec<u8> {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .enumerate()
        .map(|(i, (_, shape, dt))| {
            let v = lcg_values(shape.iter().product(), i as u64 + 1);
            match dt {
                Dtype::F16 => f16_bytes(&v),
                _ => f32_bytes(&v),
            }
        })
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&data)
        .map(|((n, shape, dt), b)| (n.clone(), TensorView::new(*dt, shape.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, meta).unwrap()
}

/// The tensors of [`tiny_config`]'s model in HF names.
fn hf_tensors(arch: Arch, dt: Dtype) -> Vec<(String, Vec<usize>, Dtype)> {
    let c = tiny_config(arch);
    let (v, d, ff, q, kv) = (c.vocab_size, c.d_model, c.d_ff, c.q_dim(), c.kv_dim());
    let mut t: Vec<(String, Vec<usize>)> = Vec::new();
    match arch {
        Arch::Gpt2 => {
            t.push(("wte.weight".into(), vec![v, d]));
            t.push(("wpe.weight".into(), vec![c.max_positions, d]));
            let p = "h.0.";
            for (n, s) in [
                ("ln_1.weight", vec![d]),
                ("ln_1.bias", vec![d]),
                ("attn.c_attn.weight", vec![d, 3 * d]),
                ("attn.c_attn.bias", vec![3 * d]),
                ("attn.c_proj.weight", vec![d, d]),
                ("attn.c_proj.bias", vec![d]),
                ("ln_2.weight", vec![d]),
                ("ln_2.bias", vec![d]),
                ("mlp.c_fc.weight", vec![d, ff]),
                ("mlp.c_fc.bias", vec![ff]),
                ("mlp.c_proj.weight", vec![ff, d]),
                ("mlp.c_proj.bias", vec![d]),
            ] {
                t.push((format!("{p}{n}"), s));
            }
            t.push(("ln_f.weight".into(), vec![d]));
            t.push(("ln_f.bias".into(), vec![d]));
        }
        Arch::Llama => {
            t.push(("model.embed_tokens.weight".into(), vec![v, d]));
            let p = "model.layers.0.";
            for (n, s) in [
                ("input_layernorm.weight", vec![d]),
                ("self_attn.q_proj.weight", vec![q, d]),
                ("self_attn.k_proj.weight", vec![kv, d]),
                ("self_attn.v_proj.weight", vec![kv, d]),
                ("self_attn.o_proj.weight", vec![d, q]),
                ("post_attention_layernorm.weight", vec![d]),
                ("mlp.gate_proj.weight", vec![ff, d]),
                ("mlp.up_proj.weight", vec![ff, d]),
                ("mlp.down_proj.weight", vec![d, ff]),
            ] {
                t.push((format!("{p}{n}"), s));
            }
            t.push(("model.norm.weight".into(), vec![d]));
            t.push(("lm_head.weight".into(), vec![v, d]));
        }
    }
    t.into_iter().map(|(n, s)| (n, s, dt)).collect()
}

/// A tiny GGUF writer: metadata as (key, type id, value bytes), tensors as (name, dims, type, data).
fn gguf_file(kv: &[(&str, u32, Vec<u8>)], tensors: &[(String, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
    let mut o = b"GGUF".to_vec();
    o.extend(3u32.to_le_bytes());
    o.extend((tensors.len() as u64).to_le_bytes());
    o.extend((kv.len() as u64).to_le_bytes());
    let put_str = |o: &mut Vec<u8>, s: &str| {
        o.extend((s.len() as u64).to_le_bytes());
        o.extend(s.as_bytes());
    };
    for (k, ty, v) in kv {
        put_str(&mut o, k);
        o.extend(ty.to_le_bytes());
        o.extend(v);
    }
    let mut off = 0u64;
    for (name, dims, ty, data) in tensors {
        put_str(&mut o, name);
        o.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            o.extend(d.to_le_bytes());
        }
        o.extend(ty.to_le_bytes());
        o.extend(off.to_le_bytes());
        off += (data.len() as u64).div_ceil(32) * 32;
    }
    o.resize(o.len().div_ceil(32) * 32, 0);
    for (_, _, _, data) in tensors {
        o.extend(data);
        o.resize(o.len().div_ceil(32) * 32, 0);
    }
    o
}

fn gguf_str(s: &str) -> Vec<u8> {
    let mut o = (s.len() as u64).to_le_bytes().to_vec();
    o.extend(s.as_bytes());
    o
}

fn gguf_str_array(items: &[String]) -> Vec<u8> {
    let mut o = 8u32.to_le_bytes().to_vec();
    o.extend((items.len() as u64).to_le_bytes());
    for s in items {
        o.extend(gguf_str(s));
    }
    o
}

/// Q8_0 blocks of `n` values (f16 scale, 32 signed bytes).
fn q8_0(n: usize, seed: u64) -> Vec<u8> {
    let v = lcg_values(n, seed);
    let mut o = Vec::new();
    for b in v.chunks(32) {
        o.extend(half::f16::from_f32(0.01).to_le_bytes());
        o.extend(b.iter().map(|&x| ((x * 100.0) as i8) as u8));
    }
    o
}

/// Q4_0 (`with_min`: Q4_1) blocks of `n` values.
fn q4(n: usize, with_min: bool, seed: u64) -> Vec<u8> {
    let v = lcg_values(n, seed);
    let mut o = Vec::new();
    for b in v.chunks(32) {
        o.extend(half::f16::from_f32(0.02).to_le_bytes());
        if with_min {
            o.extend(half::f16::from_f32(-0.1).to_le_bytes());
        }
        for j in 0..16 {
            let lo = ((b[j] * 40.0) as i32 + 8).clamp(0, 15) as u8;
            let hi = ((b[j + 16] * 40.0) as i32 + 8).clamp(0, 15) as u8;
            o.push(lo | hi << 4);
        }
    }
    o
}

/// A tiny Llama GGUF (d 32, one layer, every tensor type) with a byte-level BPE tokenizer.
fn tiny_gguf(pre: &str) -> Vec<u8> {
    let (d, nh, nkv, hd, ff) = (32u64, 2u64, 1u64, 16u64, 32u64);
    // The byte alphabet (GPT-2's printable mapping), a few merges and two control tokens.
    let mut tokens: Vec<String> = Vec::new();
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable =
            (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        tokens.push(if printable {
            char::from(b).to_string()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap().to_string()
        });
    }
    let merges: Vec<String> = ["t h", "th e", "Ġ the", "1 2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    tokens.push("<|endoftext|>".into());
    tokens.push("<|im_start|>".into());
    let vocab = tokens.len() as u64;
    let mut types = 5u32.to_le_bytes().to_vec();
    types.extend(vocab.to_le_bytes());
    for i in 0..vocab {
        types.extend((if i + 2 >= vocab { 3i32 } else { 1 }).to_le_bytes());
    }
    let u32v = |x: u64| (x as u32).to_le_bytes().to_vec();
    let kv: Vec<(&str, u32, Vec<u8>)> = vec![
        ("general.architecture", 8, gguf_str("llama")),
        ("general.alignment", 4, u32v(32)),
        ("llama.block_count", 4, u32v(1)),
        ("llama.context_length", 4, u32v(64)),
        ("llama.embedding_length", 4, u32v(d)),
        ("llama.feed_forward_length", 4, u32v(ff)),
        ("llama.attention.head_count", 4, u32v(nh)),
        ("llama.attention.head_count_kv", 4, u32v(nkv)),
        ("llama.rope.freq_base", 6, 10000f32.to_le_bytes().to_vec()),
        (
            "llama.attention.layer_norm_rms_epsilon",
            6,
            1e-5f32.to_le_bytes().to_vec(),
        ),
        ("llama.rope.dimension_count", 4, u32v(hd)),
        ("tokenizer.ggml.model", 8, gguf_str("gpt2")),
        ("tokenizer.ggml.pre", 8, gguf_str(pre)),
        ("tokenizer.ggml.tokens", 9, gguf_str_array(&tokens)),
        ("tokenizer.ggml.token_type", 9, types),
        ("tokenizer.ggml.merges", 9, gguf_str_array(&merges)),
        ("tokenizer.ggml.bos_token_id", 4, u32v(vocab - 1)),
        ("tokenizer.ggml.eos_token_id", 4, u32v(vocab - 2)),
        ("tokenizer.ggml.add_bos_token", 7, vec![1]),
    ];
    let f32t = |n: u64, s: u64| f32_bytes(&lcg_values(n as usize, s));
    let f16t = |n: u64, s: u64| f16_bytes(&lcg_values(n as usize, s));
    let bf16t = |n: u64, s: u64| -> Vec<u8> {
        lcg_values(n as usize, s)
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect()
    };
    let tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)> = vec![
        (
            "token_embd.weight".into(),
            vec![d, vocab],
            8,
            q8_0((d * vocab) as usize, 1),
        ),
        ("blk.0.attn_norm.weight".into(), vec![d], 0, f32t(d, 2)),
        (
            "blk.0.attn_q.weight".into(),
            vec![d, nh * hd],
            1,
            f16t(d * nh * hd, 3),
        ),
        (
            "blk.0.attn_k.weight".into(),
            vec![d, nkv * hd],
            2,
            q4((d * nkv * hd) as usize, false, 4),
        ),
        (
            "blk.0.attn_v.weight".into(),
            vec![d, nkv * hd],
            3,
            q4((d * nkv * hd) as usize, true, 5),
        ),
        (
            "blk.0.attn_output.weight".into(),
            vec![nh * hd, d],
            30,
            bf16t(d * nh * hd, 6),
        ),
        ("blk.0.ffn_norm.weight".into(), vec![d], 0, f32t(d, 7)),
        (
            "blk.0.ffn_gate.weight".into(),
            vec![d, ff],
            8,
            q8_0((d * ff) as usize, 8),
        ),
        (
            "blk.0.ffn_up.weight".into(),
            vec![d, ff],
            2,
            q4((d * ff) as usize, false, 9),
        ),
        (
            "blk.0.ffn_down.weight".into(),
            vec![ff, d],
            3,
            q4((d * ff) as usize, true, 10),
        ),
        ("output_norm.weight".into(), vec![d], 0, f32t(d, 11)),
    ];
    gguf_file(&kv, &tensors)
}

/// Metadata of every value type, nested arrays, and one small tensor.
fn gguf_metadata_only() -> Vec<u8> {
    let mut nested = 9u32.to_le_bytes().to_vec();
    nested.extend(2u64.to_le_bytes());
    nested.extend(4u32.to_le_bytes());
    nested.extend(1u64.to_le_bytes());
    nested.extend(7u32.to_le_bytes());
    nested.extend(8u32.to_le_bytes());
    nested.extend(1u64.to_le_bytes());
    nested.extend(gguf_str("a"));
    let kv: Vec<(&str, u32, Vec<u8>)> = vec![
        ("general.architecture", 8, gguf_str("llama")),
        ("t.u8", 0, vec![200]),
        ("t.i8", 1, vec![0xfb]),
        ("t.u16", 2, 60000u16.to_le_bytes().to_vec()),
        ("t.i16", 3, (-3i16).to_le_bytes().to_vec()),
        ("t.u32", 4, 7u32.to_le_bytes().to_vec()),
        ("t.i32", 5, (-7i32).to_le_bytes().to_vec()),
        ("t.f32", 6, 1.5f32.to_le_bytes().to_vec()),
        ("t.bool", 7, vec![1]),
        ("t.u64", 10, (1u64 << 40).to_le_bytes().to_vec()),
        ("t.i64", 11, (-5i64).to_le_bytes().to_vec()),
        ("t.f64", 12, 0.125f64.to_le_bytes().to_vec()),
        ("t.nested", 9, nested),
    ];
    let t = vec![(
        "x".to_string(),
        vec![4u64, 2],
        0u32,
        f32_bytes(&lcg_values(8, 3)),
    )];
    gguf_file(&kv, &t)
}

fn fixture(p: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(p),
    )
    .unwrap()
}

fn join_nul(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut v = a.to_vec();
    v.push(0);
    v.extend(b);
    v
}

#[allow(clippy::vec_init_then_push)] // one push per seed reads best
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    use prefix_tune::checkpoint::{save_checkpoint, CheckpointParts};
    use prefix_tune::optim::{AdamW, AdamWConfig, Optimizer};
    use prefix_tune::prefix::{
        save_prefix, save_reparam, Positions, PrefixBank, PrefixMeta, Reparam,
    };
    use prefix_tune::train::{LoopState, MetricRecord, TrainConfig, TrainableShape, TrainerState};

    let mut s: Vec<(&str, &str, Vec<u8>)> = Vec::new();
    s.push(("gguf", "tiny-llama-smollm", tiny_gguf("smollm")));
    // (No "llama3" pre-tokenizer seed: its split regex, a constant, is compiled at every load
    // and took half of the target's time; tests/loading.rs covers that path.)
    s.push(("gguf", "metadata-types", gguf_metadata_only()));

    s.push((
        "safetensors",
        "tiny-gpt2-f32",
        st_file(&hf_tensors(Arch::Gpt2, Dtype::F32), None),
    ));
    s.push((
        "safetensors",
        "tiny-llama-f16",
        st_file(&hf_tensors(Arch::Llama, Dtype::F16), None),
    ));
    let bf: Vec<_> = hf_tensors(Arch::Llama, Dtype::BF16)
        .into_iter()
        .take(3)
        .collect();
    let bf_data: Vec<Vec<u8>> = bf
        .iter()
        .map(|(_, sh, _)| {
            lcg_values(sh.iter().product(), 9)
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect()
        })
        .collect();
    let views: Vec<(String, TensorView)> = bf
        .iter()
        .zip(&bf_data)
        .map(|((n, sh, dt), b)| (n.clone(), TensorView::new(*dt, sh.clone(), b).unwrap()))
        .collect();
    s.push((
        "safetensors",
        "bf16-partial",
        safetensors::serialize(views, None).unwrap(),
    ));

    for m in ["gpt2_tiny", "llama_tiny"] {
        let cfg = fixture(&format!("{m}/config.json"));
        let gen = fixture(&format!("{m}/generation_config.json"));
        s.push((
            "config_json",
            if m == "gpt2_tiny" {
                "gpt2-with-generation"
            } else {
                "llama-with-generation"
            },
            join_nul(&cfg, &gen),
        ));
        s.push((
            "config_json",
            if m == "gpt2_tiny" { "gpt2" } else { "llama" },
            cfg,
        ));
    }

    let tok = fixture("llama_tiny/tokenizer.json");
    s.push(("tokenizer_json", "tiny-bpe", tok.clone()));
    s.push((
        "tokenizer_json",
        "tiny-bpe-with-config",
        join_nul(
            &tok,
            br#"{"add_bos_token": true, "bos_token": "<s>", "eos_token": {"content": "</s>"}}"#,
        ),
    ));

    s.push((
        "data_jsonl",
        "pairs",
        b"{\"input\": \"name[Aromi], eatType[pub]\", \"target\": \"Aromi is a pub.\"}\n\n{\"prompt\": \"a\\u00e9\", \"completion\": \"b\"}\n".to_vec(),
    ));
    s.push((
        "data_csv",
        "e2e",
        b"mr,ref\n\"name[Aromi], food[Thai]\",\"Aromi serves \"\"Thai\"\" food\nnearby.\"\r\nname[X],Y\n".to_vec(),
    ));
    s.push((
        "data_bigbench",
        "task",
        br#"{"name": "t", "examples": [{"input": "1+1", "target": "2"}, {"input": "x", "target": ["y", "z"]}]}"#.to_vec(),
    ));

    let dir = tempfile::tempdir().unwrap();
    let bank = PrefixBank::<f32>::random(2, 2, 1, 3, 2, 0.5, 7);
    let meta = PrefixMeta {
        arch: Arch::Llama,
        n_layers: 2,
        kv_heads: 1,
        head_dim: 2,
        prefix_len: 3,
        fingerprint: "0123abcd".into(),
        positions: Positions::AfterPrefix,
        training_args: r#"{"lr": 0.01}"#.into(),
    };
    save_prefix(&dir.path().join("p.safetensors"), &bank, &meta).unwrap();
    s.push((
        "prefix_file",
        "two-prefixes",
        std::fs::read(dir.path().join("p.safetensors")).unwrap(),
    ));
    let one = PrefixBank::<f32>::random(1, 1, 1, 2, 2, 0.5, 8);
    let meta1 = PrefixMeta {
        n_layers: 1,
        prefix_len: 2,
        arch: Arch::Gpt2,
        positions: Positions::FromZero,
        ..meta.clone()
    };
    save_prefix(&dir.path().join("q.safetensors"), &one, &meta1).unwrap();
    s.push((
        "prefix_file",
        "one-prefix",
        std::fs::read(dir.path().join("q.safetensors")).unwrap(),
    ));
    let r = Reparam::<f32>::random(1, 1, 2, 2, 3, 4, 0);
    save_reparam(&dir.path().join("r.safetensors"), &r).unwrap();
    s.push((
        "prefix_file",
        "reparam",
        std::fs::read(dir.path().join("r.safetensors")).unwrap(),
    ));

    let peft = join_nul(
        &fixture("peft_prefix/adapter_config.json"),
        &fixture("peft_prefix/adapter_model.safetensors"),
    );
    s.push(("peft_adapter", "peft-saved", peft));
    let g = "gpt2_tiny/peft_adapter";
    if Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(g)
        .join("adapter_model.safetensors")
        .is_file()
    {
        let b = join_nul(
            &fixture(&format!("{g}/adapter_config.json")),
            &fixture(&format!("{g}/adapter_model.safetensors")),
        );
        if b.len() <= 65536 {
            s.push(("peft_adapter", "gpt2-tiny", b));
        }
    }

    // A checkpoint of a one-prefix bank after one AdamW step, with a history of two records.
    let params = one.to_flat();
    let mut opt = AdamW::new(AdamWConfig::default(), params.len());
    let mut p2 = params.clone();
    opt.step(&mut p2, &lcg_values(params.len(), 4), 1e-3);
    let rec = |step: u64| MetricRecord {
        step,
        loss: Some(1.5),
        lr: Some(1e-3),
        grad_norm: Some(0.5),
        tokens: Some(7),
        tokens_seen: 20 * step,
        elapsed: 0.25,
        eval_loss: (step == 2).then_some(1.75),
        skipped: 0,
        overflow_skipped: 0,
        loss_scale: None,
    };
    let state = TrainerState {
        config: TrainConfig {
            optimizer: prefix_tune::train::OptimizerKind::Adamw,
            lr: 1e-3,
            weight_decay: 0.0,
            warmup_steps: 0,
            schedule: prefix_tune::train::ScheduleKind::Cosine,
            max_grad_norm: 1.0,
            steps: 4,
            batch_size: 2,
            grad_accum: 1,
            seed: 3,
            eval_every: 2,
            save_every: 1,
        },
        looping: LoopState {
            step: 2,
            epoch: 0,
            offset: 4,
            rng_seed: 3,
            tokens_seen: 40,
            elapsed: 0.5,
            skipped: 0,
            overflow_skipped: 0,
            loss_scale: None,
            best_eval: Some(1.75),
            best_eval_step: Some(2),
            history: vec![rec(1), rec(2)],
        },
        args: serde_json::json!({"prefix_len": 2, "lr": 0.001}),
        trainable: TrainableShape::Bank {
            n_layers: 1,
            kv_heads: 1,
            head_dim: 2,
            len: 2,
        },
    };
    let optimizer = Optimizer::AdamW(opt);
    let parts = CheckpointParts {
        params: &p2,
        optimizer: &optimizer,
        prefix: &one,
        meta: &meta1,
        reparam: None,
    };
    save_checkpoint(dir.path(), &state, &parts).unwrap();
    s.push((
        "checkpoint",
        "adamw-bank",
        std::fs::read(dir.path().join("checkpoint/trainer.safetensors")).unwrap(),
    ));
    s
}

#[test]
#[ignore = "rewrites fuzz/seeds/ (run by hand)"]
fn write_seed_corpus() {
    for (target, name, bytes) in seeds() {
        assert!(
            bytes.len() <= 65536,
            "seed {target}/{name} is {} bytes",
            bytes.len()
        );
        let dir = fuzz_dir().join("seeds").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
fn the_seeds_are_accepted() {
    // The seeds are valid files: each loads (so the fuzzer starts from inputs that reach deep).
    use prefix_tune::model::bytes::FileBytes;
    for (target, name, bytes) in seeds() {
        let what = format!("seed {target}/{name}");
        match target {
            "gguf" if name != "metadata-types" => {
                let g = prefix_tune::model::gguf::GgufFile::from_bytes(
                    Path::new("x.gguf"),
                    FileBytes::Owned(bytes),
                )
                .expect(&what);
                g.llama_weights().expect(&what);
                prefix_tune::model::Tokenizer::from_gguf(&g).expect(&what);
            }
            "safetensors" if name != "bf16-partial" => {
                let arch = if name.contains("gpt2") {
                    Arch::Gpt2
                } else {
                    Arch::Llama
                };
                let st = prefix_tune::model::safetensors::SafetensorsSet::from_bytes(vec![(
                    PathBuf::from("m.safetensors"),
                    FileBytes::Owned(bytes),
                )])
                .expect(&what);
                prefix_tune::model::safetensors::hf_weights(tiny_config(arch), &st, Path::new("m"))
                    .expect(&what);
            }
            "prefix_file" if name != "reparam" => {
                prefix_tune::prefix::file::parse_prefix(Path::new("p"), &bytes).expect(&what);
            }
            "checkpoint" => {
                let ck = prefix_tune::checkpoint::parse_checkpoint::<
                    prefix_tune::train::TrainerState,
                >(Path::new("c/trainer.safetensors"), &bytes)
                .expect(&what);
                ck.state.trainable.build(&ck.params).expect(&what);
            }
            "peft_adapter" => {
                let i = bytes.iter().position(|&b| b == 0).unwrap();
                prefix_tune::prefix::peft::parse_peft_adapter(
                    Path::new("a"),
                    &bytes[..i],
                    Path::new("b"),
                    &bytes[i + 1..],
                )
                .expect(&what);
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One test per fixed finding (the inputs are in fuzz/regressions/; RELIABILITY.md says how each
// was found): the input gets a clear error naming the file, through the real binary.

fn regression(target: &str, name: &str) -> Vec<u8> {
    std::fs::read(fuzz_dir().join("regressions").join(target).join(name)).unwrap()
}

/// `train --resume` of a run directory whose checkpoint is `trainer`: fails cleanly, naming it.
fn resume_fails(trainer: &[u8], wants: &[&str]) {
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("run").join("checkpoint");
    std::fs::create_dir_all(&ck).unwrap();
    std::fs::write(ck.join("trainer.safetensors"), trainer).unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tiny");
    let data = d.path().join("d.jsonl");
    std::fs::write(&data, "{\"input\": \"ab\", \"target\": \"cd\"}\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefix-tune"))
        .args(["train", "--resume"])
        .arg(d.path().join("run"))
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("memory allocation"),
        "{err}"
    );
    assert!(
        err.contains(ck.to_str().unwrap()),
        "names the checkpoint: {err}"
    );
    for w in wants {
        assert!(err.contains(w), "wants {w:?}: {err}");
    }
    // The checkpoint is left as it was.
    assert_eq!(
        std::fs::read(ck.join("trainer.safetensors")).unwrap(),
        trainer
    );
}

#[test]
fn a_checkpoint_with_an_impossible_prefix_shape_is_refused() {
    // len = 2^40: the rebuilt prefix bank was allocated before its size was checked.
    resume_fails(
        &regression("checkpoint", "review-bank-huge-len"),
        &["holds 128 parameters", "needs 70368744177664"],
    );
    // emb_dim = 0: the reparameterization's initializer panicked on a zero width.
    resume_fails(
        &regression("checkpoint", "review-reparam-zero-emb-dim"),
        &["holds 128 parameters", "impossible number"],
    );
}

#[test]
fn a_tokenizer_json_with_a_malformed_decoder_is_refused() {
    // tokenizers 0.22 panicked (an `expect` in its decoder deserializer) on a JSON syntax error
    // inside "decoder".
    let input = regression("tokenizer_json", "decoder-malformed-json-panic");
    let tok = &input[..input.iter().position(|&b| b == 0).unwrap_or(input.len())];
    let d = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tiny");
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), d.path().join(f)).unwrap();
    }
    std::fs::write(d.path().join("tokenizer.json"), tok).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prefix-tune"))
        .args(["info", "--model"])
        .arg(d.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"), "{err}");
    let file = d.path().join("tokenizer.json");
    assert!(
        err.contains(file.to_str().unwrap()),
        "names the file: {err}"
    );
    assert!(
        err.contains("invalid JSON") && err.contains("line 20"),
        "{err}"
    );
}
