//! `prefix-tune info`: what a model is (architecture, sizes, tokenizer, parameters), what a
//! prefix of a given length costs on it, and whether a GPU and the kernels are available.
//! Without `--model` only the machine: the GPU (or why none is usable) and the kernels.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use serde_json::json;

use super::{load_model_arg, positive_usize};

/// Arguments of `prefix-tune info`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  prefix-tune info --model ~/.cache/prefix-tune/models/SmolLM2-135M-Instruct.Q4_1.gguf
  prefix-tune info --model tests/fixtures/gpt2_tiny --prefix-len 10 --json
  prefix-tune info            # only the GPU and the kernels")]
pub struct InfoArgs {
    /// The model: an HF directory (config.json + safetensors + tokenizer) or a .gguf file.
    /// Without it, only the GPU and the kernels are described.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prefix length (virtual tokens) whose cost to report.
    #[arg(long, default_value_t = 10, value_parser = positive_usize)]
    pub prefix_len: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `prefix-tune info`.
pub fn run(args: InfoArgs) -> Result<()> {
    let Some(model) = &args.model else {
        return machine(args.json);
    };
    let m = load_model_arg(model)?;
    let c = &m.weights.config;
    let n_params = m.weights.n_params();
    let p = args.prefix_len;
    let prefix_params = 2 * c.n_layers * p * c.kv_dim();
    let percent = 100.0 * prefix_params as f64 / n_params as f64;
    let gpu = crate::cuda::gpu_available();
    let kernels = crate::cuda::kernels_built();
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = json!({
            "model": model.display().to_string(),
            "architecture": c.arch,
            "vocab_size": c.vocab_size,
            "d_model": c.d_model,
            "n_layers": c.n_layers,
            "n_heads": c.n_heads,
            "n_kv_heads": c.n_kv_heads,
            "head_dim": c.head_dim,
            "d_ff": c.d_ff,
            "max_positions": c.max_positions,
            "norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta,
            "tied_embeddings": c.tied_embeddings,
            "bos_token_id": c.bos_token_id,
            "eos_token_ids": c.eos_token_ids,
            "tokenizer": m.tokenizer.describe(),
            "parameters": n_params,
            "fingerprint": m.fingerprint,
            "prefix": {
                "len": p,
                "parameters": prefix_params,
                "percent_of_model": percent,
                "bytes_f32": prefix_params * 4,
            },
            "gpu": match &gpu { Ok(d) => json!(d), Err(_) => serde_json::Value::Null },
            "gpu_error": gpu.as_ref().err(),
            "driver_cuda_version": crate::cuda::context::driver_cuda_version(),
            "min_driver_cuda_version": crate::cuda::context::MIN_DRIVER_CUDA_VERSION,
            "min_driver_cuda_version_nvrtc": crate::cuda::context::MIN_DRIVER_CUDA_VERSION_NVRTC,
            "kernels_built": kernels,
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(out, "model          {}", model.display())?;
    writeln!(out, "architecture   {:?}", c.arch)?;
    writeln!(
        out,
        "sizes          {} layers, d_model {}, {} heads ({} kv heads) × head dim {}, d_ff {}",
        c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff
    )?;
    writeln!(
        out,
        "vocabulary     {} tokens; {} positions{}",
        c.vocab_size,
        c.max_positions,
        match c.arch {
            crate::model::Arch::Gpt2 => " (learned)".to_string(),
            crate::model::Arch::Llama => format!(" (RoPE θ = {})", c.rope_theta),
        }
    )?;
    writeln!(
        out,
        "head           {}",
        if c.tied_embeddings {
            "tied to the token embedding"
        } else {
            "separate"
        }
    )?;
    writeln!(out, "tokenizer      {}", m.tokenizer.describe())?;
    writeln!(
        out,
        "parameters     {n_params} ({:.1}M)",
        n_params as f64 / 1e6
    )?;
    writeln!(out, "fingerprint    {}", m.fingerprint)?;
    writeln!(
        out,
        "prefix of {p:<4} {prefix_params} parameters (2 × {} layers × {p} × kv dim {}) = {percent:.4}% of the model, {} in f32",
        c.n_layers,
        c.kv_dim(),
        human_bytes(prefix_params * 4)
    )?;
    machine_lines(&mut out, &gpu, kernels)
}

/// `prefix-tune info` without a model.
fn machine(json: bool) -> Result<()> {
    let gpu = crate::cuda::gpu_available();
    let kernels = crate::cuda::kernels_built();
    let mut out = std::io::stdout().lock();
    if json {
        let v = json!({
            "gpu": match &gpu { Ok(d) => json!(d), Err(_) => serde_json::Value::Null },
            "gpu_error": gpu.as_ref().err(),
            "driver_cuda_version": crate::cuda::context::driver_cuda_version(),
            "min_driver_cuda_version": crate::cuda::context::MIN_DRIVER_CUDA_VERSION,
            "min_driver_cuda_version_nvrtc": crate::cuda::context::MIN_DRIVER_CUDA_VERSION_NVRTC,
            "kernels_built": kernels,
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    machine_lines(&mut out, &gpu, kernels)
}

/// The GPU, kernels and `--device auto` lines of the text output.
fn machine_lines(out: &mut impl Write, gpu: &Result<String, String>, kernels: bool) -> Result<()> {
    use crate::cuda::context::{
        cuda_version_string, driver_cuda_version, MIN_DRIVER_CUDA_VERSION,
        MIN_DRIVER_CUDA_VERSION_NVRTC,
    };
    match gpu {
        Ok(d) => writeln!(out, "GPU            {d}")?,
        Err(e) => writeln!(out, "GPU            none usable ({e})")?,
    }
    let min = cuda_version_string(MIN_DRIVER_CUDA_VERSION);
    let min_nvrtc = cuda_version_string(MIN_DRIVER_CUDA_VERSION_NVRTC);
    let need = format!(
        "the kernels need CUDA {min} or newer: driver R580+; from CUDA {min_nvrtc} (R535) \
         compiled at run time by the machine's NVRTC, no newer than the driver"
    );
    match driver_cuda_version() {
        Some(v) => writeln!(
            out,
            "driver         CUDA {} ({need})",
            cuda_version_string(v)
        )?,
        None => writeln!(out, "driver         none ({need})")?,
    }
    writeln!(
        out,
        "kernels        {}",
        if kernels {
            "built into this binary"
        } else {
            "not built (no nvcc at build time)"
        }
    )?;
    writeln!(
        out,
        "--device auto  {}",
        if gpu.is_ok() && kernels {
            "the CUDA engine on this GPU (if the model fits its kernels), else the CPU reference"
        } else {
            "the CPU reference engine (no usable GPU)"
        }
    )?;
    Ok(())
}

fn human_bytes(n: usize) -> String {
    if n < 1 << 10 {
        format!("{n} B")
    } else if n < 1 << 20 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    }
}
