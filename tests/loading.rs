//! Loading models from synthetic GGUF files and HF safetensors directories written here, and
//! refusing malformed ones with an error that names the file (never a panic).
//!
//! Expected values are built independently of the loaders: quantized blocks are packed here from
//! chosen scales and integers (the value each element must dequantize to follows from those by the
//! block definition), Q/K rows are permuted the way llama.cpp's converter does, and GPT-2's Conv1D
//! weights are written `[in, out]` from `[out, in]` matrices chosen first.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use prefix_tune::model::gguf::GgufFile;
use prefix_tune::model::{load_model, Arch, LoadedModel, ModelWeights};
use prefix_tune::reference::real::rel_err;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// A tiny GGUF writer.

/// A metadata value to write.
#[derive(Clone, Debug)]
enum V {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    /// Element type id and elements.
    Arr(u32, Vec<V>),
}

impl V {
    fn type_id(&self) -> u32 {
        match self {
            V::U8(_) => 0,
            V::I8(_) => 1,
            V::U16(_) => 2,
            V::I16(_) => 3,
            V::U32(_) => 4,
            V::I32(_) => 5,
            V::F32(_) => 6,
            V::Bool(_) => 7,
            V::Str(_) => 8,
            V::Arr(..) => 9,
            V::U64(_) => 10,
            V::I64(_) => 11,
            V::F64(_) => 12,
        }
    }
    fn write(&self, o: &mut Vec<u8>) {
        match self {
            V::U8(x) => o.push(*x),
            V::I8(x) => o.push(*x as u8),
            V::U16(x) => o.extend(x.to_le_bytes()),
            V::I16(x) => o.extend(x.to_le_bytes()),
            V::U32(x) => o.extend(x.to_le_bytes()),
            V::I32(x) => o.extend(x.to_le_bytes()),
            V::F32(x) => o.extend(x.to_le_bytes()),
            V::Bool(x) => o.push(*x as u8),
            V::Str(s) => write_str(o, s),
            V::U64(x) => o.extend(x.to_le_bytes()),
            V::I64(x) => o.extend(x.to_le_bytes()),
            V::F64(x) => o.extend(x.to_le_bytes()),
            V::Arr(et, items) => {
                o.extend(et.to_le_bytes());
                o.extend((items.len() as u64).to_le_bytes());
                for it in items {
                    it.write(o);
                }
            }
        }
    }
}

fn s(x: &str) -> V {
    V::Str(x.to_string())
}

fn write_str(o: &mut Vec<u8>, s: &str) {
    o.extend((s.len() as u64).to_le_bytes());
    o.extend(s.as_bytes());
}

struct Tensor {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
}

struct GgufBuilder {
    version: u32,
    alignment: usize,
    kv: Vec<(String, V)>,
    tensors: Vec<Tensor>,
}

/// Bytes of a GGUF file and where its fields are, for corrupting them.
struct Built {
    bytes: Vec<u8>,
    marks: HashMap<String, usize>,
}

impl GgufBuilder {
    fn build(&self) -> Built {
        let mut o = Vec::new();
        let mut marks = HashMap::new();
        o.extend(b"GGUF");
        o.extend(self.version.to_le_bytes());
        marks.insert("tensor_count".into(), o.len());
        o.extend((self.tensors.len() as u64).to_le_bytes());
        marks.insert("kv_count".into(), o.len());
        o.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            marks.insert(format!("key:{k}"), o.len());
            write_str(&mut o, k);
            marks.insert(format!("type:{k}"), o.len());
            o.extend(v.type_id().to_le_bytes());
            marks.insert(format!("val:{k}"), o.len());
            v.write(&mut o);
        }
        let align = |x: usize| x.div_ceil(self.alignment) * self.alignment;
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            offset = align(offset);
            offsets.push(offset);
            offset += t.data.len();
        }
        for (t, &off) in self.tensors.iter().zip(&offsets) {
            marks.insert(format!("tname:{}", t.name), o.len());
            write_str(&mut o, &t.name);
            marks.insert(format!("ndims:{}", t.name), o.len());
            o.extend((t.dims.len() as u32).to_le_bytes());
            marks.insert(format!("dims:{}", t.name), o.len());
            for d in &t.dims {
                o.extend(d.to_le_bytes());
            }
            marks.insert(format!("ttype:{}", t.name), o.len());
            o.extend(t.ty.to_le_bytes());
            marks.insert(format!("toff:{}", t.name), o.len());
            o.extend((off as u64).to_le_bytes());
        }
        o.resize(align(o.len()), 0);
        let data_start = o.len();
        marks.insert("data".into(), data_start);
        for (t, &off) in self.tensors.iter().zip(&offsets) {
            o.resize(data_start + off, 0);
            o.extend(&t.data);
        }
        Built { bytes: o, marks }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor data with known values: float types round through their format; quantized blocks are
// packed from chosen scales and integers.

const F32: u32 = 0;
const F16: u32 = 1;
const Q4_0: u32 = 2;
const Q4_1: u32 = 3;
const Q8_0: u32 = 8;
const BF16: u32 = 30;

fn f16_bytes(x: f16) -> [u8; 2] {
    x.to_bits().to_le_bytes()
}

/// `n` values of ggml type `ty` (n a multiple of 32 for block types): (file bytes, the values they mean).
fn make_data(ty: u32, n: usize, rng: &mut StdRng) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    let mut vals = Vec::new();
    match ty {
        F32 => {
            for _ in 0..n {
                let x: f32 = rng.random_range(-1.0..1.0);
                bytes.extend(x.to_le_bytes());
                vals.push(x);
            }
        }
        F16 => {
            for _ in 0..n {
                let x = f16::from_f32(rng.random_range(-1.0..1.0));
                bytes.extend(f16_bytes(x));
                vals.push(x.to_f32());
            }
        }
        BF16 => {
            for _ in 0..n {
                let x = bf16::from_f32(rng.random_range(-1.0..1.0));
                bytes.extend(x.to_bits().to_le_bytes());
                vals.push(x.to_f32());
            }
        }
        Q8_0 => {
            for _ in 0..n / 32 {
                let d = f16::from_f32(rng.random_range(0.001..0.05));
                bytes.extend(f16_bytes(d));
                for _ in 0..32 {
                    let q: i8 = rng.random_range(-127..=127);
                    bytes.push(q as u8);
                    vals.push(q as f32 * d.to_f32());
                }
            }
        }
        Q4_0 | Q4_1 => {
            for _ in 0..n / 32 {
                let d = f16::from_f32(rng.random_range(0.001..0.1));
                let m = f16::from_f32(rng.random_range(-0.5..0.0));
                bytes.extend(f16_bytes(d));
                if ty == Q4_1 {
                    bytes.extend(f16_bytes(m));
                }
                let q: Vec<u8> = (0..32).map(|_| rng.random_range(0..16u8)).collect();
                // Element j sits in the low nibble of byte j, element j+16 in its high nibble.
                for j in 0..16 {
                    bytes.push(q[j] | (q[j + 16] << 4));
                }
                for &qi in &q {
                    vals.push(if ty == Q4_0 {
                        (qi as f32 - 8.0) * d.to_f32()
                    } else {
                        qi as f32 * d.to_f32() + m.to_f32()
                    });
                }
            }
        }
        _ => unreachable!(),
    }
    (bytes, vals)
}

/// llama.cpp's converter permutation of Q/K rows (`reshape(n_head, 2, hd/2, cols).swapaxes(1, 2)`):
/// file row `h·hd + 2j + i` holds HF row `h·hd + i·hd/2 + j`.
fn llama_cpp_permute(hf: &[f32], n_heads: usize, hd: usize, cols: usize) -> Vec<f32> {
    let mut file = vec![0.0; hf.len()];
    for h in 0..n_heads {
        for i in 0..2 {
            for j in 0..hd / 2 {
                let src = h * hd + i * hd / 2 + j;
                let dst = h * hd + 2 * j + i;
                file[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
            }
        }
    }
    file
}

fn float_bytes(ty: u32, v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| match ty {
            F32 => x.to_le_bytes().to_vec(),
            F16 => f16::from_f32(x).to_bits().to_le_bytes().to_vec(),
            BF16 => bf16::from_f32(x).to_bits().to_le_bytes().to_vec(),
            _ => unreachable!(),
        })
        .collect()
}

/// GPT-2's byte → printable character table, written out from its definition.
fn byte_chars() -> Vec<char> {
    let mut keep: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut table = vec!['?'; 256];
    for &b in &keep {
        table[b as usize] = char::from_u32(b).unwrap();
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !keep.contains(&b) {
            table[b as usize] = char::from_u32(256 + n).unwrap();
            n += 1;
            keep.push(b);
        }
    }
    table
}

// ---------------------------------------------------------------------------------------------
// A tiny Llama GGUF: every supported type, permuted Q/K, a byte-level BPE vocabulary.

const D: usize = 64;
const NH: usize = 4;
const NKV: usize = 2;
const HD: usize = 16;
const FF: usize = 96;
const NL: usize = 2;

struct TinyGguf {
    builder: GgufBuilder,
    /// Expected weights by GGUF tensor name, in HF layout (Q/K un-permuted).
    expected: HashMap<String, Vec<f32>>,
    vocab: usize,
    /// Token id by vocabulary spelling.
    ids: HashMap<String, u32>,
}

fn tiny_gguf(seed: u64, untied: bool, pre: &str) -> TinyGguf {
    let mut rng = StdRng::seed_from_u64(seed);
    let chars = byte_chars();
    let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    let merges = ["t h", "th e", "Ġ the", "1 2"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    tokens.extend(specials.iter().map(|s| s.to_string()));
    let vocab = tokens.len();
    let mut types = vec![1i32; vocab];
    for t in &mut types[vocab - specials.len()..] {
        *t = 3;
    }
    let ids = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();

    let kv = vec![
        ("general.architecture".to_string(), s("llama")),
        ("general.name".into(), s("tiny test llama")),
        ("llama.block_count".into(), V::U32(NL as u32)),
        ("llama.context_length".into(), V::U32(128)),
        ("llama.embedding_length".into(), V::U32(D as u32)),
        ("llama.feed_forward_length".into(), V::U32(FF as u32)),
        ("llama.attention.head_count".into(), V::U32(NH as u32)),
        ("llama.attention.head_count_kv".into(), V::U32(NKV as u32)),
        ("llama.rope.freq_base".into(), V::F32(50000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            V::F32(1e-5),
        ),
        ("llama.vocab_size".into(), V::U32(vocab as u32)),
        ("llama.rope.dimension_count".into(), V::U32(HD as u32)),
        // One of every other value type, and a nested array.
        ("test.u8".into(), V::U8(200)),
        ("test.i8".into(), V::I8(-5)),
        ("test.u16".into(), V::U16(60000)),
        ("test.i16".into(), V::I16(-30000)),
        ("test.i32".into(), V::I32(-7)),
        ("test.u64".into(), V::U64(1 << 40)),
        ("test.i64".into(), V::I64(-(1 << 40))),
        ("test.f64".into(), V::F64(0.125)),
        (
            "test.nested".into(),
            V::Arr(
                9,
                vec![
                    V::Arr(4, vec![V::U32(1), V::U32(2)]),
                    V::Arr(8, vec![s("a")]),
                ],
            ),
        ),
        (
            "test.f32s".into(),
            V::Arr(6, vec![V::F32(1.5), V::F32(-2.0)]),
        ),
        (
            "test.bools".into(),
            V::Arr(7, vec![V::Bool(true), V::Bool(false)]),
        ),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s(pre)),
        (
            "tokenizer.ggml.tokens".into(),
            V::Arr(8, tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            V::Arr(5, types.iter().map(|&t| V::I32(t)).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            V::Arr(8, merges.iter().map(|m| s(m)).collect()),
        ),
        (
            "tokenizer.ggml.bos_token_id".into(),
            V::U32(vocab as u32 - 2),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            V::U32(vocab as u32 - 1),
        ),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(false)),
    ];

    let mut tensors = Vec::new();
    let mut expected = HashMap::new();
    let mut add = |name: String, ty: u32, rows: usize, cols: usize, rng: &mut StdRng| {
        let (data, vals) = make_data(ty, rows * cols, rng);
        let dims = if rows == 1 {
            vec![cols as u64]
        } else {
            vec![cols as u64, rows as u64]
        };
        tensors.push(Tensor {
            name: name.clone(),
            dims,
            ty,
            data,
        });
        expected.insert(name, vals);
    };
    add("token_embd.weight".into(), Q8_0, vocab, D, &mut rng);
    for l in 0..NL {
        let p = format!("blk.{l}.");
        add(format!("{p}attn_norm.weight"), F32, 1, D, &mut rng);
        add(format!("{p}attn_v.weight"), Q4_0, NKV * HD, D, &mut rng);
        add(format!("{p}attn_output.weight"), Q4_1, D, NH * HD, &mut rng);
        add(format!("{p}ffn_norm.weight"), F32, 1, D, &mut rng);
        add(format!("{p}ffn_gate.weight"), Q4_0, FF, D, &mut rng);
        add(format!("{p}ffn_up.weight"), Q4_1, FF, D, &mut rng);
        add(format!("{p}ffn_down.weight"), Q8_0, D, FF, &mut rng);
    }
    add("output_norm.weight".into(), F32, 1, D, &mut rng);
    if untied {
        add("output.weight".into(), F16, vocab, D, &mut rng);
    }
    // Q and K: chosen in HF layout, written permuted as llama.cpp does.
    for l in 0..NL {
        for (what, heads, ty) in [
            ("attn_q", NH, if l == 0 { F32 } else { BF16 }),
            ("attn_k", NKV, if l == 0 { F16 } else { F32 }),
        ] {
            let (_, hf) = make_data(ty, heads * HD * D, &mut rng);
            let name = format!("blk.{l}.{what}.weight");
            let file = llama_cpp_permute(&hf, heads, HD, D);
            tensors.push(Tensor {
                name: name.clone(),
                dims: vec![D as u64, (heads * HD) as u64],
                ty,
                data: float_bytes(ty, &file),
            });
            expected.insert(name, hf);
        }
    }
    TinyGguf {
        builder: GgufBuilder {
            version: 3,
            alignment: 32,
            kv,
            tensors,
        },
        expected,
        vocab,
        ids,
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn check_close(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let e = rel_err(got, want);
    assert!(e < 1e-7, "{name}: rel err {e:e}");
}

fn check_gguf_weights(w: &ModelWeights<f32>, t: &TinyGguf) {
    let ex = |n: &str| t.expected[n].as_slice();
    check_close("token_embd", &w.tok_emb, ex("token_embd.weight"));
    check_close("output_norm", &w.final_norm_w, ex("output_norm.weight"));
    for (l, lw) in w.layers.iter().enumerate() {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        check_close(&n("attn_norm"), &lw.attn_norm_w, ex(&n("attn_norm")));
        check_close(&n("attn_q"), &lw.wq, ex(&n("attn_q")));
        check_close(&n("attn_k"), &lw.wk, ex(&n("attn_k")));
        check_close(&n("attn_v"), &lw.wv, ex(&n("attn_v")));
        check_close(&n("attn_output"), &lw.wo, ex(&n("attn_output")));
        check_close(&n("ffn_norm"), &lw.mlp_norm_w, ex(&n("ffn_norm")));
        check_close(&n("ffn_gate"), &lw.w_in, ex(&n("ffn_gate")));
        check_close(&n("ffn_up"), lw.w_up.as_deref().unwrap(), ex(&n("ffn_up")));
        check_close(&n("ffn_down"), &lw.w_out, ex(&n("ffn_down")));
        assert!(lw.attn_norm_b.is_none() && lw.bq.is_none() && lw.b_in.is_none());
    }
}

#[test]
fn gguf_tiny_llama_loads_every_type() {
    let dir = tempfile::tempdir().unwrap();
    for untied in [false, true] {
        let t = tiny_gguf(11 + untied as u64, untied, "smollm");
        let path = write(dir.path(), "tiny.gguf", &t.builder.build().bytes);
        let m = load_model(&path).unwrap();
        let c = &m.weights.config;
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!(
            (
                c.d_model,
                c.n_layers,
                c.n_heads,
                c.n_kv_heads,
                c.head_dim,
                c.d_ff
            ),
            (D, NL, NH, NKV, HD, FF)
        );
        assert_eq!((c.vocab_size, c.max_positions), (t.vocab, 128));
        assert_eq!(c.rope_theta, 50000.0);
        assert!((c.norm_eps - 1e-5).abs() < 1e-10);
        assert_eq!(c.bos_token_id, Some(t.vocab as u32 - 2));
        assert_eq!(c.eos_token_ids, vec![t.vocab as u32 - 1]);
        check_gguf_weights(&m.weights, &t);
        assert_eq!(c.tied_embeddings, !untied);
        match &m.weights.lm_head {
            None => assert!(!untied),
            Some(h) => check_close("output", h, &t.expected["output.weight"]),
        }
        // The fingerprint is stable and depends on the weights.
        let again = load_model(&path).unwrap();
        assert_eq!(again.fingerprint, m.fingerprint);
        let other = tiny_gguf(99, untied, "smollm");
        let p2 = write(dir.path(), "other.gguf", &other.builder.build().bytes);
        assert_ne!(load_model(&p2).unwrap().fingerprint, m.fingerprint);
    }
}

#[test]
fn gguf_metadata_of_every_value_type() {
    let dir = tempfile::tempdir().unwrap();
    let t = tiny_gguf(3, false, "smollm");
    let path = write(dir.path(), "meta.gguf", &t.builder.build().bytes);
    let g = GgufFile::open(&path).unwrap();
    use prefix_tune::model::gguf::{GgufArray, GgufValue};
    assert_eq!(g.get("test.u8"), Some(&GgufValue::U8(200)));
    assert_eq!(g.get("test.i8"), Some(&GgufValue::I8(-5)));
    assert_eq!(g.get("test.u16"), Some(&GgufValue::U16(60000)));
    assert_eq!(g.get("test.i16"), Some(&GgufValue::I16(-30000)));
    assert_eq!(g.get("test.i32"), Some(&GgufValue::I32(-7)));
    assert_eq!(g.get("test.u64"), Some(&GgufValue::U64(1 << 40)));
    assert_eq!(g.get("test.i64"), Some(&GgufValue::I64(-(1 << 40))));
    assert_eq!(g.get("test.f64"), Some(&GgufValue::F64(0.125)));
    assert_eq!(
        g.get("llama.rope.freq_base"),
        Some(&GgufValue::F32(50000.0))
    );
    assert_eq!(
        g.get("test.nested"),
        Some(&GgufValue::Array(GgufArray::Array(vec![
            GgufArray::U32(vec![1, 2]),
            GgufArray::Str(vec!["a".into()])
        ])))
    );
    assert_eq!(
        g.get("test.f32s"),
        Some(&GgufValue::Array(GgufArray::F32(vec![1.5, -2.0])))
    );
    assert_eq!(
        g.get("test.bools"),
        Some(&GgufValue::Array(GgufArray::Bool(vec![true, false])))
    );
    assert_eq!(g.header.version, 3);
    assert_eq!(g.header.tensors.len(), t.builder.tensors.len());
}

#[test]
fn gguf_version_2_and_other_alignment() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = tiny_gguf(5, false, "smollm");
    t.builder.version = 2;
    t.builder.alignment = 64;
    t.builder.kv.push(("general.alignment".into(), V::U32(64)));
    let path = write(dir.path(), "v2.gguf", &t.builder.build().bytes);
    let m = load_model(&path).unwrap();
    check_gguf_weights(&m.weights, &t);
}

#[test]
fn gguf_tokenizer_follows_the_pre_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let t = tiny_gguf(7, false, "smollm");
    let id = |s: &str| t.ids[s];
    let text = "the 12 the<|im_end|>";
    let m = load_model(&write(dir.path(), "smol.gguf", &t.builder.build().bytes)).unwrap();
    let tok = &m.tokenizer;
    // smollm: digits one by one (the "1 2" merge must not apply), then GPT-2's byte-level regex.
    let want = vec![
        id("the"),
        id("Ġ"),
        id("1"),
        id("2"),
        id("Ġthe"),
        id("<|im_end|>"),
    ];
    assert_eq!(tok.encode(text).unwrap(), want);
    assert_eq!(tok.decode(&want).unwrap(), text);
    assert_eq!(tok.vocab_size(), t.vocab);
    assert_eq!(tok.eos_token_ids(), &[t.vocab as u32 - 1]);
    assert_eq!(tok.bos_token_id(), Some(t.vocab as u32 - 2));
    assert!(!tok.add_bos());
    // Bytes outside the merges still encode (byte-level) and round-trip.
    let uni = "ça 😀";
    assert_eq!(tok.decode(&tok.encode(uni).unwrap()).unwrap(), uni);

    // Plain GPT-2 pre-tokenization keeps " 12" together, so the merge applies.
    let t2 = tiny_gguf(7, false, "gpt2");
    let m2 = load_model(&write(
        dir.path(),
        "gpt2pre.gguf",
        &t2.builder.build().bytes,
    ))
    .unwrap();
    assert_eq!(
        m2.tokenizer.encode(text).unwrap(),
        vec![id("the"), id("Ġ"), id("12"), id("Ġthe"), id("<|im_end|>")]
    );

    // An unknown pre-tokenizer is refused by name.
    let t3 = tiny_gguf(7, false, "mystery-pre");
    let p3 = write(dir.path(), "mystery.gguf", &t3.builder.build().bytes);
    let e = format!(
        "{:#}",
        load_model(&p3)
            .err()
            .expect("unknown pre-tokenizer accepted")
    );
    assert!(
        e.contains("mystery.gguf") && e.contains("mystery-pre"),
        "{e}"
    );
}

#[test]
fn gguf_lone_tensors_of_every_type() {
    // Longer tensors than the model uses, so dequantization spans several parallel chunks.
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(21);
    let mut tensors = Vec::new();
    let mut expected = Vec::new();
    for (i, ty) in [F32, F16, BF16, Q8_0, Q4_0, Q4_1].into_iter().enumerate() {
        let n = 32 * 5000 + 32 * i;
        let (data, vals) = make_data(ty, n, &mut rng);
        tensors.push(Tensor {
            name: format!("t{ty}"),
            dims: vec![32, (n / 32) as u64],
            ty,
            data,
        });
        expected.push(vals);
    }
    // A type ggml knows but this loader does not dequantize (Q6_K: 256 values in 210 bytes).
    tensors.push(Tensor {
        name: "k_quant".into(),
        dims: vec![256, 2],
        ty: 14,
        data: vec![0u8; 420],
    });
    let b = GgufBuilder {
        version: 3,
        alignment: 32,
        kv: vec![],
        tensors,
    };
    let path = write(dir.path(), "types.gguf", &b.build().bytes);
    let g = GgufFile::open(&path).unwrap();
    for (t, want) in b.tensors.iter().zip(&expected) {
        let (got, shape) = g.tensor_f32(&t.name).unwrap().unwrap();
        assert_eq!(shape, vec![want.len() / 32, 32]);
        check_close(&t.name, &got, want);
    }
    let e = format!("{:#}", g.tensor_f32("k_quant").unwrap_err());
    assert!(
        e.contains("types.gguf")
            && e.contains("unsupported tensor type")
            && e.contains("Q6_K")
            && e.contains("k_quant"),
        "{e}"
    );
    assert!(g.tensor_f32("absent").unwrap().is_none());
}

// ---------------------------------------------------------------------------------------------
// Malformed GGUF files.

/// Loads `bytes` written as `name` under `catch_unwind`; it must fail with a message naming the
/// file. Returns the message.
fn must_fail(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = write(dir, name, bytes);
    let r = catch_unwind(AssertUnwindSafe(|| load_model(&path)));
    let r: anyhow::Result<LoadedModel> =
        r.unwrap_or_else(|_| panic!("{name}: the loader panicked"));
    let e = format!(
        "{:#}",
        r.err()
            .unwrap_or_else(|| panic!("{name}: malformed input was accepted"))
    );
    assert!(
        e.contains(name),
        "{name}: error does not name the file: {e}"
    );
    e
}

fn patch_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn patch_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn gguf_truncated_at_many_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let t = tiny_gguf(13, true, "smollm");
    let built = t.builder.build();
    let data = built.marks["data"];
    let len = built.bytes.len();
    let mut cuts: Vec<usize> = (0..data + 80).collect();
    cuts.extend((data + 80..len).step_by(97));
    cuts.push(len - 1);
    for cut in cuts {
        must_fail(dir.path(), "trunc.gguf", &built.bytes[..cut]);
    }
}

#[test]
fn gguf_corrupt_fields_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = tiny_gguf(17, false, "smollm");
    let built = t.builder.build();
    let m = &built.marks;
    let base = || built.bytes.clone();
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();

    let mut b = base();
    b[0..4].copy_from_slice(b"GGUG");
    cases.push(("magic", b, "magic"));
    for v in [1u32, 4, 0x0300_0000] {
        let mut b = base();
        patch_u32(&mut b, 4, v);
        cases.push(("version", b, "version"));
    }
    for v in [u64::MAX, 1 << 40, 100_000] {
        let mut b = base();
        patch_u64(&mut b, m["tensor_count"], v);
        cases.push(("tensor count", b, "tensor"));
        let mut b = base();
        patch_u64(&mut b, m["kv_count"], v);
        cases.push(("kv count", b, "metadata"));
    }
    // Huge string lengths: a key and a value.
    for v in [u64::MAX, 1 << 40, built.bytes.len() as u64] {
        let mut b = base();
        patch_u64(&mut b, m["key:general.name"], v);
        cases.push(("key length", b, "length"));
        let mut b = base();
        patch_u64(&mut b, m["val:general.name"], v);
        cases.push(("string length", b, "length"));
        // The token array's count (after its element type).
        let mut b = base();
        patch_u64(&mut b, m["val:tokenizer.ggml.tokens"] + 4, v);
        cases.push(("array count", b, "array"));
        let mut b = base();
        patch_u64(&mut b, m["tname:blk.0.ffn_up.weight"], v);
        cases.push(("tensor name length", b, "length"));
    }
    // Unknown metadata value and array element types.
    let mut b = base();
    patch_u32(&mut b, m["type:general.name"], 13);
    cases.push(("value type", b, "type"));
    let mut b = base();
    patch_u32(&mut b, m["val:tokenizer.ggml.tokens"], 77);
    cases.push(("array element type", b, "type"));
    // A bool that is neither 0 nor 1.
    let mut b = base();
    b[m["val:tokenizer.ggml.add_bos_token"]] = 7;
    cases.push(("bool", b, "bool"));
    // Invalid UTF-8 in a key.
    let mut b = base();
    b[m["key:general.name"] + 8] = 0xFF;
    cases.push(("utf8", b, "UTF-8"));
    // Tensor dims: huge, overflowing, too many, not a whole number of blocks.
    let t0 = "blk.0.ffn_up.weight";
    for v in [u64::MAX, 1 << 40, 1 << 33] {
        let mut b = base();
        patch_u64(&mut b, m[&format!("dims:{t0}")] + 8, v);
        cases.push(("dims", b, t0));
    }
    let mut b = base();
    patch_u32(&mut b, m[&format!("ndims:{t0}")], 9);
    cases.push(("n_dims", b, "dimensions"));
    let mut b = base();
    patch_u32(&mut b, m[&format!("ndims:{t0}")], 0);
    cases.push(("zero n_dims", b, "dimensions"));
    let mut b = base();
    patch_u64(&mut b, m[&format!("dims:{t0}")], 33);
    cases.push(("partial block", b, "block"));
    // Unknown and unsupported tensor types.
    let mut b = base();
    patch_u32(&mut b, m[&format!("ttype:{t0}")], 99);
    cases.push(("unknown dtype", b, t0));
    // Offsets: past the end, overflowing, misaligned.
    for v in [
        1u64 << 40,
        u64::MAX - 31,
        built.bytes.len() as u64 / 32 * 32,
    ] {
        let mut b = base();
        patch_u64(&mut b, m[&format!("toff:{t0}")], v);
        cases.push(("offset", b, t0));
    }
    let mut b = base();
    patch_u64(&mut b, m[&format!("toff:{t0}")], 4);
    cases.push(("misaligned offset", b, "alignment"));

    for (what, bytes, needle) in cases {
        let e = must_fail(dir.path(), "corrupt.gguf", &bytes);
        assert!(e.contains(needle), "{what}: message lacks {needle:?}: {e}");
    }
}

#[test]
fn gguf_inconsistent_models_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = || tiny_gguf(19, false, "smollm");
    let set = |b: &mut GgufBuilder, key: &str, v: V| {
        b.kv.iter_mut().find(|(k, _)| k == key).unwrap().1 = v;
    };

    // Metadata that disagrees with the tensor shapes: names the tensor and both shapes.
    let mut t = fresh();
    set(&mut t.builder, "llama.feed_forward_length", V::U32(128));
    let e = must_fail(dir.path(), "ff.gguf", &t.builder.build().bytes);
    assert!(
        e.contains("ffn_gate") && e.contains("[96, 64]") && e.contains("[128, 64]"),
        "{e}"
    );

    // A missing tensor.
    let mut t = fresh();
    t.builder
        .tensors
        .retain(|x| x.name != "blk.1.ffn_up.weight");
    let e = must_fail(dir.path(), "missing.gguf", &t.builder.build().bytes);
    assert!(e.contains("blk.1.ffn_up.weight"), "{e}");

    // An unsupported quantization in the model.
    let mut t = fresh();
    let x = t
        .builder
        .tensors
        .iter_mut()
        .find(|x| x.name == "blk.0.ffn_down.weight")
        .unwrap();
    x.ty = 6; // Q5_0: 32 values in 22 bytes
    x.data = vec![0u8; (D * FF) / 32 * 22];
    let e = must_fail(dir.path(), "q5.gguf", &t.builder.build().bytes);
    assert!(
        e.contains("unsupported tensor type Q5_0") && e.contains("blk.0.ffn_down.weight"),
        "{e}"
    );

    // Other architectures and missing or wrong metadata.
    let mut t = fresh();
    set(&mut t.builder, "general.architecture", s("mamba"));
    assert!(must_fail(dir.path(), "arch.gguf", &t.builder.build().bytes).contains("mamba"));
    let mut t = fresh();
    t.builder.kv.retain(|(k, _)| k != "llama.block_count");
    assert!(
        must_fail(dir.path(), "nolayers.gguf", &t.builder.build().bytes)
            .contains("llama.block_count")
    );
    let mut t = fresh();
    set(&mut t.builder, "llama.attention.head_count", V::U32(5));
    must_fail(dir.path(), "heads.gguf", &t.builder.build().bytes);
    let mut t = fresh();
    set(&mut t.builder, "llama.embedding_length", s("sixty-four"));
    assert!(
        must_fail(dir.path(), "strdim.gguf", &t.builder.build().bytes).contains("embedding_length")
    );
    let mut t = fresh();
    t.builder.kv.push(("general.name".into(), s("again")));
    assert!(must_fail(dir.path(), "dupkey.gguf", &t.builder.build().bytes).contains("duplicate"));
    let mut t = fresh();
    let copy = t
        .builder
        .tensors
        .iter()
        .find(|x| x.name == "blk.0.attn_norm.weight")
        .map(|x| Tensor {
            name: x.name.clone(),
            dims: x.dims.clone(),
            ty: x.ty,
            data: x.data.clone(),
        })
        .unwrap();
    t.builder.tensors.push(copy);
    assert!(
        must_fail(dir.path(), "duptensor.gguf", &t.builder.build().bytes).contains("duplicate")
    );
    let mut t = fresh();
    t.builder.kv.push(("general.alignment".into(), V::U32(24)));
    assert!(must_fail(dir.path(), "align.gguf", &t.builder.build().bytes).contains("alignment"));
    let mut t = fresh();
    t.builder.kv.push(("general.alignment".into(), V::U32(0)));
    must_fail(dir.path(), "align0.gguf", &t.builder.build().bytes);
    // Deeply nested arrays.
    let mut t = fresh();
    let mut v = V::Arr(4, vec![V::U32(1)]);
    for _ in 0..40 {
        v = V::Arr(9, vec![v]);
    }
    t.builder.kv.push(("test.deep".into(), v));
    assert!(must_fail(dir.path(), "deep.gguf", &t.builder.build().bytes).contains("nested"));
    // Tokenizer problems: token ids out of range, merges naming unknown tokens, wrong model.
    let mut t = fresh();
    set(
        &mut t.builder,
        "tokenizer.ggml.eos_token_id",
        V::U32(100_000),
    );
    assert!(must_fail(dir.path(), "eos.gguf", &t.builder.build().bytes).contains("100000"));
    let mut t = fresh();
    set(
        &mut t.builder,
        "tokenizer.ggml.merges",
        V::Arr(8, vec![s("zz qq")]),
    );
    must_fail(dir.path(), "merges.gguf", &t.builder.build().bytes);
    let mut t = fresh();
    set(&mut t.builder, "tokenizer.ggml.model", s("llama"));
    assert!(must_fail(dir.path(), "spm.gguf", &t.builder.build().bytes)
        .contains("tokenizer.ggml.model"));
    let mut t = fresh();
    set(
        &mut t.builder,
        "tokenizer.ggml.token_type",
        V::Arr(5, vec![V::I32(1)]),
    );
    assert!(must_fail(dir.path(), "types.gguf", &t.builder.build().bytes).contains("token_type"));
    // Empty and tiny files.
    must_fail(dir.path(), "empty.gguf", b"");
    must_fail(dir.path(), "short.gguf", b"GGUF\x03\0\0\0");
}

// ---------------------------------------------------------------------------------------------
// HF safetensors directories.

/// Encodes values in a safetensors dtype.
fn st_bytes(dtype: safetensors::Dtype, v: &[f32]) -> (Vec<u8>, Vec<f32>) {
    use safetensors::Dtype;
    let mut bytes = Vec::new();
    let mut vals = Vec::new();
    for &x in v {
        match dtype {
            Dtype::F32 => {
                bytes.extend(x.to_le_bytes());
                vals.push(x);
            }
            Dtype::F16 => {
                let h = f16::from_f32(x);
                bytes.extend(h.to_bits().to_le_bytes());
                vals.push(h.to_f32());
            }
            Dtype::BF16 => {
                let h = bf16::from_f32(x);
                bytes.extend(h.to_bits().to_le_bytes());
                vals.push(h.to_f32());
            }
            _ => unreachable!(),
        }
    }
    (bytes, vals)
}

/// A tensor to save: name, shape, values (before rounding to the file's dtype).
type StTensor = (String, Vec<usize>, Vec<f32>);

/// Writes `tensors` into `dir` in `dtype`, in `shards` files (with an index when more than one).
/// Returns the values as stored (rounded to the dtype), by name.
fn write_safetensors(
    dir: &Path,
    tensors: &[StTensor],
    dtype: safetensors::Dtype,
    shards: usize,
) -> HashMap<String, Vec<f32>> {
    let mut stored = HashMap::new();
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, shape, v)| {
            let (b, vals) = st_bytes(dtype, v);
            stored.insert(n.clone(), vals);
            (n.clone(), shape.clone(), b)
        })
        .collect();
    let mut weight_map = serde_json::Map::new();
    for k in 0..shards {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", k + 1)
        };
        let views: Vec<(String, safetensors::tensor::TensorView)> = encoded
            .iter()
            .enumerate()
            .filter(|(i, _)| i % shards == k)
            .map(|(_, (n, shape, b))| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(dtype, shape.clone(), b).unwrap(),
                )
            })
            .collect();
        for (n, _) in &views {
            weight_map.insert(n.clone(), json!(file));
        }
        std::fs::write(
            dir.join(&file),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
    }
    if shards > 1 {
        let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
    stored
}

fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// A word-level tokenizer.json over `words` (ids in order), with BOS `<s>` added by the
/// post-processor when `bos` is set.
fn write_tokenizer_json(dir: &Path, words: &[&str], bos: bool) {
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), json!(i)))
        .collect();
    let post = if bos {
        json!({"type": "TemplateProcessing",
               "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
               "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
               "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}})
    } else {
        serde_json::Value::Null
    };
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": post, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

const WORDS: [&str; 6] = ["[UNK]", "<s>", "</s>", "hello", "world", "again"];

// Tiny GPT-2: d 8, 2 heads, 2 layers, vocab 20, 16 positions, n_inner null → 32.
const GD: usize = 8;
const GFF: usize = 32;
const GV: usize = 20;
const GP: usize = 16;

fn gpt2_tensors(rng: &mut StdRng, prefix: &str, vocab: usize) -> Vec<StTensor> {
    let mut t: Vec<StTensor> = vec![
        (
            format!("{prefix}wte.weight"),
            vec![vocab, GD],
            random(rng, vocab * GD),
        ),
        (
            format!("{prefix}wpe.weight"),
            vec![GP, GD],
            random(rng, GP * GD),
        ),
        (format!("{prefix}ln_f.weight"), vec![GD], random(rng, GD)),
        (format!("{prefix}ln_f.bias"), vec![GD], random(rng, GD)),
    ];
    for l in 0..2 {
        let p = format!("{prefix}h.{l}.");
        for (n, shape) in [
            ("ln_1.weight", vec![GD]),
            ("ln_1.bias", vec![GD]),
            ("attn.c_attn.weight", vec![GD, 3 * GD]),
            ("attn.c_attn.bias", vec![3 * GD]),
            ("attn.c_proj.weight", vec![GD, GD]),
            ("attn.c_proj.bias", vec![GD]),
            ("ln_2.weight", vec![GD]),
            ("ln_2.bias", vec![GD]),
            ("mlp.c_fc.weight", vec![GD, GFF]),
            ("mlp.c_fc.bias", vec![GFF]),
            ("mlp.c_proj.weight", vec![GFF, GD]),
            ("mlp.c_proj.bias", vec![GD]),
        ] {
            let n_el = shape.iter().product();
            t.push((format!("{p}{n}"), shape, random(rng, n_el)));
        }
    }
    t
}

fn gpt2_config(vocab: usize) -> serde_json::Value {
    json!({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": GD, "n_layer": 2, "n_head": 2,
           "n_positions": GP, "n_inner": null, "layer_norm_epsilon": 1e-5, "vocab_size": vocab,
           "bos_token_id": 2, "eos_token_id": 2})
}

/// Column `c` of the `[rows, cols]` matrix `m` … as a row: the `[out, in]` view of a Conv1D weight.
fn conv1d_rows(w: &[f32], n_in: usize, n_out: usize, out_from: usize, out_to: usize) -> Vec<f32> {
    let mut v = Vec::new();
    for o in out_from..out_to {
        for i in 0..n_in {
            v.push(w[i * n_out + o]);
        }
    }
    v
}

fn check_gpt2(w: &ModelWeights<f32>, st: &HashMap<String, Vec<f32>>, prefix: &str) {
    let g = |n: &str| st[&format!("{prefix}{n}")].as_slice();
    let c = &w.config;
    assert_eq!(c.arch, Arch::Gpt2);
    assert_eq!(
        (
            c.d_model,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.d_ff,
            c.max_positions
        ),
        (GD, 2, 2, 2, 4, GFF, GP)
    );
    assert!(c.tied_embeddings && w.lm_head.is_none());
    check_close("wte", &w.tok_emb, g("wte.weight"));
    check_close("wpe", w.pos_emb.as_deref().unwrap(), g("wpe.weight"));
    check_close("ln_f", &w.final_norm_w, g("ln_f.weight"));
    check_close("ln_f.b", w.final_norm_b.as_deref().unwrap(), g("ln_f.bias"));
    for (l, lw) in w.layers.iter().enumerate() {
        let n = |s: &str| format!("h.{l}.{s}");
        let qkv = g(&n("attn.c_attn.weight"));
        check_close("wq", &lw.wq, &conv1d_rows(qkv, GD, 3 * GD, 0, GD));
        check_close("wk", &lw.wk, &conv1d_rows(qkv, GD, 3 * GD, GD, 2 * GD));
        check_close("wv", &lw.wv, &conv1d_rows(qkv, GD, 3 * GD, 2 * GD, 3 * GD));
        let b = g(&n("attn.c_attn.bias"));
        check_close("bq", lw.bq.as_deref().unwrap(), &b[..GD]);
        check_close("bk", lw.bk.as_deref().unwrap(), &b[GD..2 * GD]);
        check_close("bv", lw.bv.as_deref().unwrap(), &b[2 * GD..]);
        check_close(
            "wo",
            &lw.wo,
            &conv1d_rows(g(&n("attn.c_proj.weight")), GD, GD, 0, GD),
        );
        check_close("bo", lw.bo.as_deref().unwrap(), g(&n("attn.c_proj.bias")));
        check_close("ln_1", &lw.attn_norm_w, g(&n("ln_1.weight")));
        check_close(
            "ln_1.b",
            lw.attn_norm_b.as_deref().unwrap(),
            g(&n("ln_1.bias")),
        );
        check_close("ln_2", &lw.mlp_norm_w, g(&n("ln_2.weight")));
        check_close(
            "ln_2.b",
            lw.mlp_norm_b.as_deref().unwrap(),
            g(&n("ln_2.bias")),
        );
        check_close(
            "c_fc",
            &lw.w_in,
            &conv1d_rows(g(&n("mlp.c_fc.weight")), GD, GFF, 0, GFF),
        );
        check_close(
            "c_fc.b",
            lw.b_in.as_deref().unwrap(),
            g(&n("mlp.c_fc.bias")),
        );
        check_close(
            "mlp.c_proj",
            &lw.w_out,
            &conv1d_rows(g(&n("mlp.c_proj.weight")), GFF, GD, 0, GD),
        );
        check_close(
            "mlp.c_proj.b",
            lw.b_out.as_deref().unwrap(),
            g(&n("mlp.c_proj.bias")),
        );
        assert!(lw.w_up.is_none());
    }
}

#[test]
fn hf_gpt2_dirs_in_every_dtype_and_sharded() {
    use safetensors::Dtype;
    let mut rng = StdRng::seed_from_u64(31);
    for (dtype, shards, prefix) in [
        (Dtype::F32, 1, "transformer."),
        (Dtype::F16, 1, ""),
        (Dtype::BF16, 1, "transformer."),
        (Dtype::F32, 3, "transformer."),
        (Dtype::BF16, 2, ""),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), gpt2_config(GV).to_string()).unwrap();
        write_tokenizer_json(dir.path(), &WORDS, false);
        let tensors = gpt2_tensors(&mut rng, prefix, GV);
        let st = write_safetensors(dir.path(), &tensors, dtype, shards);
        let m = load_model(dir.path()).unwrap_or_else(|e| panic!("{dtype:?} x{shards}: {e:#}"));
        check_gpt2(&m.weights, &st, prefix);
        assert_eq!(
            m.tokenizer.encode("hello world again").unwrap(),
            vec![3, 4, 5]
        );
        assert!(!m.tokenizer.add_bos());
        assert_eq!(m.weights.config.eos_token_ids, vec![2]);
        assert_eq!(m.source, dir.path());
    }
}

#[test]
fn hf_gpt2_without_tokenizer_json_uses_r50k() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(37);
    std::fs::write(
        dir.path().join("config.json"),
        gpt2_config(50257).to_string(),
    )
    .unwrap();
    let st = write_safetensors(
        dir.path(),
        &gpt2_tensors(&mut rng, "transformer.", 50257),
        safetensors::Dtype::F16,
        1,
    );
    let m = load_model(dir.path()).unwrap();
    check_gpt2(&m.weights, &st, "transformer.");
    let t = &m.tokenizer;
    // GPT-2's ids for "Hello world" and its end-of-text token.
    assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
    assert_eq!(t.encode("<|endoftext|>").unwrap(), vec![50256]);
    assert_eq!(t.eos_token_ids(), &[50256]);
    assert_eq!(t.vocab_size(), 50257);
    assert_eq!(t.decode(&[15496, 995]).unwrap(), "Hello world");
    assert!(t.decode(&[50257]).is_err());
}

// Tiny Llama: d 16, 4 heads of 4, 2 kv heads, ff 24, 2 layers, vocab 20.
const LD: usize = 16;
const LQ: usize = 16;
const LKV: usize = 8;
const LFF: usize = 24;

fn llama_tensors(rng: &mut StdRng, with_head: bool) -> Vec<StTensor> {
    let mut t: Vec<StTensor> = vec![
        (
            "model.embed_tokens.weight".into(),
            vec![GV, LD],
            random(rng, GV * LD),
        ),
        ("model.norm.weight".into(), vec![LD], random(rng, LD)),
    ];
    if with_head {
        t.push(("lm_head.weight".into(), vec![GV, LD], random(rng, GV * LD)));
    }
    for l in 0..2 {
        let p = format!("model.layers.{l}.");
        for (n, shape) in [
            ("input_layernorm.weight", vec![LD]),
            ("self_attn.q_proj.weight", vec![LQ, LD]),
            ("self_attn.k_proj.weight", vec![LKV, LD]),
            ("self_attn.v_proj.weight", vec![LKV, LD]),
            ("self_attn.o_proj.weight", vec![LD, LQ]),
            ("post_attention_layernorm.weight", vec![LD]),
            ("mlp.gate_proj.weight", vec![LFF, LD]),
            ("mlp.up_proj.weight", vec![LFF, LD]),
            ("mlp.down_proj.weight", vec![LD, LFF]),
        ] {
            let n_el = shape.iter().product();
            t.push((format!("{p}{n}"), shape, random(rng, n_el)));
        }
    }
    t
}

fn llama_config(tie: bool, rope_in_parameters: bool) -> serde_json::Value {
    let mut c = json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": LD,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": LFF,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 64, "tie_word_embeddings": tie, "vocab_size": GV,
        "bos_token_id": 1, "eos_token_id": [2, 0]});
    if rope_in_parameters {
        c["rope_parameters"] = json!({"rope_theta": 25000.0, "rope_type": "default"});
    } else {
        c["rope_theta"] = json!(25000.0);
    }
    c
}

#[test]
fn hf_llama_dirs_tied_untied_sharded() {
    use safetensors::Dtype;
    let mut rng = StdRng::seed_from_u64(41);
    for (dtype, shards, with_head, tie, rope_params) in [
        (Dtype::F32, 1, true, false, true),
        (Dtype::BF16, 2, true, false, false),
        (Dtype::F16, 1, false, false, true),
        (Dtype::F32, 3, true, true, false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            llama_config(tie, rope_params).to_string(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("generation_config.json"),
            json!({"eos_token_id": 2, "bos_token_id": 1}).to_string(),
        )
        .unwrap();
        write_tokenizer_json(dir.path(), &WORDS, true);
        let st = write_safetensors(
            dir.path(),
            &llama_tensors(&mut rng, with_head),
            dtype,
            shards,
        );
        let m = load_model(dir.path()).unwrap_or_else(|e| panic!("{dtype:?}: {e:#}"));
        let (w, c) = (&m.weights, &m.weights.config);
        assert_eq!(c.arch, Arch::Llama);
        assert_eq!(
            (
                c.d_model,
                c.n_heads,
                c.n_kv_heads,
                c.head_dim,
                c.d_ff,
                c.vocab_size
            ),
            (LD, 4, 2, 4, LFF, GV)
        );
        assert_eq!(c.rope_theta, 25000.0);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(c.bos_token_id, Some(1));
        let g = |n: &str| st[n].as_slice();
        check_close("embed", &w.tok_emb, g("model.embed_tokens.weight"));
        check_close("norm", &w.final_norm_w, g("model.norm.weight"));
        let untied = with_head && !tie;
        assert_eq!(c.tied_embeddings, !untied);
        match &w.lm_head {
            Some(h) => {
                assert!(untied);
                check_close("lm_head", h, g("lm_head.weight"));
            }
            None => assert!(!untied),
        }
        for (l, lw) in w.layers.iter().enumerate() {
            let n = |s: &str| format!("model.layers.{l}.{s}");
            check_close("q", &lw.wq, g(&n("self_attn.q_proj.weight")));
            check_close("k", &lw.wk, g(&n("self_attn.k_proj.weight")));
            check_close("v", &lw.wv, g(&n("self_attn.v_proj.weight")));
            check_close("o", &lw.wo, g(&n("self_attn.o_proj.weight")));
            check_close("in_norm", &lw.attn_norm_w, g(&n("input_layernorm.weight")));
            check_close(
                "post_norm",
                &lw.mlp_norm_w,
                g(&n("post_attention_layernorm.weight")),
            );
            check_close("gate", &lw.w_in, g(&n("mlp.gate_proj.weight")));
            check_close(
                "up",
                lw.w_up.as_deref().unwrap(),
                g(&n("mlp.up_proj.weight")),
            );
            check_close("down", &lw.w_out, g(&n("mlp.down_proj.weight")));
        }
        // The post-processor adds <s>: add_bos says so, encode leaves it out.
        assert!(m.tokenizer.add_bos());
        assert_eq!(m.tokenizer.bos_token_id(), Some(1));
        assert_eq!(m.tokenizer.encode("hello again").unwrap(), vec![3, 5]);
    }
}

#[test]
fn hf_fingerprint_ignores_format_but_not_values() {
    use safetensors::Dtype;
    // The same values (exact in bf16) stored as F32 and BF16, one file or sharded: same fingerprint.
    let mut rng = StdRng::seed_from_u64(43);
    let tensors: Vec<StTensor> = llama_tensors(&mut rng, true)
        .into_iter()
        .map(|(n, s, v)| {
            (
                n,
                s,
                v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect(),
            )
        })
        .collect();
    let mut prints = Vec::new();
    for (dtype, shards) in [(Dtype::F32, 1), (Dtype::BF16, 2)] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            llama_config(false, true).to_string(),
        )
        .unwrap();
        write_tokenizer_json(dir.path(), &WORDS, false);
        write_safetensors(dir.path(), &tensors, dtype, shards);
        prints.push(load_model(dir.path()).unwrap().fingerprint);
    }
    assert_eq!(prints[0], prints[1]);
    let mut changed = tensors.clone();
    changed[3].2[5] += 0.5;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        llama_config(false, true).to_string(),
    )
    .unwrap();
    write_tokenizer_json(dir.path(), &WORDS, false);
    write_safetensors(dir.path(), &changed, Dtype::F32, 1);
    assert_ne!(load_model(dir.path()).unwrap().fingerprint, prints[0]);
}

// ---------------------------------------------------------------------------------------------
// Malformed HF directories.

/// Loads the directory under `catch_unwind`; it must fail naming `needle_file` (a file or the
/// directory). Returns the message.
fn dir_must_fail(dir: &Path, needle_file: &str) -> String {
    let r = catch_unwind(AssertUnwindSafe(|| load_model(dir)))
        .unwrap_or_else(|_| panic!("the loader panicked on {}", dir.display()));
    let e = format!("{:#}", r.err().expect("malformed directory accepted"));
    assert!(
        e.contains(needle_file),
        "error does not name {needle_file}: {e}"
    );
    e
}

fn good_llama_dir(seed: u64, shards: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        llama_config(false, true).to_string(),
    )
    .unwrap();
    write_tokenizer_json(dir.path(), &WORDS, false);
    let mut rng = StdRng::seed_from_u64(seed);
    write_safetensors(
        dir.path(),
        &llama_tensors(&mut rng, true),
        safetensors::Dtype::F32,
        shards,
    );
    load_model(dir.path()).expect("the unmodified directory loads");
    dir
}

#[test]
fn hf_truncated_and_corrupt_safetensors_are_refused() {
    let dir = good_llama_dir(51, 1);
    let file = dir.path().join("model.safetensors");
    let good = std::fs::read(&file).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut cuts: Vec<usize> = (0..header_len + 8 + 16).step_by(7).collect();
    cuts.extend((header_len + 8..good.len()).step_by(211));
    cuts.push(good.len() - 1);
    for cut in cuts {
        std::fs::write(&file, &good[..cut]).unwrap();
        dir_must_fail(dir.path(), "model.safetensors");
    }
    // Huge header length, garbage header, an extra byte at the end.
    for v in [u64::MAX, 1 << 40, good.len() as u64] {
        let mut b = good.clone();
        b[..8].copy_from_slice(&v.to_le_bytes());
        std::fs::write(&file, &b).unwrap();
        dir_must_fail(dir.path(), "model.safetensors");
    }
    let mut b = good.clone();
    b[8..12].copy_from_slice(b"!!!!");
    std::fs::write(&file, &b).unwrap();
    dir_must_fail(dir.path(), "model.safetensors");
    let mut b = good.clone();
    b.push(0);
    std::fs::write(&file, &b).unwrap();
    dir_must_fail(dir.path(), "model.safetensors");
    // Offsets past the end of the data: rewrite one tensor's end offset in the JSON header.
    let header = std::str::from_utf8(&good[8..8 + header_len]).unwrap();
    let mut h: serde_json::Value = serde_json::from_str(header).unwrap();
    h["model.norm.weight"]["data_offsets"][1] = json!(1u64 << 40);
    let hs = h.to_string();
    let mut b = (hs.len() as u64).to_le_bytes().to_vec();
    b.extend(hs.as_bytes());
    b.extend(&good[8 + header_len..]);
    std::fs::write(&file, &b).unwrap();
    dir_must_fail(dir.path(), "model.safetensors");
}

#[test]
fn hf_inconsistent_directories_are_refused() {
    // config.json disagreeing with a tensor shape: names config.json, the tensor and both shapes.
    let dir = good_llama_dir(53, 1);
    let mut c = llama_config(false, true);
    c["intermediate_size"] = json!(40);
    std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
    let e = dir_must_fail(dir.path(), "config.json");
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight")
            && e.contains("[24, 16]")
            && e.contains("[40, 16]"),
        "{e}"
    );

    // A missing tensor.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        llama_config(false, true).to_string(),
    )
    .unwrap();
    write_tokenizer_json(dir.path(), &WORDS, false);
    let mut rng = StdRng::seed_from_u64(55);
    let mut t = llama_tensors(&mut rng, true);
    t.retain(|(n, _, _)| n != "model.layers.1.self_attn.v_proj.weight");
    write_safetensors(dir.path(), &t, safetensors::Dtype::F32, 1);
    let e = dir_must_fail(dir.path(), &dir.path().display().to_string());
    assert!(e.contains("model.layers.1.self_attn.v_proj.weight"), "{e}");

    // An unsupported dtype.
    let dir = good_llama_dir(57, 1);
    let ints: Vec<u8> = vec![0u8; LD * 8];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![LD], &ints).unwrap();
    let mut rng = StdRng::seed_from_u64(57);
    let t = llama_tensors(&mut rng, true);
    let enc: Vec<(String, Vec<usize>, Vec<u8>)> = t
        .iter()
        .filter(|(n, _, _)| n != "model.norm.weight")
        .map(|(n, s, v)| (n.clone(), s.clone(), st_bytes(safetensors::Dtype::F32, v).0))
        .collect();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = enc
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    views.push(("model.norm.weight".into(), view));
    std::fs::write(
        dir.path().join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let e = dir_must_fail(dir.path(), "model.safetensors");
    assert!(e.contains("model.norm.weight") && e.contains("I64"), "{e}");

    // Bad config.json: invalid JSON, unknown model type, wrong value types, missing keys.
    for (bad, needle) in [
        ("{not json", "config.json"),
        (r#"{"model_type": "bert"}"#, "bert"),
        (
            r#"{"model_type": "llama", "hidden_size": "big"}"#,
            "hidden_size",
        ),
        (
            r#"{"model_type": "llama", "hidden_size": 16}"#,
            "num_attention_heads",
        ),
        (
            r#"{"model_type": "gpt2", "n_embd": 8, "n_head": 3, "n_layer": 1, "n_positions": 4, "vocab_size": 20}"#,
            "n_head",
        ),
    ] {
        let dir = good_llama_dir(59, 1);
        std::fs::write(dir.path().join("config.json"), bad).unwrap();
        let e = dir_must_fail(dir.path(), "config.json");
        assert!(e.contains(needle), "{bad}: {e}");
    }

    // Absurd sizes are refused before anything is allocated from them.
    for (key, v) in [
        ("vocab_size", json!(1u64 << 30)),
        ("num_hidden_layers", json!(1u64 << 40)),
        ("intermediate_size", json!(0)),
    ] {
        let dir = good_llama_dir(60, 1);
        let mut c = llama_config(false, true);
        c[key] = v;
        std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
        let e = dir_must_fail(dir.path(), "config.json");
        assert!(e.contains(key) || e.contains("vocab_size"), "{key}: {e}");
    }

    // Sharded: a missing shard, a shard name escaping the directory, an index without weight_map.
    let dir = good_llama_dir(61, 2);
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    dir_must_fail(dir.path(), "model-00002-of-00002.safetensors");
    let dir = good_llama_dir(63, 2);
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        json!({"weight_map": {"model.norm.weight": "../evil.safetensors"}}).to_string(),
    )
    .unwrap();
    dir_must_fail(dir.path(), "model.safetensors.index.json");
    std::fs::write(dir.path().join("model.safetensors.index.json"), "{}").unwrap();
    dir_must_fail(dir.path(), "model.safetensors.index.json");

    // No weights at all, a broken tokenizer.json, and a path that does not exist.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        llama_config(false, true).to_string(),
    )
    .unwrap();
    dir_must_fail(dir.path(), &dir.path().display().to_string());
    let dir = good_llama_dir(65, 1);
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 5}").unwrap();
    dir_must_fail(dir.path(), "tokenizer.json");
    dir_must_fail(&dir.path().join("nope"), "nope");
}

#[test]
fn transformers_saved_fixture_dirs_load() {
    // Directories written by transformers' save_pretrained (tools/oracle/make_fixtures.py).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for (name, arch, tied) in [
        ("gpt2_tiny", Arch::Gpt2, true),
        ("llama_tiny", Arch::Llama, false),
    ] {
        let dir = root.join(name);
        if !dir.join("config.json").is_file() {
            eprintln!("SKIPPED: {} absent", dir.display());
            continue;
        }
        let m = load_model(&dir).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let c = &m.weights.config;
        assert_eq!(c.arch, arch, "{name}");
        assert_eq!((c.d_model, c.vocab_size, c.n_layers), (48, 97, 2), "{name}");
        assert_eq!(c.tied_embeddings, tied, "{name}");
        assert_eq!(m.weights.lm_head.is_none(), tied, "{name}");
        if arch == Arch::Llama {
            assert_eq!(
                (c.n_heads, c.n_kv_heads, c.head_dim, c.rope_theta),
                (6, 2, 8, 25000.0)
            );
        }
        assert!(
            m.weights.tok_emb.iter().all(|x| x.is_finite())
                && m.weights.tok_emb.iter().any(|&x| x != 0.0)
        );
        assert!(m.tokenizer.vocab_size() <= c.vocab_size);
        let ids = m.tokenizer.encode("hello world").unwrap();
        assert!(
            !ids.is_empty() && ids.iter().all(|&i| (i as usize) < c.vocab_size),
            "{name}: {ids:?}"
        );
    }
}
