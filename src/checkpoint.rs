//! Training checkpoints: everything needed to continue a run bit for bit.
//!
//! A checkpoint is a directory (`<out>/checkpoint/`) holding
//! - `trainer.safetensors`: the trainable parameters as one flat f32 tensor `params`, the
//!   optimizer's moment tensors (`opt.m`, `opt.v` for AdamW; `opt.buf` for SGD with momentum),
//!   and in the header metadata `trainer_state` (the trainer's JSON state: step, data position,
//!   RNG seed, history, arguments) and `optimizer` (the optimizer's kind, hyperparameters and
//!   step count, as JSON without the moments);
//! - `prefix.safetensors`: the prefix as it stands (folded when reparameterized), an ordinary
//!   prefix file that `eval`/`generate` accept;
//! - `reparam.safetensors` when training through the reparameterization.
//!
//! Writing is atomic at the directory level: everything goes to `checkpoint.tmp/`, the old
//! checkpoint is renamed `checkpoint.old/`, the new one renamed into place, then the old one is
//! removed. [`load_checkpoint`] falls back to `checkpoint.old/` when a crash left no
//! `checkpoint/`. Each file is itself written to a temporary name and renamed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::optim::Optimizer;
use crate::prefix::{save_prefix, save_reparam, PrefixBank, PrefixMeta, Reparam};

/// The checkpoint directory's name inside a training output directory.
pub const CHECKPOINT_DIR: &str = "checkpoint";
const TRAINER_FILE: &str = "trainer.safetensors";

/// A restored checkpoint.
#[derive(Clone, Debug)]
pub struct Checkpoint<S> {
    pub state: S,
    /// The flat trainable parameters.
    pub params: Vec<f32>,
    pub optimizer: Optimizer,
    /// The directory it was read from.
    pub dir: PathBuf,
}

/// What to write besides the trainer state.
pub struct CheckpointParts<'a> {
    pub params: &'a [f32],
    pub optimizer: &'a Optimizer,
    /// The current prefix (folded when reparameterized) and its metadata.
    pub prefix: &'a PrefixBank<f32>,
    pub meta: &'a PrefixMeta,
    pub reparam: Option<&'a Reparam<f32>>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes a checkpoint of `state` and `parts` into `<out>/checkpoint/` atomically.
pub fn save_checkpoint<S: Serialize>(out: &Path, state: &S, parts: &CheckpointParts) -> Result<()> {
    let final_dir = out.join(CHECKPOINT_DIR);
    let tmp = out.join(format!("{CHECKPOINT_DIR}.tmp"));
    let old = out.join(format!("{CHECKPOINT_DIR}.old"));
    let what = || format!("writing checkpoint {}", final_dir.display());
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing a stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = (|| -> Result<()> {
        // Optimizer: JSON without the moments, moments as tensors.
        let mut light = parts.optimizer.clone();
        let mut tensors: Vec<(String, Vec<f32>)> = vec![("params".into(), parts.params.to_vec())];
        match &mut light {
            Optimizer::AdamW(a) => {
                tensors.push(("opt.m".into(), std::mem::take(&mut a.m)));
                tensors.push(("opt.v".into(), std::mem::take(&mut a.v)));
            }
            Optimizer::Sgd(s) => {
                if !s.buf.is_empty() {
                    tensors.push(("opt.buf".into(), std::mem::take(&mut s.buf)));
                }
            }
        }
        if let Some(i) = tensors
            .iter()
            .position(|(_, v)| v.iter().any(|x| !x.is_finite()))
        {
            bail!("`{}` holds non-finite values", tensors[i].0);
        }
        let bytes: Vec<(String, Vec<u8>, usize)> = tensors
            .iter()
            .map(|(n, v)| (n.clone(), f32_bytes(v), v.len()))
            .collect();
        let mut views = Vec::new();
        for (n, b, len) in &bytes {
            views.push((n.clone(), TensorView::new(Dtype::F32, vec![*len], b)?));
        }
        let info = HashMap::from([
            ("trainer_state".to_string(), serde_json::to_string(state)?),
            ("optimizer".to_string(), serde_json::to_string(&light)?),
        ]);
        let data = safetensors::serialize(views, Some(info))?;
        save_prefix(&tmp.join("prefix.safetensors"), parts.prefix, parts.meta)?;
        if let Some(r) = parts.reparam {
            save_reparam(&tmp.join("reparam.safetensors"), r)?;
        }
        test_pause("files");
        // The trainer file last: a directory holding it is complete.
        crate::prefix::file::write_atomic(&tmp.join(TRAINER_FILE), &data)?;
        sync_dir(&tmp)?;
        test_pause("written");
        // Swap directories, never removing the only complete checkpoint: `checkpoint.old/` is
        // removed only while `checkpoint/` exists (a crash between the two renames leaves only
        // `checkpoint.old/`, which the next write must keep until its own rename is done).
        if final_dir.exists() {
            if old.exists() {
                std::fs::remove_dir_all(&old)
                    .with_context(|| format!("removing {}", old.display()))?;
            }
            std::fs::rename(&final_dir, &old)
                .with_context(|| format!("renaming {} aside", final_dir.display()))?;
            test_pause("set-aside");
        }
        std::fs::rename(&tmp, &final_dir)
            .with_context(|| format!("renaming {} into place", tmp.display()))?;
        sync_dir(out)?;
        test_pause("renamed");
        if old.exists() {
            let _ = std::fs::remove_dir_all(&old);
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.with_context(what)
}

/// Flushes a directory's entries (the renames and files in it) to disk.
fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// Test hook (the kill-and-resume test, tests/kill_resume.rs): with
/// `PREFIX_TUNE_TEST_CHECKPOINT_PAUSE_MS=N` the writer announces each stage of a checkpoint
/// write on stderr (`checkpoint-stage NAME`) and sleeps N ms there, so a test can kill the
/// process inside a write. Unset (always, outside tests), it does nothing.
fn test_pause(stage: &str) {
    static PAUSE: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let pause = PAUSE.get_or_init(|| {
        std::env::var("PREFIX_TUNE_TEST_CHECKPOINT_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(ms) = *pause {
        eprintln!("checkpoint-stage {stage}");
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// The checkpoint directory of a training output directory (or the checkpoint directory itself),
/// falling back to the `.old` copy an interrupted swap left.
pub fn find_checkpoint(dir: &Path) -> Result<PathBuf> {
    if dir.join(TRAINER_FILE).is_file() {
        return Ok(dir.to_path_buf());
    }
    for name in [CHECKPOINT_DIR.to_string(), format!("{CHECKPOINT_DIR}.old")] {
        let d = dir.join(name);
        if d.join(TRAINER_FILE).is_file() {
            return Ok(d);
        }
    }
    if !dir.exists() {
        bail!("--resume {}: no such directory", dir.display());
    }
    bail!(
        "--resume {}: no checkpoint there (expected {}/{TRAINER_FILE}; checkpoints are written every --save-every steps and at the end)",
        dir.display(),
        dir.join(CHECKPOINT_DIR).display()
    )
}

/// Reads a checkpoint from a training output directory (or a checkpoint directory).
pub fn load_checkpoint<S: DeserializeOwned>(dir: &Path) -> Result<Checkpoint<S>> {
    let ck = find_checkpoint(dir)?;
    let path = ck.join(TRAINER_FILE);
    let bytes =
        std::fs::read(&path).with_context(|| format!("reading checkpoint {}", path.display()))?;
    parse_checkpoint(&path, &bytes)
}

/// [`load_checkpoint`] on the bytes of a checkpoint's `trainer.safetensors` at `path` (which
/// names it in errors; its directory is the checkpoint's).
pub fn parse_checkpoint<S: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<Checkpoint<S>> {
    let ck = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let what = || format!("reading checkpoint {}", path.display());
    let st = SafeTensors::deserialize(bytes)
        .with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
    let (_, header) = SafeTensors::read_metadata(bytes).with_context(what)?;
    let meta = header
        .metadata()
        .as_ref()
        .with_context(|| format!("{}: no metadata", path.display()))?;
    let get = |k: &str| {
        meta.get(k)
            .with_context(|| format!("{}: metadata `{k}` is missing", path.display()))
    };
    let state: S = serde_json::from_str(get("trainer_state")?)
        .with_context(|| format!("{}: unreadable trainer state", path.display()))?;
    let mut optimizer: Optimizer = serde_json::from_str(get("optimizer")?)
        .with_context(|| format!("{}: unreadable optimizer state", path.display()))?;
    let tensor = |name: &str| -> Result<Option<Vec<f32>>> {
        let Ok(view) = st.tensor(name) else {
            return Ok(None);
        };
        if view.dtype() != Dtype::F32 || view.shape().len() != 1 {
            bail!(
                "{}: tensor `{name}` is {:?} {:?}, expected a flat F32 tensor",
                path.display(),
                view.dtype(),
                view.shape()
            );
        }
        Ok(Some(
            view.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ))
    };
    let params = tensor("params")?
        .with_context(|| format!("{}: tensor `params` is missing", path.display()))?;
    match &mut optimizer {
        Optimizer::AdamW(a) => {
            a.m = tensor("opt.m")?
                .with_context(|| format!("{}: tensor `opt.m` is missing", path.display()))?;
            a.v = tensor("opt.v")?
                .with_context(|| format!("{}: tensor `opt.v` is missing", path.display()))?;
        }
        Optimizer::Sgd(s) => s.buf = tensor("opt.buf")?.unwrap_or_default(),
    }
    optimizer
        .check_len(params.len())
        .with_context(|| format!("{}", path.display()))?;
    Ok(Checkpoint {
        state,
        params,
        optimizer,
        dir: ck,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Arch;
    use crate::optim::{AdamW, AdamWConfig};
    use crate::reference::model::Positions;

    fn meta(bank: &PrefixBank<f32>) -> PrefixMeta {
        PrefixMeta {
            arch: Arch::Llama,
            n_layers: bank.n_layers,
            kv_heads: bank.kv_heads,
            head_dim: bank.head_dim,
            prefix_len: bank.len,
            fingerprint: "test".into(),
            positions: Positions::AfterPrefix,
            training_args: "{}".into(),
        }
    }

    #[test]
    fn round_trip_and_fallback_to_the_old_copy() {
        let dir = tempfile::tempdir().unwrap();
        let bank = PrefixBank::<f32>::random(1, 2, 2, 3, 4, 1.0, 7);
        let params = bank.to_flat();
        let mut opt = AdamW::new(AdamWConfig::default(), params.len());
        let grads: Vec<f32> = params.iter().map(|x| x.sin()).collect();
        let mut p2 = params.clone();
        opt.step(&mut p2, &grads, 1e-3);
        let optimizer = Optimizer::AdamW(opt);
        for step in [3u64, 6] {
            let parts = CheckpointParts {
                params: &p2,
                optimizer: &optimizer,
                prefix: &bank,
                meta: &meta(&bank),
                reparam: None,
            };
            save_checkpoint(dir.path(), &step, &parts).unwrap();
        }
        let ck: Checkpoint<u64> = load_checkpoint(dir.path()).unwrap();
        assert_eq!(ck.state, 6);
        assert!(ck
            .params
            .iter()
            .zip(&p2)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(ck.optimizer, optimizer);
        assert!(!dir.path().join("checkpoint.tmp").exists());
        assert!(!dir.path().join("checkpoint.old").exists());
        // A crash between the two renames leaves only checkpoint.old: it is used.
        std::fs::rename(
            dir.path().join(CHECKPOINT_DIR),
            dir.path().join("checkpoint.old"),
        )
        .unwrap();
        let ck: Checkpoint<u64> = load_checkpoint(dir.path()).unwrap();
        assert_eq!(ck.state, 6);
        // A corrupt trainer file is an error naming it, not a panic.
        let f = dir.path().join("checkpoint.old").join(TRAINER_FILE);
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
        let e = format!("{:#}", load_checkpoint::<u64>(dir.path()).unwrap_err());
        assert!(e.contains("trainer.safetensors"), "{e}");
    }
}
