//! Compiling `kernels/*.cu` with nvcc: finding the compiler, building PTX (compute_80) and an
//! sm_90 cubin per file, and reading ptxas' resource report (registers, spills, stack frame).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The CUDA toolkit version the setup script installs (PyPI wheels) and the crate targets.
pub const PINNED_CUDA: &str = "13.0.88";

/// Where fetched assets live: `$PREFIX_TUNE_CACHE`, else `${XDG_CACHE_HOME:-$HOME/.cache}/prefix-tune`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = env::var_os("PREFIX_TUNE_CACHE").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir).join("prefix-tune"));
    }
    env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|home| PathBuf::from(home).join(".cache").join("prefix-tune"))
}

/// A working nvcc: its path and the first line of `nvcc --version` that names the release.
pub struct Nvcc {
    pub path: PathBuf,
    pub version: String,
}

impl Nvcc {
    /// The toolkit's include directory (`<bin>/../include`), when it exists.
    pub fn include_dir(&self) -> Option<PathBuf> {
        let dir = self.path.parent()?.parent()?.join("include");
        dir.is_dir().then_some(dir)
    }
}

/// Finds nvcc: `$NVCC`, `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, `PATH`, then the pinned
/// toolchain installed by scripts/setup. A candidate counts only if `nvcc --version` runs;
/// broken candidates are reported in `rejected`.
pub fn find_nvcc(rejected: &mut Vec<String>) -> Option<Nvcc> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        candidates.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var).filter(|v| !v.is_empty()) {
            candidates.push(PathBuf::from(root).join("bin").join("nvcc"));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let exe = dir.join("nvcc");
            if exe.is_file() {
                candidates.push(exe);
            }
        }
    }
    if let Some(cache) = cache_dir() {
        candidates.push(
            cache
                .join(format!("cuda-{PINNED_CUDA}"))
                .join("nvidia/cu13/bin/nvcc"),
        );
    }
    for path in candidates {
        if !path.is_file() {
            continue;
        }
        match Command::new(&path).arg("--version").output() {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout);
                let version = text
                    .lines()
                    .find(|l| l.contains("release"))
                    .unwrap_or("unknown version")
                    .trim()
                    .to_string();
                return Some(Nvcc { path, version });
            }
            Ok(out) => rejected.push(format!(
                "{} --version failed ({}): {}",
                path.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => rejected.push(format!("{} could not run: {e}", path.display())),
        }
    }
    None
}

/// ptxas' report for one function (`-Xptxas -v`).
#[derive(Debug, Default, Clone)]
pub struct FunctionReport {
    pub name: String,
    /// true for `__global__` entry points, false for non-inlined device functions
    pub entry: bool,
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub shared_bytes: u32,
}

impl FunctionReport {
    /// Local memory in use: spills or a stack frame.
    pub fn uses_local_memory(&self) -> bool {
        self.stack_bytes != 0 || self.spill_stores != 0 || self.spill_loads != 0
    }
}

/// One compiled `kernels/<name>.cu`.
pub struct CompiledModule {
    pub name: String,
    pub ptx: PathBuf,
    pub cubin_sm90: PathBuf,
    pub functions: Vec<FunctionReport>,
}

fn number_before(text: &str, suffix: &str) -> Option<u32> {
    let idx = text.find(suffix)?;
    text[..idx].split_whitespace().last()?.parse().ok()
}

/// Parses ptxas' `-v` output into one report per function, in order of appearance.
pub fn parse_ptxas_report(text: &str) -> Vec<FunctionReport> {
    let mut reports: Vec<FunctionReport> = Vec::new();
    let mut entries: Vec<String> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            if let Some(name) = rest.split('\'').next() {
                entries.push(name.to_string());
            }
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            let name = rest.trim().to_string();
            let entry = entries.contains(&name);
            reports.push(FunctionReport {
                name,
                entry,
                ..FunctionReport::default()
            });
        } else if line.contains("bytes stack frame") {
            if let Some(r) = reports.last_mut() {
                r.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(u32::MAX);
                r.spill_stores = number_before(line, "bytes spill stores").unwrap_or(u32::MAX);
                r.spill_loads = number_before(line, "bytes spill loads").unwrap_or(u32::MAX);
            }
        } else if line.contains("Used ") && line.contains(" registers") {
            if let Some(r) = reports.last_mut() {
                r.registers = number_before(line, " registers").unwrap_or(0);
                r.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    reports
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| format!("could not run {shown}: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "{shown} failed ({}):\n{stdout}{stderr}",
            out.status
        ));
    }
    Ok(format!("{stdout}{stderr}"))
}

/// Compiles one `.cu` file to `<out>/<name>.ptx` (compute_80) and `<out>/<name>.sm_90.cubin`.
pub fn compile_module(
    nvcc: &Nvcc,
    source: &Path,
    include: &Path,
    out_dir: &Path,
) -> Result<CompiledModule, String> {
    let name = source
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| format!("bad kernel file name {}", source.display()))?
        .to_string();
    let ptx = out_dir.join(format!("{name}.ptx"));
    let cubin = out_dir.join(format!("{name}.sm_90.cubin"));
    let common = |cmd: &mut Command| {
        cmd.arg("-O3")
            .arg("-std=c++17")
            .arg("-lineinfo")
            .arg("-I")
            .arg(include)
            .arg(source);
    };
    let mut ptx_cmd = Command::new(&nvcc.path);
    ptx_cmd
        .arg("-ptx")
        .arg("-arch=compute_80")
        .arg("-o")
        .arg(&ptx);
    common(&mut ptx_cmd);
    run(&mut ptx_cmd)?;
    let mut cubin_cmd = Command::new(&nvcc.path);
    cubin_cmd
        .arg("-cubin")
        .arg("-arch=sm_90")
        .arg("-Xptxas")
        .arg("-v")
        .arg("-o")
        .arg(&cubin);
    common(&mut cubin_cmd);
    let report = run(&mut cubin_cmd)?;
    Ok(CompiledModule {
        name,
        ptx,
        cubin_sm90: cubin,
        functions: parse_ptxas_report(&report),
    })
}
