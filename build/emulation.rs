//! Host emulation of the CUDA kernels: compiles `kernels/host/emulation.cpp` (which includes the
//! real `.cu` sources through a small shim, see `kernels/host/`) with the `cc` crate as C++20 at
//! `-O2`, links it into the crate and sets `cfg(prefix_tune_emulation)`, so tests can run the
//! kernels on a CPU. It needs the CUDA toolkit's headers (`cuda_fp16.h`) but no GPU and no nvcc
//! run. Without them it is skipped with a warning (the emulated tests then skip visibly), or fails
//! when `PREFIX_TUNE_REQUIRE_KERNELS=1`.
use std::env;
use std::path::{Path, PathBuf};

/// Builds the host emulation of the kernels. `cuda_include` is the CUDA toolkit's include
/// directory when nvcc was found.
pub fn compile_host_emulation(cuda_include: Option<&Path>) {
    println!("cargo::rustc-check-cfg=cfg(prefix_tune_emulation)");
    let require = env::var("PREFIX_TUNE_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let include = match cuda_include.filter(|dir| dir.join("cuda_fp16.h").is_file()) {
        Some(dir) => dir.to_path_buf(),
        None => {
            let msg = "CUDA include directory (cuda_fp16.h) not found: the host emulation of the \
                       kernels is not built and the emulated kernel tests will skip. Run \
                       `bash scripts/setup` and rebuild.";
            if require {
                panic!("PREFIX_TUNE_REQUIRE_KERNELS=1: {msg}");
            }
            println!("cargo:warning={msg}");
            return;
        }
    };
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let kernels = root.join("kernels");
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .file(kernels.join("host").join("emulation.cpp"))
        // The model-layer kernels (embedding, norm, activation, rope, cross_entropy).
        .file(kernels.join("host").join("emulation_model_ops.cpp"))
        // The KV-cache decode attention.
        .file(kernels.join("host").join("emulation_decode.cpp"))
        // The optimizer steps and the sum-of-squares reduction.
        .file(kernels.join("host").join("emulation_optim.cpp"))
        // The reparameterization MLP's fp32 matmul and column sums.
        .file(kernels.join("host").join("emulation_reparam.cpp"))
        .include(&kernels)
        .include(kernels.join("host"))
        .include(&include)
        .define("PT_HOST_EMULATION", None)
        .opt_level(2)
        .debug(false)
        .flag("-pthread")
        .flag_if_supported("-Wno-unknown-pragmas")
        .compile("prefix_tune_emulation");
    println!("cargo:rustc-link-lib=pthread");
    println!("cargo:rustc-cfg=prefix_tune_emulation");
}
