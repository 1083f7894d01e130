//! `scripts/setup`'s libclang detection (run in its detect-only mode, which stops before installing
//! anything and prints the library it chose): a directory holding only `libclang-cpp` (clang's
//! C++ library, all that a Debian machine without `libclang-dev` has) or a file that is named like
//! libclang but does not load must be refused, also through `LIBCLANG_PATH`; a real libclang is
//! accepted. The real one is the one `scripts/setup` recorded in `LIBCLANG_PATH` (scripts/test
//! sources it); without it that case is skipped visibly, or fails under
//! `PREFIX_TUNE_REQUIRE_ASSETS=1`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn setup() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/setup")
}

/// Runs the detection with only `search` searched (and `libclang_path` as LIBCLANG_PATH);
/// returns the chosen library (empty when none) and stderr.
fn detect(search: &Path, libclang_path: Option<&Path>) -> (String, String) {
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("bash");
    cmd.arg(setup())
        .env("PREFIX_TUNE_CACHE", cache.path())
        .env("PREFIX_TUNE_LIBCLANG_SEARCH", search)
        .env("PREFIX_TUNE_SETUP_DETECT_ONLY", "1")
        .env_remove("LIBCLANG_PATH");
    if let Some(p) = libclang_path {
        cmd.env("LIBCLANG_PATH", p);
    }
    let out = cmd.output().expect("running bash scripts/setup");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "setup's detection failed: {stdout}{stderr}"
    );
    let chosen = stdout
        .lines()
        .find_map(|l| l.strip_prefix("libclang="))
        .unwrap_or_else(|| panic!("no libclang= line in {stdout:?}"))
        .to_string();
    (chosen, stderr)
}

/// A directory holding only a `libclang-cpp.so.14`: the real one when the machine has it, else a
/// stand-in file of that name.
fn cpp_only_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let real = ["/usr/lib/llvm-14/lib", "/usr/lib/x86_64-linux-gnu"]
        .iter()
        .map(|d| Path::new(d).join("libclang-cpp.so.14"))
        .find(|p| p.is_file());
    let dst = dir.path().join("libclang-cpp.so.14");
    match real {
        Some(p) => std::fs::copy(p, &dst).map(|_| ()).unwrap(),
        None => std::fs::write(&dst, b"not a library").unwrap(),
    }
    dir
}

#[test]
fn libclang_cpp_alone_is_refused() {
    let dir = cpp_only_dir();
    let (chosen, stderr) = detect(dir.path(), None);
    assert_eq!(
        chosen, "",
        "setup took {chosen} for libclang; stderr: {stderr}"
    );
    assert!(
        stderr.contains("libclang-cpp is clang's C++ library"),
        "setup did not say why it ignored libclang-cpp: {stderr}"
    );
    // Through LIBCLANG_PATH too.
    let (chosen, _) = detect(dir.path(), Some(dir.path()));
    assert_eq!(chosen, "", "setup took {chosen} from LIBCLANG_PATH");
}

#[test]
fn a_file_named_libclang_that_does_not_load_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("libclang.so"), b"\x7fELF but not really").unwrap();
    std::fs::write(dir.path().join("libclang-14.so.1"), b"").unwrap();
    let (chosen, stderr) = detect(dir.path(), None);
    assert_eq!(chosen, "", "setup took {chosen}; stderr: {stderr}");
    assert!(
        stderr.contains("does not load as libclang"),
        "setup did not say why it ignored the files: {stderr}"
    );
}

#[test]
fn a_real_libclang_is_accepted_next_to_libclang_cpp() {
    let Some(real_dir) = std::env::var_os("LIBCLANG_PATH").map(PathBuf::from) else {
        common::skip(
            "PREFIX_TUNE_REQUIRE_ASSETS",
            "a_real_libclang_is_accepted_next_to_libclang_cpp",
            "LIBCLANG_PATH is not set (source scripts/env.sh after scripts/setup)",
        );
        return;
    };
    // The file setup chose for that directory (it must accept its own choice).
    let (real, stderr) = detect(&real_dir, None);
    assert!(
        !real.is_empty(),
        "setup refused the libclang it recorded in LIBCLANG_PATH={}: {stderr}",
        real_dir.display()
    );
    let dir = cpp_only_dir();
    let link = dir.path().join(Path::new(&real).file_name().unwrap());
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let (chosen, stderr) = detect(dir.path(), None);
    assert_eq!(
        Path::new(&chosen),
        link,
        "setup did not take the real libclang next to libclang-cpp; stderr: {stderr}"
    );
    assert!(!chosen.contains("libclang-cpp"));
}
