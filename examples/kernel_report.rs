//! The static kernel report (`prefix_tune::kernel_report`) as a command.
//!
//! ```sh
//! cargo run --release --example kernel_report                 # every embedded attention kernel
//! cargo run --release --example kernel_report -- --json       # the same rows as JSON
//! # any other cubin, e.g. FlashAttention-2's (see BENCHMARKS.md):
//! cargo run --release --example kernel_report -- --cubin fa2_fwd_d64.sm_90.cubin --arch sm_90 \
//!     --kernel 'FA2 fwd d64=flash_fwd_kernel:128:49152:256'
//! ```
//!
//! `--kernel LABEL=SYMBOL:THREADS:DYNAMIC_SMEM[:TILE_HMMA]`: SYMBOL is the function's symbol or a
//! unique substring of it; TILE_HMMA the HMMA one warp issues per tile (for barriers per tile).
//! `--manifest FILE`: several cubins in one table, a line per kernel:
//! `CUBIN | ARCH | LABEL | SYMBOL | THREADS | DYNAMIC_SMEM | TILE_HMMA` (`#` starts a comment;
//! relative cubin paths are relative to the manifest).
//! cuobjdump and nvdisasm are installed into the cache from NVIDIA's wheels when missing.

use anyhow::{bail, Context, Result};
use clap::Parser;
use prefix_tune::kernel_report::{self, Arch, KernelConfig, Tools};

#[derive(Parser)]
struct Args {
    /// A cubin to report on instead of the embedded kernels.
    #[arg(long)]
    cubin: Option<std::path::PathBuf>,
    /// The cubin's architecture (sm_80 or sm_90).
    #[arg(long, default_value = "sm_90")]
    arch: String,
    /// LABEL=SYMBOL:THREADS:DYNAMIC_SMEM[:TILE_HMMA], one per kernel of --cubin.
    #[arg(long)]
    kernel: Vec<String>,
    /// A manifest of cubins and kernels (see the module docs).
    #[arg(long)]
    manifest: Option<std::path::PathBuf>,
    /// Print JSON rows instead of markdown.
    #[arg(long)]
    json: bool,
    /// Do not install cuobjdump/nvdisasm when missing.
    #[arg(long)]
    no_install: bool,
}

fn parse_kernel(spec: &str) -> Result<KernelConfig> {
    let (label, rest) = spec
        .split_once('=')
        .with_context(|| format!("--kernel {spec:?}: expected LABEL=SYMBOL:THREADS:SMEM"))?;
    let parts: Vec<&str> = rest.split(':').collect();
    if parts.len() < 3 || parts.len() > 4 {
        bail!("--kernel {spec:?}: expected LABEL=SYMBOL:THREADS:SMEM[:TILE_HMMA]");
    }
    Ok(KernelConfig {
        label: label.to_string(),
        symbol: parts[0].to_string(),
        threads: parts[1].parse().context("threads")?,
        dynamic_smem: parts[2].parse().context("dynamic shared memory")?,
        tile_hmma: parts
            .get(3)
            .map(|t| t.parse())
            .transpose()
            .context("tile HMMA")?,
    })
}

fn manifest_rows(tools: &Tools, path: &std::path::Path) -> Result<Vec<kernel_report::KernelRow>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let base = path.parent().unwrap_or(std::path::Path::new("."));
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('|').map(str::trim).collect();
        if f.len() != 7 {
            bail!(
                "{}:{}: expected 7 fields separated by |",
                path.display(),
                n + 1
            );
        }
        let config = KernelConfig {
            label: f[2].to_string(),
            symbol: f[3].to_string(),
            threads: f[4].parse().context("threads")?,
            dynamic_smem: f[5].parse().context("dynamic shared memory")?,
            tile_hmma: Some(f[6].parse().context("tile HMMA")?),
        };
        rows.extend(tools.rows(&base.join(f[0]), Arch::parse(f[1])?, &[config])?);
    }
    Ok(rows)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let tools = Tools::find_or_install(!a.no_install)?;
    let rows = match (&a.manifest, &a.cubin) {
        (Some(m), _) => manifest_rows(&tools, m)?,
        (None, Some(cubin)) => {
            let configs = a
                .kernel
                .iter()
                .map(|k| parse_kernel(k))
                .collect::<Result<Vec<_>>>()?;
            if configs.is_empty() {
                bail!("--cubin needs at least one --kernel");
            }
            tools.rows(cubin, Arch::parse(&a.arch)?, &configs)?
        }
        (None, None) => kernel_report::embedded_report(&tools)?,
    };
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print!("{}", kernel_report::markdown(&rows));
    }
    Ok(())
}
