//! Prefix files: a trained prefix as safetensors plus the metadata needed to refuse using it
//! with the wrong model.
//!
//! Layout: one f32 tensor per prefix in PEFT's layout `[P, 2·L·kv_heads·head_dim]` (see
//! [`super::peft`]), named `prefix` when the file holds one prefix and `prefix.0`, `prefix.1`, …
//! when it holds several. Header metadata (all strings):
//!
//! | key | value |
//! |---|---|
//! | `prefix_tune_format` | `1` |
//! | `architecture` | `llama` / `gpt2` |
//! | `n_layers`, `kv_heads`, `head_dim`, `prefix_len`, `n_prefixes` | decimal |
//! | `base_model_fingerprint` | caller's string identifying the frozen model |
//! | `positions` | `after-prefix` (real tokens start at position P) / `from-zero` |
//! | `training_args` | a JSON document |
//!
//! Files are written to a temporary name in the same directory and renamed. Loading checks every
//! field, the tensors' names, dtypes and shapes against the metadata, and that values are finite;
//! every error names the file.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::peft::{peft_width, to_peft, write_peft};
use super::PrefixBank;
use crate::model::{Arch, ModelConfig};
pub use crate::types::Positions;

/// The prefix file format version written (and the newest one read).
pub const FORMAT_VERSION: u32 = 1;

/// The positions convention's name in files and on the command line.
pub fn positions_name(p: Positions) -> &'static str {
    match p {
        Positions::AfterPrefix => "after-prefix",
        Positions::FromZero => "from-zero",
    }
}

/// Parses [`positions_name`]'s output.
pub fn parse_positions(s: &str) -> Result<Positions> {
    match s {
        "after-prefix" => Ok(Positions::AfterPrefix),
        "from-zero" => Ok(Positions::FromZero),
        _ => bail!("positions convention {s:?} is neither \"after-prefix\" nor \"from-zero\""),
    }
}

/// What a prefix file says about the prefix and the model it was trained for.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefixMeta {
    pub arch: Arch,
    pub n_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub prefix_len: usize,
    /// Identifies the frozen model (computed by the caller, compared verbatim).
    pub fingerprint: String,
    pub positions: Positions,
    /// The training arguments as a JSON document (`{}` when unknown).
    pub training_args: String,
}

impl PrefixMeta {
    /// Metadata for a bank trained on `model`.
    pub fn for_model(
        model: &ModelConfig,
        prefix_len: usize,
        fingerprint: &str,
        positions: Positions,
        training_args: &serde_json::Value,
    ) -> Self {
        PrefixMeta {
            arch: model.arch,
            n_layers: model.n_layers,
            kv_heads: model.n_kv_heads,
            head_dim: model.head_dim,
            prefix_len,
            fingerprint: fingerprint.to_string(),
            positions,
            training_args: training_args.to_string(),
        }
    }
}

fn arch_name(a: Arch) -> &'static str {
    match a {
        Arch::Gpt2 => "gpt2",
        Arch::Llama => "llama",
    }
}

/// Refuses a prefix made for another model: fingerprint, architecture and every shape must match.
pub fn check_compatible(meta: &PrefixMeta, model: &ModelConfig, fingerprint: &str) -> Result<()> {
    let mut diffs = Vec::new();
    if meta.fingerprint != fingerprint {
        diffs.push(format!(
            "base-model fingerprint {:?} (this model: {:?})",
            meta.fingerprint, fingerprint
        ));
    }
    if meta.arch != model.arch {
        diffs.push(format!(
            "architecture {} (this model: {})",
            arch_name(meta.arch),
            arch_name(model.arch)
        ));
    }
    for (what, have, want) in [
        ("n_layers", meta.n_layers, model.n_layers),
        ("kv_heads", meta.kv_heads, model.n_kv_heads),
        ("head_dim", meta.head_dim, model.head_dim),
    ] {
        if have != want {
            diffs.push(format!("{what} {have} (this model: {want})"));
        }
    }
    if !diffs.is_empty() {
        bail!(
            "this prefix was made for another model: {}",
            diffs.join("; ")
        );
    }
    Ok(())
}

fn tensor_name(n_prefixes: usize, i: usize) -> String {
    if n_prefixes == 1 {
        "prefix".to_string()
    } else {
        format!("prefix.{i}")
    }
}

/// Saves every prefix of `bank` with `meta` (whose shapes must match the bank).
pub fn save_prefix(path: &Path, bank: &PrefixBank<f32>, meta: &PrefixMeta) -> Result<()> {
    let what = || format!("saving prefix file {}", path.display());
    if (meta.n_layers, meta.kv_heads, meta.head_dim, meta.prefix_len)
        != (bank.n_layers, bank.kv_heads, bank.head_dim, bank.len)
    {
        bail!(
            "{}: metadata says layers {}, kv heads {}, head dim {}, length {}; the bank has {}, {}, {}, {}",
            what(),
            meta.n_layers,
            meta.kv_heads,
            meta.head_dim,
            meta.prefix_len,
            bank.n_layers,
            bank.kv_heads,
            bank.head_dim,
            bank.len
        );
    }
    if bank.n_prefixes == 0 || bank.len == 0 {
        bail!("{}: the bank is empty", what());
    }
    if !bank.all_finite() {
        bail!("{}: the prefix holds non-finite values", what());
    }
    serde_json::from_str::<serde_json::Value>(&meta.training_args)
        .with_context(|| format!("{}: training_args is not valid JSON", what()))?;
    let info = HashMap::from([
        ("prefix_tune_format".to_string(), FORMAT_VERSION.to_string()),
        ("architecture".to_string(), arch_name(meta.arch).to_string()),
        ("n_layers".to_string(), meta.n_layers.to_string()),
        ("kv_heads".to_string(), meta.kv_heads.to_string()),
        ("head_dim".to_string(), meta.head_dim.to_string()),
        ("prefix_len".to_string(), meta.prefix_len.to_string()),
        ("n_prefixes".to_string(), bank.n_prefixes.to_string()),
        (
            "base_model_fingerprint".to_string(),
            meta.fingerprint.clone(),
        ),
        (
            "positions".to_string(),
            positions_name(meta.positions).to_string(),
        ),
        ("training_args".to_string(), meta.training_args.clone()),
    ]);
    let width = peft_width(bank.n_layers, bank.kv_heads, bank.head_dim);
    let bytes: Vec<Vec<u8>> = (0..bank.n_prefixes)
        .map(|i| {
            to_peft(bank, i)
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect()
        })
        .collect();
    let mut views = Vec::new();
    for (i, b) in bytes.iter().enumerate() {
        let view = TensorView::new(Dtype::F32, vec![bank.len, width], b).with_context(what)?;
        views.push((tensor_name(bank.n_prefixes, i), view));
    }
    let data = safetensors::serialize(views, Some(info)).with_context(what)?;
    write_atomic(path, &data).with_context(what)
}

/// Upper bound on any single dimension in a prefix file's metadata (sanity, not a model limit).
const MAX_DIM: usize = 1 << 20;

/// Loads a prefix file, checking everything; errors name the file.
pub fn load_prefix(path: &Path) -> Result<(PrefixBank<f32>, PrefixMeta)> {
    std::fs::read(path)
        .context("cannot read the file")
        .and_then(|bytes| load_inner(&bytes))
        .with_context(|| format!("loading prefix file {}", path.display()))
}

/// [`load_prefix`] on a file's bytes; `path` names the file in errors.
pub fn parse_prefix(path: &Path, bytes: &[u8]) -> Result<(PrefixBank<f32>, PrefixMeta)> {
    load_inner(bytes).with_context(|| format!("loading prefix file {}", path.display()))
}

fn load_inner(bytes: &[u8]) -> Result<(PrefixBank<f32>, PrefixMeta)> {
    let st = SafeTensors::deserialize(bytes)
        .context("not a valid safetensors file (truncated or corrupt)")?;
    let (_, header) = SafeTensors::read_metadata(bytes).context("unreadable header")?;
    let Some(map) = header.metadata() else {
        bail!("the header has no metadata: not a prefix-tune prefix file");
    };
    let get = |key: &str| -> Result<&String> {
        map.get(key)
            .with_context(|| format!("metadata field `{key}` is missing"))
    };
    let num = |key: &str| -> Result<usize> {
        let s = get(key)?;
        let n: usize = s
            .parse()
            .with_context(|| format!("metadata field `{key}` = {s:?} is not a whole number"))?;
        if n == 0 || n > MAX_DIM {
            bail!("metadata field `{key}` = {n} is out of range 1..={MAX_DIM}");
        }
        Ok(n)
    };
    let version: u32 = get("prefix_tune_format")?
        .parse()
        .context("metadata field `prefix_tune_format` is not a number")?;
    if version == 0 || version > FORMAT_VERSION {
        bail!("prefix file format version {version} is not supported (this build reads up to {FORMAT_VERSION})");
    }
    let arch = match get("architecture")?.as_str() {
        "gpt2" => Arch::Gpt2,
        "llama" => Arch::Llama,
        a => bail!("metadata field `architecture` = {a:?} is unknown"),
    };
    let meta = PrefixMeta {
        arch,
        n_layers: num("n_layers")?,
        kv_heads: num("kv_heads")?,
        head_dim: num("head_dim")?,
        prefix_len: num("prefix_len")?,
        fingerprint: get("base_model_fingerprint")?.clone(),
        positions: parse_positions(get("positions")?)?,
        training_args: get("training_args")?.clone(),
    };
    serde_json::from_str::<serde_json::Value>(&meta.training_args)
        .context("metadata field `training_args` is not valid JSON")?;
    let n_prefixes = num("n_prefixes")?;
    // Each factor is at most 2^20, so the product fits in 64 bits.
    let width = peft_width(meta.n_layers, meta.kv_heads, meta.head_dim);
    // Every tensor is checked against the file's real size by the safetensors header
    // validation, so the sizes below are bounded by the bytes we hold.
    if st.len() != n_prefixes {
        bail!(
            "metadata says {n_prefixes} prefixes but the file holds {} tensors ({:?})",
            st.len(),
            st.names()
        );
    }
    // Check every tensor before allocating the bank: a shape that matches the metadata is bounded
    // by the file's real size, so the bank's size is too.
    let mut data = Vec::with_capacity(n_prefixes);
    for i in 0..n_prefixes {
        let name = tensor_name(n_prefixes, i);
        let view = st
            .tensor(&name)
            .with_context(|| format!("tensor `{name}` is missing (found {:?})", st.names()))?;
        if view.dtype() != Dtype::F32 {
            bail!("tensor `{name}` is {:?}, expected F32", view.dtype());
        }
        if view.shape() != [meta.prefix_len, width] {
            bail!(
                "tensor `{name}` has shape {:?}, but the metadata says [{}, {width}] \
                 (prefix_len, 2·n_layers·kv_heads·head_dim)",
                view.shape(),
                meta.prefix_len
            );
        }
        let values = tensor_to_f32(&view)?;
        if let Some(j) = values.iter().position(|x| !x.is_finite()) {
            bail!(
                "tensor `{name}` holds a non-finite value ({}) at element {j}",
                values[j]
            );
        }
        data.push(values);
    }
    let mut bank = PrefixBank::zeros(
        n_prefixes,
        meta.n_layers,
        meta.kv_heads,
        meta.prefix_len,
        meta.head_dim,
    );
    for (i, values) in data.iter().enumerate() {
        write_peft(&mut bank, i, values);
    }
    Ok((bank, meta))
}

/// Loads a prefix file and checks it was made for `model` (with this `fingerprint`).
pub fn load_prefix_for(
    path: &Path,
    model: &ModelConfig,
    fingerprint: &str,
) -> Result<(PrefixBank<f32>, PrefixMeta)> {
    let (bank, meta) = load_prefix(path)?;
    check_compatible(&meta, model, fingerprint)
        .with_context(|| format!("prefix file {}", path.display()))?;
    Ok((bank, meta))
}

/// A tensor's values widened to f32 (F32, F16 and BF16 little-endian).
pub(crate) fn tensor_to_f32(view: &TensorView) -> Result<Vec<f32>> {
    let d = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => bail!("dtype {other:?} is not a floating-point type this reads (F32, F16, BF16)"),
    })
}

/// Writes `data` to a temporary file next to `path`, syncs it, and renames it over `path`.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(data)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Saves a reparameterization (a training checkpoint; what is kept after training is
/// [`Reparam::fold`](super::Reparam::fold) saved with [`save_prefix`]). Tensors are named like
/// PEFT's `PrefixEncoder`: `embedding.weight`, `transform.0.weight`, `transform.0.bias`,
/// `transform.2.weight`, `transform.2.bias`; metadata `prefix_tune_reparam` (version),
/// `n_layers`, `kv_heads`, `head_dim`.
pub fn save_reparam(path: &Path, r: &super::Reparam<f32>) -> Result<()> {
    let what = || format!("saving reparameterization {}", path.display());
    let out = r.out_dim();
    let parts: [(&str, Vec<usize>, &Vec<f32>); 5] = [
        ("embedding.weight", vec![r.len, r.emb_dim], &r.embedding),
        ("transform.0.weight", vec![r.hidden, r.emb_dim], &r.w1),
        ("transform.0.bias", vec![r.hidden], &r.b1),
        ("transform.2.weight", vec![out, r.hidden], &r.w2),
        ("transform.2.bias", vec![out], &r.b2),
    ];
    for (name, shape, v) in &parts {
        if shape.iter().product::<usize>() != v.len() || v.is_empty() {
            bail!(
                "{}: `{name}` has {} values for shape {shape:?}",
                what(),
                v.len()
            );
        }
        if v.iter().any(|x| !x.is_finite()) {
            bail!("{}: `{name}` holds non-finite values", what());
        }
    }
    let bytes: Vec<Vec<u8>> = parts
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::new();
    for ((name, shape, _), b) in parts.iter().zip(&bytes) {
        views.push((
            name.to_string(),
            TensorView::new(Dtype::F32, shape.clone(), b).with_context(what)?,
        ));
    }
    let info = HashMap::from([
        (
            "prefix_tune_reparam".to_string(),
            FORMAT_VERSION.to_string(),
        ),
        ("n_layers".to_string(), r.n_layers.to_string()),
        ("kv_heads".to_string(), r.kv_heads.to_string()),
        ("head_dim".to_string(), r.head_dim.to_string()),
    ]);
    let data = safetensors::serialize(views, Some(info)).with_context(what)?;
    write_atomic(path, &data).with_context(what)
}

/// Loads what [`save_reparam`] wrote, checking every shape against the others and the metadata.
pub fn load_reparam(path: &Path) -> Result<super::Reparam<f32>> {
    std::fs::read(path)
        .context("cannot read the file")
        .and_then(|bytes| load_reparam_inner(&bytes))
        .with_context(|| format!("loading reparameterization {}", path.display()))
}

/// [`load_reparam`] on a file's bytes; `path` names the file in errors.
pub fn parse_reparam(path: &Path, bytes: &[u8]) -> Result<super::Reparam<f32>> {
    load_reparam_inner(bytes)
        .with_context(|| format!("loading reparameterization {}", path.display()))
}

fn load_reparam_inner(bytes: &[u8]) -> Result<super::Reparam<f32>> {
    let st = SafeTensors::deserialize(bytes)
        .context("not a valid safetensors file (truncated or corrupt)")?;
    let (_, header) = SafeTensors::read_metadata(bytes).context("unreadable header")?;
    let Some(map) = header.metadata() else {
        bail!("the header has no metadata: not a prefix-tune reparameterization file");
    };
    let num = |key: &str| -> Result<usize> {
        let s = map
            .get(key)
            .with_context(|| format!("metadata field `{key}` is missing"))?;
        let n: usize = s
            .parse()
            .with_context(|| format!("metadata field `{key}` = {s:?} is not a whole number"))?;
        if n == 0 || n > MAX_DIM {
            bail!("metadata field `{key}` = {n} is out of range 1..={MAX_DIM}");
        }
        Ok(n)
    };
    let version = num("prefix_tune_reparam")?;
    if version > FORMAT_VERSION as usize {
        bail!("reparameterization format version {version} is not supported");
    }
    let (n_layers, kv_heads, head_dim) = (num("n_layers")?, num("kv_heads")?, num("head_dim")?);
    let out = peft_width(n_layers, kv_heads, head_dim);
    let get = |name: &str, rank: usize| -> Result<(Vec<usize>, Vec<f32>)> {
        let view = st
            .tensor(name)
            .with_context(|| format!("tensor `{name}` is missing (found {:?})", st.names()))?;
        if view.dtype() != Dtype::F32 || view.shape().len() != rank {
            bail!(
                "tensor `{name}` is {:?} {:?}, expected F32 of rank {rank}",
                view.dtype(),
                view.shape()
            );
        }
        let v = tensor_to_f32(&view)?;
        if let Some(j) = v.iter().position(|x| !x.is_finite()) {
            bail!(
                "tensor `{name}` holds a non-finite value ({}) at element {j}",
                v[j]
            );
        }
        Ok((view.shape().to_vec(), v))
    };
    let (se, embedding) = get("embedding.weight", 2)?;
    let (s1, w1) = get("transform.0.weight", 2)?;
    let (sb1, b1) = get("transform.0.bias", 1)?;
    let (s2, w2) = get("transform.2.weight", 2)?;
    let (sb2, b2) = get("transform.2.bias", 1)?;
    let (len, emb_dim, hidden) = (se[0], se[1], s1[0]);
    if s1 != [hidden, emb_dim] || sb1 != [hidden] || s2 != [out, hidden] || sb2 != [out] {
        bail!(
            "inconsistent shapes: embedding {se:?}, transform.0 {s1:?} + {sb1:?}, transform.2 \
             {s2:?} + {sb2:?}; expected an output width of {out} (2·{n_layers}·{kv_heads}·{head_dim})"
        );
    }
    Ok(super::Reparam {
        n_layers,
        kv_heads,
        head_dim,
        len,
        emb_dim,
        hidden,
        embedding,
        w1,
        b1,
        w2,
        b2,
    })
}
