//! HF model directories: `config.json` (+ `generation_config.json`), `model.safetensors` or
//! `model.safetensors.index.json` shards, and the tokenizer (`tokenizer.json`, or r50k for GPT-2).
//!
//! Tensors in F32/F16/BF16 are converted to f32 and rearranged into [`ModelWeights`]' layout:
//! GPT-2's `Conv1D` weights (`[in, out]`) are transposed and the fused `c_attn` is split into q/k/v.
//! Every tensor's shape is checked against `config.json` before it is converted; a disagreement is
//! an error naming the file, the tensor and both shapes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::bytes::FileBytes;
use super::config::{Arch, LayerWeights, ModelConfig, ModelWeights};
use super::tokenizer::Tokenizer;

struct Shard {
    path: PathBuf,
    map: FileBytes,
    /// Start of the data section (8 + header length).
    data_start: usize,
    meta: Metadata,
}

/// The safetensors files of one HF directory, indexed by tensor name.
pub struct SafetensorsSet {
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let map = FileBytes::map(&file).with_context(|| format!("mapping {}", path.display()))?;
    parse_shard(path, map)
}

/// The header (tensor table) of one safetensors file; `path` names it in errors.
fn parse_shard(path: &Path, map: FileBytes) -> Result<Shard> {
    let (n, meta) = SafeTensors::read_metadata(&map)
        .map_err(|e| anyhow!("{}: malformed safetensors file: {e}", path.display()))?;
    let data_start = 8usize
        .checked_add(n)
        .ok_or_else(|| anyhow!("{}: header length overflows", path.display()))?;
    Ok(Shard {
        path: path.to_path_buf(),
        map,
        data_start,
        meta,
    })
}

impl SafetensorsSet {
    /// `model.safetensors`, or the shards listed by `model.safetensors.index.json`, in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("reading {}", index_path.display()))?;
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", index_path.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{}: no 'weight_map' object", index_path.display()))?;
            let mut names: Vec<&str> = Vec::new();
            for (tensor, f) in map {
                let f = f.as_str().ok_or_else(|| {
                    anyhow!(
                        "{}: weight_map entry for '{tensor}' is not a string",
                        index_path.display()
                    )
                })?;
                let plain = Path::new(f)
                    .file_name()
                    .map(|n| n == std::ffi::OsStr::new(f))
                    .unwrap_or(false);
                if !plain || f == ".." || f == "." {
                    bail!(
                        "{}: shard name '{f}' is not a plain file name in the directory",
                        index_path.display()
                    );
                }
                if !names.contains(&f) {
                    names.push(f);
                }
            }
            names.sort_unstable();
            names.into_iter().map(|f| dir.join(f)).collect()
        } else {
            bail!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            );
        };
        let shards = files
            .iter()
            .map(|f| open_shard(f))
            .collect::<Result<Vec<_>>>()?;
        Self::index(shards)
    }

    /// The safetensors files given as `(path, bytes)` (bytes in memory or mapped); the paths
    /// name them in errors. What [`SafetensorsSet::open_dir`] does after reading the files.
    pub fn from_bytes(files: Vec<(PathBuf, FileBytes)>) -> Result<Self> {
        let shards = files
            .into_iter()
            .map(|(p, b)| parse_shard(&p, b))
            .collect::<Result<Vec<_>>>()?;
        Self::index(shards)
    }

    fn index(shards: Vec<Shard>) -> Result<Self> {
        let mut index = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            for name in shard.meta.tensors().keys() {
                if index.insert(name.clone(), i).is_some() {
                    bail!(
                        "{}: tensor '{name}' appears in more than one shard",
                        shard.path.display()
                    );
                }
            }
        }
        Ok(SafetensorsSet { shards, index })
    }

    /// The names of every tensor, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Shape and file of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<(Vec<usize>, &Path)> {
        let s = &self.shards[*self.index.get(name)?];
        Some((s.meta.info(name)?.shape.clone(), &s.path))
    }

    /// A tensor as f32 (F32/F16/BF16 accepted), or `None` if absent.
    pub fn get_f32(&self, name: &str) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        let Some(&si) = self.index.get(name) else {
            return Ok(None);
        };
        let s = &self.shards[si];
        let info = s
            .meta
            .info(name)
            .ok_or_else(|| anyhow!("{}: tensor '{name}' vanished", s.path.display()))?;
        let (a, b) = info.data_offsets;
        // read_metadata checked that the offsets tile the data section, which ends at the file's end.
        let bytes = s
            .data_start
            .checked_add(a)
            .zip(s.data_start.checked_add(b))
            .and_then(|(a, b)| s.map.get(a..b))
            .ok_or_else(|| {
                anyhow!(
                    "{}: tensor '{name}' data lies outside the file",
                    s.path.display()
                )
            })?;
        let out: Vec<f32> = match info.dtype {
            Dtype::F32 => bytes
                .par_chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .par_chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .par_chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            other => bail!(
                "{}: tensor '{name}' has unsupported dtype {other:?} (supported: F32, F16, BF16)",
                s.path.display()
            ),
        };
        Ok(Some((out, info.shape.clone())))
    }

    /// The first present name among `names`, its data checked to have `shape`.
    fn expect(&self, names: &[String], shape: &[usize], dir: &Path) -> Result<Vec<f32>> {
        for n in names {
            if let Some((found, path)) = self.shape(n) {
                if found != shape {
                    bail!(
                        "{}: tensor '{n}' has shape {found:?} but config.json implies {shape:?} (in {})",
                        path.display(),
                        dir.join("config.json").display()
                    );
                }
                return Ok(self.get_f32(n)?.expect("present").0);
            }
        }
        bail!(
            "{}: missing tensor '{}'",
            dir.display(),
            names.join("' / '")
        )
    }
}

/// Transpose a row-major `[rows, cols]` matrix.
fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; w.len()];
    out.par_chunks_mut(rows.max(1))
        .enumerate()
        .for_each(|(c, dst)| {
            for (r, x) in dst.iter_mut().enumerate() {
                *x = w[r * cols + c];
            }
        });
    out
}

/// Reads typed keys of `config.json`, naming the file in errors.
struct Cfg<'a> {
    v: &'a Value,
    file: String,
}

impl Cfg<'_> {
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => match x.as_u64() {
                Some(n) if n > 0 && n <= 1 << 32 => Ok(Some(n as usize)),
                _ => bail!(
                    "{}: '{key}' should be a positive integer, found {x}",
                    self.file
                ),
            },
        }
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| anyhow!("{}: missing '{key}'", self.file))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| anyhow!("{}: '{key}' should be a number, found {x}", self.file)),
        }
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_bool()
                .map(Some)
                .ok_or_else(|| anyhow!("{}: '{key}' should be a boolean, found {x}", self.file)),
        }
    }
    /// A token id or a list of them.
    fn ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = || {
            anyhow!(
                "{}: '{key}' should be a token id or a list of them",
                self.file
            )
        };
        let one = |x: &Value| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(bad)
        };
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(a)) => a.iter().map(one).collect(),
            Some(x) => Ok(vec![one(x)?]),
        }
    }
}

fn parse_json(path: &Path, bytes: &[u8]) -> Result<Value> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.valid_up_to()
        )
    })?;
    serde_json::from_str(text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// The model configuration from `config.json` (and `generation_config.json` for EOS ids).
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let gen_path = dir.join("generation_config.json");
    let gen = if gen_path.is_file() {
        let g =
            std::fs::read(&gen_path).with_context(|| format!("reading {}", gen_path.display()))?;
        Some((gen_path, g))
    } else {
        None
    };
    parse_config(
        &path,
        &text,
        gen.as_ref().map(|(p, b)| (p.as_path(), b.as_slice())),
    )
}

/// [`read_config`] on the files' bytes: `config.json` at `path`, and `generation_config.json`
/// when there is one; the paths name the files in errors.
pub fn parse_config(
    path: &Path,
    bytes: &[u8],
    generation: Option<(&Path, &[u8])>,
) -> Result<ModelConfig> {
    let v = parse_json(path, bytes)?;
    let c = Cfg {
        v: &v,
        file: path.display().to_string(),
    };
    let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
    let archs: Vec<&str> = v
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    let arch = if model_type == "gpt2" || archs.contains(&"GPT2LMHeadModel") {
        Arch::Gpt2
    } else if model_type == "llama" || archs.contains(&"LlamaForCausalLM") {
        Arch::Llama
    } else {
        bail!("{}: unsupported model_type '{model_type}' / architectures {archs:?} (supported: gpt2, llama)", c.file);
    };
    let mut eos = Vec::new();
    let mut bos = None;
    if let Some((gen_path, gen_bytes)) = generation {
        let g = parse_json(gen_path, gen_bytes)?;
        let gc = Cfg {
            v: &g,
            file: gen_path.display().to_string(),
        };
        eos = gc.ids("eos_token_id")?;
        bos = gc.ids("bos_token_id")?.first().copied();
    }
    if eos.is_empty() {
        eos = c.ids("eos_token_id")?;
    }
    let bos = bos.or(c.ids("bos_token_id")?.first().copied());
    let cfg = match arch {
        Arch::Gpt2 => {
            let d = c.usize("n_embd")?;
            let n_heads = c.usize("n_head")?;
            if d % n_heads != 0 {
                bail!(
                    "{}: n_embd {d} is not a multiple of n_head {n_heads}",
                    c.file
                );
            }
            ModelConfig {
                arch,
                vocab_size: c.usize("vocab_size")?,
                d_model: d,
                n_layers: c.usize("n_layer")?,
                n_heads,
                n_kv_heads: n_heads,
                head_dim: d / n_heads,
                d_ff: c.opt_usize("n_inner")?.unwrap_or(4 * d),
                max_positions: c.usize("n_positions")?,
                norm_eps: c.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5),
                rope_theta: 0.0,
                tied_embeddings: c.opt_bool("tie_word_embeddings")?.unwrap_or(true),
                bos_token_id: bos.or(Some(50256)),
                eos_token_ids: if eos.is_empty() { vec![50256] } else { eos },
            }
        }
        Arch::Llama => {
            let d = c.usize("hidden_size")?;
            let n_heads = c.usize("num_attention_heads")?;
            let n_kv_heads = c.opt_usize("num_key_value_heads")?.unwrap_or(n_heads);
            let head_dim = match c.opt_usize("head_dim")? {
                Some(h) => h,
                None if d % n_heads == 0 => d / n_heads,
                None => bail!(
                    "{}: hidden_size {d} is not a multiple of num_attention_heads {n_heads}",
                    c.file
                ),
            };
            if n_heads % n_kv_heads != 0 || head_dim % 2 != 0 {
                bail!("{}: num_attention_heads {n_heads}, num_key_value_heads {n_kv_heads}, head_dim {head_dim} are inconsistent", c.file);
            }
            let rope_theta = match c.opt_f64("rope_theta")? {
                Some(t) => t,
                None => {
                    let rp = v.get("rope_parameters").cloned().unwrap_or(Value::Null);
                    Cfg {
                        v: &rp,
                        file: format!("{} (rope_parameters)", c.file),
                    }
                    .opt_f64("rope_theta")?
                    .unwrap_or(10000.0)
                }
            };
            ModelConfig {
                arch,
                vocab_size: c.usize("vocab_size")?,
                d_model: d,
                n_layers: c.usize("num_hidden_layers")?,
                n_heads,
                n_kv_heads,
                head_dim,
                d_ff: c.usize("intermediate_size")?,
                max_positions: c.opt_usize("max_position_embeddings")?.unwrap_or(2048),
                norm_eps: c.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
                rope_theta,
                tied_embeddings: c.opt_bool("tie_word_embeddings")?.unwrap_or(false),
                bos_token_id: bos,
                eos_token_ids: eos,
            }
        }
    };
    super::load::check_config_sizes(&cfg, &c.file)?;
    Ok(cfg)
}

/// All weights of an HF directory in [`ModelWeights`]' layout.
pub fn load_hf_weights(dir: &Path) -> Result<ModelWeights<f32>> {
    let c = read_config(dir)?;
    let st = SafetensorsSet::open_dir(dir)?;
    hf_weights(c, &st, dir)
}

/// The weights `config` asks for, from `st`, every shape checked against the config (`dir` names
/// the model directory in errors). What [`load_hf_weights`] does after reading the files.
pub fn hf_weights(
    mut c: ModelConfig,
    st: &SafetensorsSet,
    dir: &Path,
) -> Result<ModelWeights<f32>> {
    match c.arch {
        Arch::Gpt2 => {
            let (d, ff) = (c.d_model, c.d_ff);
            // Names with and without the `transformer.` prefix.
            let n = |s: &str| vec![format!("transformer.{s}"), s.to_string()];
            let tok_emb = st.expect(&n("wte.weight"), &[c.vocab_size, d], dir)?;
            let pos_emb = st.expect(&n("wpe.weight"), &[c.max_positions, d], dir)?;
            let layers = (0..c.n_layers)
                .map(|i| -> Result<LayerWeights<f32>> {
                    let p = |s: &str| n(&format!("h.{i}.{s}"));
                    let qkv = transpose(
                        &st.expect(&p("attn.c_attn.weight"), &[d, 3 * d], dir)?,
                        d,
                        3 * d,
                    );
                    let bqkv = st.expect(&p("attn.c_attn.bias"), &[3 * d], dir)?;
                    let dd = d * d;
                    Ok(LayerWeights {
                        attn_norm_w: st.expect(&p("ln_1.weight"), &[d], dir)?,
                        attn_norm_b: Some(st.expect(&p("ln_1.bias"), &[d], dir)?),
                        wq: qkv[..dd].to_vec(),
                        wk: qkv[dd..2 * dd].to_vec(),
                        wv: qkv[2 * dd..].to_vec(),
                        bq: Some(bqkv[..d].to_vec()),
                        bk: Some(bqkv[d..2 * d].to_vec()),
                        bv: Some(bqkv[2 * d..].to_vec()),
                        wo: transpose(&st.expect(&p("attn.c_proj.weight"), &[d, d], dir)?, d, d),
                        bo: Some(st.expect(&p("attn.c_proj.bias"), &[d], dir)?),
                        mlp_norm_w: st.expect(&p("ln_2.weight"), &[d], dir)?,
                        mlp_norm_b: Some(st.expect(&p("ln_2.bias"), &[d], dir)?),
                        w_in: transpose(&st.expect(&p("mlp.c_fc.weight"), &[d, ff], dir)?, d, ff),
                        b_in: Some(st.expect(&p("mlp.c_fc.bias"), &[ff], dir)?),
                        w_up: None,
                        w_out: transpose(
                            &st.expect(&p("mlp.c_proj.weight"), &[ff, d], dir)?,
                            ff,
                            d,
                        ),
                        b_out: Some(st.expect(&p("mlp.c_proj.bias"), &[d], dir)?),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let final_norm_w = st.expect(&n("ln_f.weight"), &[d], dir)?;
            let final_norm_b = Some(st.expect(&n("ln_f.bias"), &[d], dir)?);
            let lm_head = if c.tied_embeddings || st.shape("lm_head.weight").is_none() {
                None
            } else {
                Some(st.expect(&["lm_head.weight".to_string()], &[c.vocab_size, d], dir)?)
            };
            c.tied_embeddings = lm_head.is_none();
            Ok(ModelWeights {
                config: c,
                tok_emb,
                pos_emb: Some(pos_emb),
                layers,
                final_norm_w,
                final_norm_b,
                lm_head,
            })
        }
        Arch::Llama => {
            let (d, q, kv, ff) = (c.d_model, c.q_dim(), c.kv_dim(), c.d_ff);
            let one = |s: String| vec![s];
            let tok_emb = st.expect(
                &one("model.embed_tokens.weight".into()),
                &[c.vocab_size, d],
                dir,
            )?;
            let layers = (0..c.n_layers)
                .map(|i| -> Result<LayerWeights<f32>> {
                    let p = |s: &str| one(format!("model.layers.{i}.{s}"));
                    Ok(LayerWeights {
                        attn_norm_w: st.expect(&p("input_layernorm.weight"), &[d], dir)?,
                        attn_norm_b: None,
                        wq: st.expect(&p("self_attn.q_proj.weight"), &[q, d], dir)?,
                        wk: st.expect(&p("self_attn.k_proj.weight"), &[kv, d], dir)?,
                        wv: st.expect(&p("self_attn.v_proj.weight"), &[kv, d], dir)?,
                        bq: None,
                        bk: None,
                        bv: None,
                        wo: st.expect(&p("self_attn.o_proj.weight"), &[d, q], dir)?,
                        bo: None,
                        mlp_norm_w: st.expect(&p("post_attention_layernorm.weight"), &[d], dir)?,
                        mlp_norm_b: None,
                        w_in: st.expect(&p("mlp.gate_proj.weight"), &[ff, d], dir)?,
                        b_in: None,
                        w_up: Some(st.expect(&p("mlp.up_proj.weight"), &[ff, d], dir)?),
                        w_out: st.expect(&p("mlp.down_proj.weight"), &[d, ff], dir)?,
                        b_out: None,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let final_norm_w = st.expect(&one("model.norm.weight".into()), &[d], dir)?;
            let lm_head = if c.tied_embeddings || st.shape("lm_head.weight").is_none() {
                None
            } else {
                Some(st.expect(&one("lm_head.weight".into()), &[c.vocab_size, d], dir)?)
            };
            c.tied_embeddings = lm_head.is_none();
            Ok(ModelWeights {
                config: c,
                tok_emb,
                pos_emb: None,
                layers,
                final_norm_w,
                final_norm_b: None,
                lm_head,
            })
        }
    }
}

/// The tokenizer of an HF directory: `tokenizer.json`, or r50k for a GPT-2 directory without one.
pub fn load_hf_tokenizer(dir: &Path, config: &ModelConfig) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if path.is_file() {
        Tokenizer::from_hf_file(&path, config.bos_token_id, &config.eos_token_ids)
    } else if config.arch == Arch::Gpt2 {
        Tokenizer::r50k()
    } else {
        bail!("{}: no tokenizer.json", dir.display())
    }
}
