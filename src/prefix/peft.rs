//! PEFT's prefix layout and PEFT adapter directories.
//!
//! One PEFT prefix is `prompt_embeddings` `[P, 2·L·kv_heads·head_dim]`. PEFT's `get_prompt` views
//! it as `[P, 2L, kv_heads, head_dim]` and permutes to `[2L, kv_heads, P, head_dim]`; slot `2l` is
//! layer `l`'s key, slot `2l+1` its value. So element `(p, s, h, d)` sits at
//! `p·(2L·kv_dim) + s·kv_dim + h·head_dim + d`, and lands in the bank at
//! `(s even ? k : v)[s/2][((i·kv_heads + h)·P + p)·head_dim + d]` for prefix `i`.
//! The mapping is a permutation, so the gradient of a PEFT tensor is the same mapping applied to
//! the bank gradient: `to_peft(&grad_bank, i)` is `d prompt_embeddings`.
//!
//! What PEFT 0.21.2 saves (checked by hand with the oracle venv: transformers 5.24, a tiny
//! 2-layer Llama with 2 KV heads of 8 dims, `PrefixTuningConfig(num_virtual_tokens=3)`,
//! `save_pretrained`):
//! - `adapter_config.json`: `auto_mapping: null, base_model_name_or_path: null,
//!   encoder_hidden_size: 16, inference_mode: true, init_weights: null, modules_to_save: null,
//!   num_attention_heads: 2` (the KV heads), `num_layers: 2, num_transformer_submodules: 1,
//!   num_virtual_tokens: 3, peft_type: "PREFIX_TUNING", peft_version: "0.21.2",
//!   prefix_projection: false, revision: null, task_type: "CAUSAL_LM", token_dim: 16`
//!   (= kv_heads·head_dim); plus a README.md;
//! - `adapter_model.safetensors`: header metadata `{"format": "pt"}` and a single f32 tensor
//!   named plain `prompt_embeddings` `[3, 64]`. With `prefix_projection: true` the file holds the
//!   same tensor: PEFT saves the MLP's output (`get_prompt_embedding_to_save`), not the MLP, so
//!   the import below reads both the same way. (PEFT's own MLP embeds `token_dim`, not d_model.)
//! - The layout above was checked against `get_prompt(batch_size=1)`'s `DynamicCache` element by
//!   element (tests/fixtures/peft_prefix, made by tools/oracle/peft_prefix_fixture.py, is such a
//!   PEFT-saved directory with PEFT's own per-layer keys/values). A directory written by
//!   [`export_peft_adapter`] was loaded with `PeftModel.from_pretrained` (that script's `--check`)
//!   and its `get_prompt` keys/values equalled the bank's exactly. Older PEFT versions may name the tensor with a `base_model.model.` prefix; any key
//!   ending in `prompt_embeddings` is accepted.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

use super::file::{tensor_to_f32, write_atomic};
use super::PrefixBank;
use crate::model::ModelConfig;
use crate::real::Real;

/// Width of one PEFT prefix row: `2 · n_layers · kv_heads · head_dim`.
pub fn peft_width(n_layers: usize, kv_heads: usize, head_dim: usize) -> usize {
    2 * n_layers * kv_heads * head_dim
}

/// Prefix `i` of `bank` as a PEFT tensor `[P, 2·L·kv_dim]` (also maps bank gradients to
/// `prompt_embeddings` gradients).
pub fn to_peft<T: Real>(bank: &PrefixBank<T>, i: usize) -> Vec<T> {
    assert!(
        i < bank.n_prefixes,
        "to_peft: prefix {i} of a bank with {}",
        bank.n_prefixes
    );
    let (h_n, p_n, d_n) = (bank.kv_heads, bank.len, bank.head_dim);
    let kv_dim = h_n * d_n;
    let width = peft_width(bank.n_layers, h_n, d_n);
    let mut out = vec![T::zero(); p_n * width];
    for l in 0..bank.n_layers {
        for (s, src) in [(2 * l, &bank.k[l]), (2 * l + 1, &bank.v[l])] {
            for h in 0..h_n {
                for p in 0..p_n {
                    let from = ((i * h_n + h) * p_n + p) * d_n;
                    let to = p * width + s * kv_dim + h * d_n;
                    out[to..to + d_n].copy_from_slice(&src[from..from + d_n]);
                }
            }
        }
    }
    out
}

/// Writes the PEFT tensor `peft` `[P, 2·L·kv_dim]` into prefix `i` of `bank`.
pub fn write_peft<T: Real>(bank: &mut PrefixBank<T>, i: usize, peft: &[T]) {
    let (h_n, p_n, d_n) = (bank.kv_heads, bank.len, bank.head_dim);
    let kv_dim = h_n * d_n;
    let width = peft_width(bank.n_layers, h_n, d_n);
    assert!(
        i < bank.n_prefixes && peft.len() == p_n * width,
        "write_peft: prefix {i} of {}, tensor of {} elements for [{p_n}, {width}]",
        bank.n_prefixes,
        peft.len()
    );
    for l in 0..bank.n_layers {
        for (s, dst) in [(2 * l, &mut bank.k[l]), (2 * l + 1, &mut bank.v[l])] {
            for h in 0..h_n {
                for p in 0..p_n {
                    let to = ((i * h_n + h) * p_n + p) * d_n;
                    let from = p * width + s * kv_dim + h * d_n;
                    dst[to..to + d_n].copy_from_slice(&peft[from..from + d_n]);
                }
            }
        }
    }
}

/// A one-prefix bank from a PEFT tensor `[P, 2·L·kv_dim]` (P is inferred from the length).
pub fn from_peft<T: Real>(
    peft: &[T],
    n_layers: usize,
    kv_heads: usize,
    head_dim: usize,
) -> PrefixBank<T> {
    let width = peft_width(n_layers, kv_heads, head_dim);
    assert!(
        width > 0 && peft.len() % width == 0,
        "from_peft: {} elements is not a whole number of rows of {width}",
        peft.len()
    );
    let mut bank = PrefixBank::zeros(1, n_layers, kv_heads, peft.len() / width, head_dim);
    write_peft(&mut bank, 0, peft);
    bank
}

/// What an imported PEFT prefix-tuning adapter says about itself.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftAdapterConfig {
    pub num_virtual_tokens: usize,
    pub num_layers: usize,
    /// `kv_heads · head_dim` in PEFT ≥ 0.13 (GQA-aware).
    pub token_dim: usize,
    /// The KV heads in PEFT ≥ 0.13.
    pub num_attention_heads: usize,
    pub prefix_projection: bool,
    pub base_model_name_or_path: Option<String>,
    /// The tensor key the prefix was found under.
    pub tensor_name: String,
}

impl PeftAdapterConfig {
    /// `token_dim / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.token_dim / self.num_attention_heads
    }

    /// Refuses an adapter whose shapes do not fit `model`.
    pub fn check_model(&self, model: &ModelConfig) -> Result<()> {
        if self.num_layers != model.n_layers {
            bail!(
                "PEFT adapter was made for a model with {} layers; this model has {}",
                self.num_layers,
                model.n_layers
            );
        }
        if self.num_attention_heads != model.n_kv_heads || self.token_dim != model.kv_dim() {
            let hint =
                if self.num_attention_heads == model.n_heads && model.n_heads != model.n_kv_heads {
                    " (it counts query heads, not KV heads: an adapter from a PEFT version without \
                 grouped-query support, PEFT issue #1901)"
                } else {
                    ""
                };
            bail!(
                "PEFT adapter has {} heads of token_dim {}; this model has {} KV heads × {} = {}{hint}",
                self.num_attention_heads,
                self.token_dim,
                model.n_kv_heads,
                model.head_dim,
                model.kv_dim()
            );
        }
        Ok(())
    }
}

fn get_usize(cfg: &Value, key: &str, file: &Path) -> Result<usize> {
    let v = cfg
        .get(key)
        .with_context(|| format!("{}: missing field `{key}`", file.display()))?;
    let n = v
        .as_u64()
        .with_context(|| format!("{}: `{key}` is {v}, not a whole number", file.display()))?;
    if n == 0 || n > (1 << 24) {
        bail!("{}: `{key}` = {n} is out of range", file.display());
    }
    Ok(n as usize)
}

/// Reads a PEFT prefix-tuning adapter directory (`adapter_config.json` +
/// `adapter_model.safetensors`) as a one-prefix bank (f16/bf16 files are widened to f32).
pub fn import_peft_adapter(dir: &Path) -> Result<(PrefixBank<f32>, PeftAdapterConfig)> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read(&cfg_path)
        .with_context(|| format!("reading PEFT adapter config {}", cfg_path.display()))?;
    let st_path = dir.join("adapter_model.safetensors");
    // The config is checked before the weights are read.
    let st_bytes = || {
        if !st_path.exists() && dir.join("adapter_model.bin").exists() {
            bail!(
                "{}: only adapter_model.bin (pickle) is present; re-save the adapter with \
                 save_pretrained(..., safe_serialization=True)",
                dir.display()
            );
        }
        std::fs::read(&st_path)
            .with_context(|| format!("reading PEFT adapter weights {}", st_path.display()))
    };
    import_peft_parts(&cfg_path, &text, &st_path, st_bytes)
}

/// [`import_peft_adapter`] on the bytes of the directory's two files: `adapter_config.json`
/// (`cfg_path`, `cfg_bytes`) and `adapter_model.safetensors` (`st_path`, `st_bytes`); the paths
/// name the files in errors.
pub fn parse_peft_adapter(
    cfg_path: &Path,
    cfg_bytes: &[u8],
    st_path: &Path,
    st_bytes: &[u8],
) -> Result<(PrefixBank<f32>, PeftAdapterConfig)> {
    import_peft_parts(cfg_path, cfg_bytes, st_path, || Ok(st_bytes.to_vec()))
}

fn import_peft_parts(
    cfg_path: &Path,
    cfg_bytes: &[u8],
    st_path: &Path,
    st_bytes: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<(PrefixBank<f32>, PeftAdapterConfig)> {
    let cfg: Value = serde_json::from_slice(cfg_bytes)
        .with_context(|| format!("{}: not valid JSON", cfg_path.display()))?;
    let peft_type = cfg.get("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type != "PREFIX_TUNING" {
        bail!(
            "{}: peft_type is {:?}, expected \"PREFIX_TUNING\"",
            cfg_path.display(),
            cfg.get("peft_type").unwrap_or(&Value::Null)
        );
    }
    if let Some(t) = cfg.get("task_type").and_then(Value::as_str) {
        if t != "CAUSAL_LM" {
            bail!(
                "{}: task_type {t:?} is not supported (only CAUSAL_LM)",
                cfg_path.display()
            );
        }
    }
    let subs = cfg
        .get("num_transformer_submodules")
        .and_then(Value::as_u64)
        .unwrap_or(1);
    if subs != 1 {
        bail!(
            "{}: num_transformer_submodules = {subs}; only decoder-only adapters (1) are supported",
            cfg_path.display()
        );
    }
    let num_virtual_tokens = get_usize(&cfg, "num_virtual_tokens", cfg_path)?;
    let num_layers = get_usize(&cfg, "num_layers", cfg_path)?;
    let token_dim = get_usize(&cfg, "token_dim", cfg_path)?;
    let num_attention_heads = get_usize(&cfg, "num_attention_heads", cfg_path)?;
    if token_dim % num_attention_heads != 0 {
        bail!(
            "{}: token_dim {token_dim} is not divisible by num_attention_heads {num_attention_heads}",
            cfg_path.display()
        );
    }
    let width = 2 * num_layers * token_dim;
    let elems = num_virtual_tokens
        .checked_mul(width)
        .filter(|&n| n <= 1 << 32)
        .with_context(|| format!("{}: prefix size overflows", cfg_path.display()))?;

    let bytes = st_bytes()?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a valid safetensors file", st_path.display()))?;
    let mut hits: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(k, _)| k == "prompt_embeddings" || k.ends_with(".prompt_embeddings"))
        .collect();
    if hits.len() != 1 {
        bail!(
            "{}: expected one tensor named `prompt_embeddings` (possibly with a module prefix), \
             found {} among {:?}",
            st_path.display(),
            hits.len(),
            st.names()
        );
    }
    let (tensor_name, view) = hits.pop().unwrap();
    if view.shape() != [num_virtual_tokens, width] {
        bail!(
            "{}: `{tensor_name}` has shape {:?}, but adapter_config.json says [{num_virtual_tokens}, \
             {width}] (num_virtual_tokens, 2·num_layers·token_dim)",
            st_path.display(),
            view.shape()
        );
    }
    let data = tensor_to_f32(&view)
        .with_context(|| format!("{}: tensor `{tensor_name}`", st_path.display()))?;
    debug_assert_eq!(data.len(), elems);
    if let Some(j) = data.iter().position(|x| !x.is_finite()) {
        bail!(
            "{}: `{tensor_name}` holds a non-finite value ({}) at element {j}",
            st_path.display(),
            data[j]
        );
    }
    let info = PeftAdapterConfig {
        num_virtual_tokens,
        num_layers,
        token_dim,
        num_attention_heads,
        prefix_projection: cfg
            .get("prefix_projection")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        base_model_name_or_path: cfg
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string),
        tensor_name,
    };
    let bank = from_peft(&data, num_layers, num_attention_heads, info.head_dim());
    Ok((bank, info))
}

/// Writes prefix `i` of `bank` as a PEFT prefix-tuning adapter directory that
/// `PeftModel.from_pretrained` loads (`prefix_projection: false`, inference mode).
pub fn export_peft_adapter(
    dir: &Path,
    bank: &PrefixBank<f32>,
    i: usize,
    base_model_name_or_path: Option<&str>,
) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating PEFT adapter directory {}", dir.display()))?;
    let token_dim = bank.kv_heads * bank.head_dim;
    let cfg = json!({
        "auto_mapping": null,
        "base_model_name_or_path": base_model_name_or_path,
        "encoder_hidden_size": token_dim,
        "inference_mode": true,
        "init_weights": null,
        "modules_to_save": null,
        "num_attention_heads": bank.kv_heads,
        "num_layers": bank.n_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": bank.len,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": false,
        "revision": null,
        "task_type": "CAUSAL_LM",
        "token_dim": token_dim,
    });
    let peft = to_peft(bank, i);
    let bytes: Vec<u8> = peft.iter().flat_map(|x| x.to_le_bytes()).collect();
    let shape = vec![
        bank.len,
        peft_width(bank.n_layers, bank.kv_heads, bank.head_dim),
    ];
    let view = TensorView::new(Dtype::F32, shape, &bytes).context("building prompt_embeddings")?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let st = safetensors::serialize([("prompt_embeddings", view)], Some(meta))
        .context("serializing prompt_embeddings")?;
    write_atomic(&dir.join("adapter_model.safetensors"), &st)?;
    let text = serde_json::to_string_pretty(&cfg)? + "\n";
    write_atomic(&dir.join("adapter_config.json"), text.as_bytes())?;
    Ok(())
}
