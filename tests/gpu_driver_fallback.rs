//! The fallback for drivers older than the embedded CUDA 13 kernel images (src/cuda/rtc.rs): on
//! the simulated device at CUDA 12.8 (an R570 driver, `PTSIM_DRIVER_VERSION=12080`), which
//! refuses PTX ISA 9.0 and the 13.0 cubin as a real one does, the kernels are compiled at run
//! time by a real NVRTC 12.8 (installed by scripts/setup into `<cache>/nvrtc-12.8`), cached on
//! disk, and loaded; a corrupt cache entry is recompiled; an NVRTC newer than the driver, missing
//! CUDA headers and a bad `PREFIX_TUNE_KERNELS` are refused with errors that say so. Each case
//! runs `prefix-tune info` in a child process (the NVRTC library is found through the child's
//! `LD_LIBRARY_PATH`) with its own cache directory.
//!
//! That the kernels compiled this way compute what the embedded ones do is checked by running
//! the GPU test suites themselves on them: scripts/test runs `gpu_engine_tiny`,
//! `gpu_attention_cases` and this file at CUDA 12.8 with NVRTC 12.8 on the library path, where
//! [`kernels_come_from_nvrtc_when_the_driver_is_old`] checks that the context really loaded
//! NVRTC's PTX.
//!
//! Skips visibly off the simulator or without the NVRTC 12.8 wheels; fails instead under
//! `PREFIX_TUNE_REQUIRE_SIM=1` / `PREFIX_TUNE_REQUIRE_ASSETS=1`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use prefix_tune::cuda::context::{driver_cuda_version, MIN_DRIVER_CUDA_VERSION};

/// `<cache>/nvrtc-12.8`: (the directory of libnvrtc.so.12, the one of cuda_fp16.h).
fn nvrtc_12_8(test: &str) -> Option<(PathBuf, PathBuf)> {
    if !common::simulator_or_skip(test) {
        return None;
    }
    let root = prefix_tune::assets::cache_dir().join("nvrtc-12.8/nvidia");
    let lib = root.join("cuda_nvrtc/lib");
    let include = root.join("cuda_runtime/include");
    if lib.join("libnvrtc.so.12").is_file() && include.join("cuda_fp16.h").is_file() {
        return Some((lib, include));
    }
    common::skip(
        "PREFIX_TUNE_REQUIRE_ASSETS",
        test,
        &format!("no NVRTC 12.8 in {} (run scripts/setup)", root.display()),
    );
    None
}

/// `prefix-tune info` at driver `version` with `lib` first on the library path (none: the
/// inherited path only), the CUDA headers `include` and the cache `cache`; (success, stdout +
/// stderr).
fn info(
    version: &str,
    lib: Option<&Path>,
    include: &Path,
    cache: &Path,
    extra: &[(&str, &str)],
) -> (bool, String) {
    // The inherited path without any directory that holds an NVRTC (scripts/test runs this file
    // with NVRTC 12.8 on it too).
    let inherited = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !Path::new(d).join("libnvrtc.so.12").exists())
        .filter(|d| !Path::new(d).join("libnvrtc.so.13").exists())
        .filter(|d| !Path::new(d).join("libnvrtc.so").exists())
        .collect::<Vec<_>>()
        .join(":");
    let path = match lib {
        Some(l) => format!("{}:{inherited}", l.display()),
        None => inherited,
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prefix-tune"));
    cmd.arg("info")
        .env("PTSIM_DRIVER_VERSION", version)
        .env("LD_LIBRARY_PATH", path)
        .env("PREFIX_TUNE_CUDA_INCLUDE", include)
        .env("PREFIX_TUNE_CACHE", cache)
        .env_remove("PREFIX_TUNE_KERNELS");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running prefix-tune info");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    (out.status.success(), text)
}

/// The cached PTX files, sorted.
fn cached(cache: &Path) -> Vec<PathBuf> {
    let dir = cache.join("kernels/nvrtc-12.8");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == "ptx"));
    v.sort();
    v
}

#[test]
fn an_r570_driver_runs_the_kernels_compiled_by_nvrtc_and_cached() {
    let test = "an_r570_driver_runs_the_kernels_compiled_by_nvrtc_and_cached";
    let Some((lib, include)) = nvrtc_12_8(test) else {
        return;
    };
    let modules = prefix_tune::cuda::modules::MODULES.len();
    assert!(modules > 0, "this build has no kernels");
    let cache = tempfile::tempdir().unwrap();

    // First run: every module compiled, none from the cache; the PTX is NVRTC 12.8's (ISA 8.7).
    let (ok, out) = info("12080", Some(&lib), &include, cache.path(), &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("compiled at run time by NVRTC 12.8 (0 from the cache"),
        "{out}"
    );
    assert!(!out.contains("none usable"), "{out}");
    let files = cached(cache.path());
    assert_eq!(files.len(), modules, "{files:?}");
    for f in &files {
        let ptx = std::fs::read_to_string(f).unwrap();
        assert!(
            ptx.contains(".version 8.7") && ptx.contains(".target sm_80"),
            "{}",
            f.display()
        );
    }

    // Second run: all from the cache.
    let (ok, out) = info("12080", Some(&lib), &include, cache.path(), &[]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("({modules} from the cache")), "{out}");

    // A corrupt entry is compiled again (and rewritten); the others still come from the cache.
    std::fs::write(&files[0], "garbage, not PTX").unwrap();
    let (ok, out) = info("12080", Some(&lib), &include, cache.path(), &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("({} from the cache", modules - 1)),
        "{out}"
    );
    assert!(std::fs::read_to_string(&files[0])
        .unwrap()
        .contains(".version 8.7"));

    // An entry that looks whole (its ISA and every kernel named) but does not load: recompiled
    // once, rewritten.
    let m0 = prefix_tune::cuda::modules::MODULES
        .iter()
        .find(|m| {
            files[0]
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("{}-", m.name))
        })
        .expect("the cache file names its module");
    let mut fake = String::from(".version 8.7\n.target sm_80\n.address_size 64\n");
    for e in m0.entries {
        fake.push_str(&format!(".visible .entry {e}(\n"));
    }
    std::fs::write(&files[0], fake).unwrap();
    let (ok, out) = info("12080", Some(&lib), &include, cache.path(), &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("({} from the cache", modules - 1)),
        "{out}"
    );
    assert!(std::fs::read_to_string(&files[0]).unwrap().len() > 1000);

    // PREFIX_TUNE_KERNELS=nvrtc on a CUDA 13.0 driver uses NVRTC too; =embedded on CUDA 12.8
    // refuses, naming the setting.
    let (ok, out) = info(
        "13000",
        Some(&lib),
        &include,
        cache.path(),
        &[("PREFIX_TUNE_KERNELS", "nvrtc")],
    );
    assert!(ok && out.contains("by NVRTC 12.8"), "{out}");
    let (_, out) = info(
        "12080",
        Some(&lib),
        &include,
        cache.path(),
        &[("PREFIX_TUNE_KERNELS", "embedded")],
    );
    assert!(
        out.contains("none usable") && out.contains("PREFIX_TUNE_KERNELS=embedded"),
        "{out}"
    );
}

#[test]
fn the_fallback_refuses_what_cannot_work_and_says_why() {
    let test = "the_fallback_refuses_what_cannot_work_and_says_why";
    let Some((lib, include)) = nvrtc_12_8(test) else {
        return;
    };
    let cache = tempfile::tempdir().unwrap();
    // An NVRTC newer than the driver: its PTX would be refused, so it is not tried.
    let (_, out) = info("12060", Some(&lib), &include, cache.path(), &[]);
    assert!(out.contains("none usable"), "{out}");
    assert!(
        out.contains("NVRTC 12.8 is newer than the driver (CUDA 12.6)"),
        "{out}"
    );
    assert!(cached(cache.path()).is_empty());
    // A driver below the fallback's floor (CUDA 12.2).
    let (_, out) = info("12000", Some(&lib), &include, cache.path(), &[]);
    assert!(
        out.contains("none usable") && out.contains("needs a driver for CUDA 12.2 or newer"),
        "{out}"
    );
    // No NVRTC on the library path: the old-driver message, and why there is no fallback.
    let (_, out) = info("12080", None, &include, cache.path(), &[]);
    assert!(
        out.contains("none usable") && out.contains("R580") && out.contains("no NVRTC library"),
        "{out}"
    );
    // Headers that are not there.
    let nowhere = cache.path().join("no-such-include");
    let (_, out) = info("12080", Some(&lib), &nowhere, cache.path(), &[]);
    assert!(
        out.contains("PREFIX_TUNE_CUDA_INCLUDE") && out.contains("no cuda_fp16.h"),
        "{out}"
    );
    // A bad choice of source.
    let (_, out) = info(
        "13000",
        Some(&lib),
        &include,
        cache.path(),
        &[("PREFIX_TUNE_KERNELS", "jit")],
    );
    assert!(
        out.contains("PREFIX_TUNE_KERNELS=\"jit\"") && out.contains("auto, embedded or nvrtc"),
        "{out}"
    );
}

/// In this process: a driver older than the embedded images means the context loaded NVRTC's
/// PTX (scripts/test runs this file at CUDA 12.8 beside the GPU suites, so this is what shows
/// that those suites ran on NVRTC-compiled kernels); a CUDA 13 driver loads the embedded ones
/// unless `PREFIX_TUNE_KERNELS` says otherwise.
#[test]
fn kernels_come_from_nvrtc_when_the_driver_is_old() {
    let test = "kernels_come_from_nvrtc_when_the_driver_is_old";
    let Some(gpu) = common::gpu_or_skip(test) else {
        return;
    };
    let d = gpu.description();
    let old = driver_cuda_version().is_some_and(|v| v < MIN_DRIVER_CUDA_VERSION);
    let forced = std::env::var("PREFIX_TUNE_KERNELS").is_ok_and(|v| v == "nvrtc");
    println!("  {d}");
    assert_eq!(
        d.contains("compiled at run time by NVRTC"),
        old || forced,
        "{d}"
    );
}
