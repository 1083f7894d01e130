//! The tiny models of the GPU engine tests (`gpu_engine_tiny`, `gpu_training`): both families
//! with head dim 64 (what the attention kernels support), weights and prefixes rounded to fp16
//! so that the GPU and the CPU reference see the same values.

use std::sync::Arc;

use prefix_tune::model::config::{Arch, ModelConfig, ModelWeights};
use prefix_tune::prefix::PrefixBank;
use prefix_tune::reference::testing::{random_bank, random_model, tiny_config};

pub fn round16(v: &mut [f32]) {
    v.iter_mut()
        .for_each(|x| *x = half::f16::from_f32(*x).to_f32());
}

pub fn config(arch: Arch) -> ModelConfig {
    let mut cfg = tiny_config(arch, arch == Arch::Gpt2);
    cfg.head_dim = 64;
    cfg.d_model = 96;
    cfg.vocab_size = 83;
    match arch {
        Arch::Gpt2 => {
            cfg.n_heads = 2;
            cfg.n_kv_heads = 2;
            cfg.d_ff = 160;
            cfg.max_positions = 48;
            cfg.bos_token_id = Some(82);
            cfg.eos_token_ids = vec![82];
        }
        Arch::Llama => {
            cfg.n_heads = 4; // q_dim 256 != d_model 96
            cfg.n_kv_heads = 2;
            cfg.d_ff = 112;
        }
    }
    cfg
}

pub struct Setup {
    pub weights: Arc<ModelWeights<f32>>,
    pub bank: PrefixBank<f32>,
}

pub fn setup(arch: Arch, seed: u64) -> Setup {
    let cfg = config(arch);
    let weights = Arc::new(
        random_model(&cfg, 0.08, seed)
            .cast::<f32>()
            .rounded_to_f16(),
    );
    let mut bank = random_bank(&cfg, 2, 5, 0.5, seed + 1).cast::<f32>();
    for v in bank.k.iter_mut().chain(bank.v.iter_mut()) {
        round16(v);
    }
    Setup { weights, bank }
}

pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb).max(f64::MIN_POSITIVE)
}

pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}
