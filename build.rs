//! Build script: compiles `kernels/*.cu` with nvcc (PTX for compute_80 and a cubin for sm_90,
//! rejecting any kernel that spills or uses a stack frame), embeds them through
//! `$OUT_DIR/kernels.rs`, and runs bindgen on `kernels/abi.h` into `$OUT_DIR/abi.rs`.
//!
//! Without nvcc the crate still builds, CPU only: `MODULES` is empty and `cfg(prefix_tune_kernels)`
//! is unset. `PREFIX_TUNE_REQUIRE_KERNELS=1` turns a missing nvcc or a failed kernel into an error.
//! Helpers live in `build/` (included with `#[path]`).

#[path = "build/bindings.rs"]
mod bindings;
#[allow(dead_code)] // include_dir is used by sim/cuda/build.rs, which shares this file
#[path = "build/nvcc.rs"]
mod nvcc;

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

const ENV_VARS: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "PREFIX_TUNE_CACHE",
    "XDG_CACHE_HOME",
    "HOME",
    "PREFIX_TUNE_REQUIRE_KERNELS",
    "LIBCLANG_PATH",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build");
    println!("cargo:rerun-if-changed=kernels");
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo::rustc-check-cfg=cfg(prefix_tune_kernels)");

    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let kernels_dir = root.join("kernels");
    let require = env::var("PREFIX_TUNE_REQUIRE_KERNELS").is_ok_and(|v| v == "1");

    bindings::generate_abi(
        &kernels_dir.join("abi.h"),
        &kernels_dir,
        &out_dir.join("abi.rs"),
    );

    let mut rejected = Vec::new();
    let found = nvcc::find_nvcc(&mut rejected);
    for r in &rejected {
        println!("cargo:warning=ignoring nvcc candidate: {r}");
    }
    let modules = match &found {
        Some(nvcc) => build_kernels(nvcc, &kernels_dir, &out_dir, require),
        None => {
            let missing = "nvcc not found ($NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, or the \
                           toolchain from scripts/setup)";
            let how = "Run `bash scripts/setup` (installs the CUDA 13.0 nvcc into the cache) and \
                       rebuild.";
            if require {
                panic!("PREFIX_TUNE_REQUIRE_KERNELS=1 but {missing}. {how}");
            }
            let msg = format!("{missing}: building CPU only, without CUDA kernels. {how}");
            println!("cargo:warning={msg}");
            Vec::new()
        }
    };
    if !modules.is_empty() {
        println!("cargo:rustc-cfg=prefix_tune_kernels");
    }
    write_module_table(&modules, &kernels_dir, &out_dir.join("kernels.rs"));
}

/// Compiles every `kernels/*.cu` (in parallel); returns them all, or none when any failed
/// (panicking instead when `require`). Spills or stack frames always fail the build.
fn build_kernels(
    nvcc: &nvcc::Nvcc,
    kernels_dir: &Path,
    out_dir: &Path,
    require: bool,
) -> Vec<nvcc::CompiledModule> {
    let mut sources: Vec<PathBuf> = fs::read_dir(kernels_dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", kernels_dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    let target = out_dir.join("kernels");
    fs::create_dir_all(&target).unwrap_or_else(|e| panic!("creating {}: {e}", target.display()));

    let results: Vec<Result<nvcc::CompiledModule, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| s.spawn(|| nvcc::compile_module(nvcc, src, kernels_dir, &target)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("nvcc thread panicked".into()))
            })
            .collect()
    });

    let mut modules = Vec::new();
    let mut errors = Vec::new();
    let mut local_memory = Vec::new();
    for result in results {
        match result {
            Ok(m) => {
                for f in &m.functions {
                    println!(
                        "cargo:warning=kernel {}::{}{} sm_90: {} registers, {} B smem, {} B stack, \
                         {} B spill stores, {} B spill loads",
                        m.name,
                        f.name,
                        if f.entry { "" } else { " (device function)" },
                        f.registers,
                        f.shared_bytes,
                        f.stack_bytes,
                        f.spill_stores,
                        f.spill_loads
                    );
                    if f.uses_local_memory() {
                        local_memory.push(format!("{}::{}", m.name, f.name));
                    }
                }
                modules.push(m);
            }
            Err(e) => errors.push(e),
        }
    }
    if !local_memory.is_empty() {
        panic!(
            "kernels use local memory (register spills or a stack frame), which is not allowed: {}. \
             See the cargo:warning lines above for the ptxas report.",
            local_memory.join(", ")
        );
    }
    if !errors.is_empty() {
        let all = errors.join("\n\n");
        if require {
            panic!(
                "PREFIX_TUNE_REQUIRE_KERNELS=1 and kernel compilation failed ({}):\n{all}",
                nvcc.version
            );
        }
        for line in all.lines().take(60) {
            println!("cargo:warning={line}");
        }
        println!(
            "cargo:warning=kernel compilation failed with {} ({}): building CPU only, without kernels",
            nvcc.path.display(),
            nvcc.version
        );
        return Vec::new();
    }
    modules
}

/// Writes `pub static MODULES: &[KernelModule]` embedding every module's PTX, cubin and source,
/// and `pub static KERNEL_HEADERS` (every header the sources include, for run-time compilation
/// with NVRTC when a driver refuses the embedded images; see src/cuda/rtc.rs).
fn write_module_table(modules: &[nvcc::CompiledModule], kernels_dir: &Path, out: &Path) {
    let mut text = String::from(
        "// Generated by build.rs: the CUDA modules compiled from kernels/*.cu.\n\
         pub static MODULES: &[KernelModule] = &[\n",
    );
    for m in modules {
        let entries: Vec<String> = m
            .functions
            .iter()
            .filter(|f| f.entry)
            .map(|f| format!("{:?}", f.name))
            .collect();
        writeln!(
            text,
            "    KernelModule {{ name: {:?}, ptx: include_str!({:?}), cubin_sm90: include_bytes!({:?}), \
             source: include_str!({:?}), entries: &[{}] }},",
            m.name,
            path_str(&m.ptx),
            path_str(&m.cubin_sm90),
            path_str(&kernels_dir.join(format!("{}.cu", m.name))),
            entries.join(", ")
        )
        .unwrap();
    }
    text.push_str("];\n");
    // (name the sources include it by, file): kernels/**/*.{h,cuh} but the host emulation's, and
    // kernels/rtc/*.h under their bare names (NVRTC has no C library headers).
    text.push_str("pub static KERNEL_HEADERS: &[(&str, &str)] = &[\n");
    for (name, path) in kernel_headers(kernels_dir) {
        writeln!(text, "    ({name:?}, include_str!({:?})),", path_str(&path)).unwrap();
    }
    text.push_str("];\n");
    let tmp = out.with_extension("rs.tmp");
    fs::write(&tmp, text).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    fs::rename(&tmp, out).unwrap_or_else(|e| panic!("renaming to {}: {e}", out.display()));
}

/// The headers of `kernels/` as (include name, path), sorted; see [`write_module_table`].
fn kernel_headers(kernels_dir: &Path) -> Vec<(String, PathBuf)> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) {
        let entries =
            fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        for e in entries.filter_map(|e| e.ok()) {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                // host/: the CPU emulation's headers; testing/: deliberately broken kernels;
                // rtc/: NVRTC's stand-ins for C library headers, included by their bare names.
                let sub = match (prefix, name.as_str()) {
                    ("", "host" | "testing") => continue,
                    ("", "rtc") => String::new(),
                    _ => format!("{prefix}{name}/"),
                };
                walk(&path, &sub, out);
            } else if name.ends_with(".h") || name.ends_with(".cuh") {
                out.push((format!("{prefix}{name}"), path));
            }
        }
    }
    let mut out = Vec::new();
    walk(kernels_dir, "", &mut out);
    out.sort();
    out
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("OUT_DIR path is not UTF-8")
}
