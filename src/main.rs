//! The `prefix-tune` binary: everything lives in [`prefix_tune::cli`].

fn main() -> std::process::ExitCode {
    prefix_tune::cli::main()
}
