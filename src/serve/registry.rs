//! The tasks a server answers: the base model and its loaded prefixes, by the names clients
//! give as `model`: `"<base>"` for the base model, `"<base>:<prefix>"` or the bare prefix name
//! for a prefix. Prefixes are loaded at start-up (`--prefix NAME=PATH`) or at run time
//! (`POST /v1/prefixes`) and unloaded at run time (`DELETE /v1/prefixes/NAME`).
//!
//! A prefix's bank lives in one `Arc`: the registry holds it, and every sequence decoding with
//! it holds a clone of that `Arc` (never a copy of the values). Unloading drops the registry's
//! reference; sequences still running finish with theirs, and the memory goes with the last.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Result};

use crate::model::config::ModelConfig;
use crate::prefix::resolve::{load_prefix_for_model, LoadedPrefix};
use crate::prefix::PrefixBank;
use crate::reference::decode::SharedPrefix;
use crate::reference::model::Positions;

/// A prefix ready to serve.
#[derive(Debug)]
pub struct PrefixTask {
    pub name: String,
    pub prefix: SharedPrefix<f32>,
    pub positions: Positions,
    /// Where it was loaded from (`None`: made in memory, e.g. by the load test).
    pub source: Option<PathBuf>,
    /// Unix time it was loaded.
    pub created: u64,
}

/// What a request's `model` names.
#[derive(Clone, Debug)]
pub enum Task {
    Base,
    Prefix(Arc<PrefixTask>),
}

impl Task {
    /// The prefix to decode with (`None`: the base model).
    pub fn prefix(&self) -> Option<&SharedPrefix<f32>> {
        match self {
            Task::Base => None,
            Task::Prefix(p) => Some(&p.prefix),
        }
    }

    /// The position convention of its tokens.
    pub fn positions(&self) -> Positions {
        match self {
            Task::Base => Positions::AfterPrefix,
            Task::Prefix(p) => p.positions,
        }
    }

    /// Prefix entries in front of its tokens.
    pub fn prefix_len(&self) -> usize {
        self.prefix().map_or(0, |p| p.bank.len)
    }
}

/// One entry of `GET /v1/models`.
#[derive(Clone, Debug)]
pub struct ModelEntry {
    pub id: String,
    pub created: u64,
    /// The base model's id for a prefix.
    pub parent: Option<String>,
    pub prefix_len: usize,
    pub positions: Option<Positions>,
}

/// The base model's name and the loaded prefixes.
#[derive(Debug)]
pub struct Registry {
    base: String,
    created: u64,
    /// Positions forced for every prefix (`--positions`), else each prefix's own.
    force_positions: Option<Positions>,
    prefixes: RwLock<BTreeMap<String, Arc<PrefixTask>>>,
}

/// Unix time now, in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Checks a prefix name: 1–64 characters of letters, digits, `.`, `_` and `-`.
pub fn check_prefix_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')),
        "prefix name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-'"
    );
    Ok(())
}

impl Registry {
    pub fn new(base: &str, force_positions: Option<Positions>) -> Self {
        Registry {
            base: base.to_string(),
            created: unix_now(),
            force_positions,
            prefixes: RwLock::new(BTreeMap::new()),
        }
    }

    /// The base model's name.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The task a request's `model` names, or `None`.
    pub fn resolve(&self, model: &str) -> Option<Task> {
        if model == self.base {
            return Some(Task::Base);
        }
        let name = match model.split_once(':') {
            Some((base, name)) if base == self.base => name,
            Some(_) => return None,
            None => model,
        };
        let map = self.prefixes.read().expect("registry lock");
        map.get(name).cloned().map(Task::Prefix)
    }

    /// Every model id, the base first.
    pub fn entries(&self) -> Vec<ModelEntry> {
        let map = self.prefixes.read().expect("registry lock");
        let mut out = vec![ModelEntry {
            id: self.base.clone(),
            created: self.created,
            parent: None,
            prefix_len: 0,
            positions: None,
        }];
        out.extend(map.values().map(|p| self.entry(p)));
        out
    }

    /// The `GET /v1/models` entry of a prefix.
    pub fn entry(&self, p: &PrefixTask) -> ModelEntry {
        ModelEntry {
            id: format!("{}:{}", self.base, p.name),
            created: p.created,
            parent: Some(self.base.clone()),
            prefix_len: p.prefix.bank.len,
            positions: Some(p.positions),
        }
    }

    /// Names of the loaded prefixes.
    pub fn prefix_names(&self) -> Vec<String> {
        self.prefixes
            .read()
            .expect("registry lock")
            .keys()
            .cloned()
            .collect()
    }

    /// The loaded prefix `name`.
    pub fn prefix(&self, name: &str) -> Option<Arc<PrefixTask>> {
        self.prefixes
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
    }

    /// Adds a prefix bank (one prefix) under `name`; refused when the name is taken or is the
    /// base model's.
    pub fn insert(
        &self,
        name: &str,
        bank: PrefixBank<f32>,
        positions: Positions,
        source: Option<PathBuf>,
    ) -> Result<Arc<PrefixTask>> {
        check_prefix_name(name)?;
        ensure!(
            name != self.base,
            "prefix name {name:?} is the base model's name"
        );
        ensure!(
            bank.n_prefixes == 1,
            "holds {} prefixes; give one prefix per name (export one with `prefix-tune export \
             --index`)",
            bank.n_prefixes
        );
        let task = Arc::new(PrefixTask {
            name: name.to_string(),
            prefix: SharedPrefix {
                bank: Arc::new(bank),
                index: 0,
            },
            positions: self.force_positions.unwrap_or(positions),
            source,
            created: unix_now(),
        });
        let mut map = self.prefixes.write().expect("registry lock");
        if map.contains_key(name) {
            bail!("a prefix named {name:?} is already loaded (DELETE /v1/prefixes/{name} first)");
        }
        map.insert(name.to_string(), task.clone());
        Ok(task)
    }

    /// Loads the prefix at `path` (a prefix file, training directory or PEFT adapter, as the
    /// CLI's `--prefix`) for the model `cfg` with `fingerprint`; a prefix made for another
    /// model is refused.
    pub fn load(
        &self,
        name: &str,
        path: &Path,
        cfg: &ModelConfig,
        fingerprint: &str,
    ) -> Result<Arc<PrefixTask>> {
        check_prefix_name(name)?;
        if self.prefix(name).is_some() {
            bail!("a prefix named {name:?} is already loaded (DELETE /v1/prefixes/{name} first)");
        }
        let LoadedPrefix {
            bank,
            positions,
            path,
            ..
        } = load_prefix_for_model(path, cfg, fingerprint)?;
        let shown = path.display().to_string();
        self.insert(name, bank, positions, Some(path))
            .map_err(|e| anyhow::anyhow!("prefix {shown}: {e}"))
    }

    /// Unloads `name`; `None` when no such prefix is loaded.
    pub fn remove(&self, name: &str) -> Option<Arc<PrefixTask>> {
        self.prefixes.write().expect("registry lock").remove(name)
    }
}
