//! bindgen on `kernels/abi.h`: the launch-parameter structs, enums and constants (`pt_*` / `PT_*`)
//! shared by the kernels and the Rust launch wrappers, written to `$OUT_DIR/abi.rs`.

use std::path::Path;

const LIBCLANG_HELP: &str = "bindgen could not load libclang, which the build needs to read \
kernels/abi.h. Get it with `bash scripts/setup` (then `source <cache>/env.sh`), or by hand: \
`apt-get install libclang-dev` (Debian/Ubuntu), or `pip install --target <dir> libclang` and \
`export LIBCLANG_PATH=<dir>/clang/native`.";

/// Generates `out` from `header`; panics with instructions when libclang is missing.
pub fn generate_abi(header: &Path, include: &Path, out: &Path) {
    let header = header
        .to_str()
        .expect("kernels/abi.h path is not UTF-8")
        .to_string();
    let include = format!("-I{}", include.display());
    // bindgen panics when libclang cannot be loaded; turn that into a message saying how to get it.
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(move || {
        bindgen::Builder::default()
            .header(header)
            .clang_args(["-x", "c", "-std=c11", include.as_str()])
            .allowlist_type("pt_.*")
            .allowlist_var("PT_.*")
            .default_enum_style(bindgen::EnumVariation::NewType {
                is_bitfield: false,
                is_global: false,
            })
            .derive_default(true)
            .derive_debug(true)
            .derive_partialeq(true)
            .layout_tests(true)
            .generate_comments(true)
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
            .generate()
    });
    std::panic::set_hook(previous_hook);
    match result {
        Ok(Ok(bindings)) => bindings
            .write_to_file(out)
            .unwrap_or_else(|e| panic!("writing {}: {e}", out.display())),
        Ok(Err(e)) => panic!("bindgen failed on kernels/abi.h: {e}"),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            if msg.contains("libclang") {
                panic!("{LIBCLANG_HELP}\n(bindgen said: {msg})");
            }
            panic!("bindgen panicked on kernels/abi.h: {msg}");
        }
    }
}
