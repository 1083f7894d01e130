//! Model architecture description and the frozen weights in one layout for every source format.
//!
//! Conventions (written once, here):
//! - every linear weight is stored `[out, in]` row-major (PyTorch `nn.Linear`); GPT-2's `Conv1D`
//!   weights (`[in, out]`) are transposed by the loaders;
//! - the fused GPT-2 QKV projection is split at load time into `wq`, `wk`, `wv` (and biases);
//! - Llama's q/k rows are in HF's layout (rotate-half RoPE); GGUF loaders undo llama.cpp's
//!   interleaved permutation;
//! - embeddings are `[vocab, d_model]`; an untied LM head is `[vocab, d_model]`.

use crate::real::Real;

/// Model family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// GPT-2: LayerNorm, learned positions, GELU-tanh MLP, biases, tied head.
    Gpt2,
    /// Llama: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, no biases.
    Llama,
}

/// Sizes and constants of a model.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Hidden size of the MLP.
    pub d_ff: usize,
    /// Largest number of positions (GPT-2's learned table size; Llama's nominal context).
    pub max_positions: usize,
    /// LayerNorm / RMSNorm epsilon.
    pub norm_eps: f64,
    /// RoPE base (Llama only).
    pub rope_theta: f64,
    /// Whether the LM head is the token embedding.
    pub tied_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Key/value width of one layer: `n_kv_heads · head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// Query width of one layer: `n_heads · head_dim`.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
}

/// Weights of one transformer block. Optional fields exist for one family only
/// (biases and LayerNorm shifts for GPT-2; `w_up` for Llama's SwiGLU).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerWeights<T> {
    /// Pre-attention norm scale `[d]` (and shift for LayerNorm).
    pub attn_norm_w: Vec<T>,
    pub attn_norm_b: Option<Vec<T>>,
    /// `[q_dim, d]`, `[kv_dim, d]`, `[kv_dim, d]`.
    pub wq: Vec<T>,
    pub wk: Vec<T>,
    pub wv: Vec<T>,
    pub bq: Option<Vec<T>>,
    pub bk: Option<Vec<T>>,
    pub bv: Option<Vec<T>>,
    /// Attention output `[d, q_dim]`.
    pub wo: Vec<T>,
    pub bo: Option<Vec<T>>,
    /// Pre-MLP norm.
    pub mlp_norm_w: Vec<T>,
    pub mlp_norm_b: Option<Vec<T>>,
    /// GPT-2: `c_fc` `[d_ff, d]`. Llama: `gate_proj` `[d_ff, d]`.
    pub w_in: Vec<T>,
    pub b_in: Option<Vec<T>>,
    /// Llama only: `up_proj` `[d_ff, d]`.
    pub w_up: Option<Vec<T>>,
    /// `[d, d_ff]` (`c_proj` / `down_proj`).
    pub w_out: Vec<T>,
    pub b_out: Option<Vec<T>>,
}

/// A whole frozen model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelWeights<T> {
    pub config: ModelConfig,
    /// `[vocab, d]`.
    pub tok_emb: Vec<T>,
    /// GPT-2 only: `[max_positions, d]`.
    pub pos_emb: Option<Vec<T>>,
    pub layers: Vec<LayerWeights<T>>,
    pub final_norm_w: Vec<T>,
    pub final_norm_b: Option<Vec<T>>,
    /// Untied head `[vocab, d]`; `None` when tied to `tok_emb`.
    pub lm_head: Option<Vec<T>>,
}

fn cast_vec<A: Real, B: Real>(v: &[A]) -> Vec<B> {
    crate::real::cast(v)
}

fn cast_opt<A: Real, B: Real>(v: &Option<Vec<A>>) -> Option<Vec<B>> {
    v.as_deref().map(cast_vec)
}

impl<T: Real> LayerWeights<T> {
    /// The same weights in another scalar type.
    pub fn cast<U: Real>(&self) -> LayerWeights<U> {
        LayerWeights {
            attn_norm_w: cast_vec(&self.attn_norm_w),
            attn_norm_b: cast_opt(&self.attn_norm_b),
            wq: cast_vec(&self.wq),
            wk: cast_vec(&self.wk),
            wv: cast_vec(&self.wv),
            bq: cast_opt(&self.bq),
            bk: cast_opt(&self.bk),
            bv: cast_opt(&self.bv),
            wo: cast_vec(&self.wo),
            bo: cast_opt(&self.bo),
            mlp_norm_w: cast_vec(&self.mlp_norm_w),
            mlp_norm_b: cast_opt(&self.mlp_norm_b),
            w_in: cast_vec(&self.w_in),
            b_in: cast_opt(&self.b_in),
            w_up: cast_opt(&self.w_up),
            w_out: cast_vec(&self.w_out),
            b_out: cast_opt(&self.b_out),
        }
    }
}

impl<T: Real> ModelWeights<T> {
    /// The same model in another scalar type (f64 for finite differences and oracles).
    pub fn cast<U: Real>(&self) -> ModelWeights<U> {
        ModelWeights {
            config: self.config.clone(),
            tok_emb: cast_vec(&self.tok_emb),
            pos_emb: cast_opt(&self.pos_emb),
            layers: self.layers.iter().map(|l| l.cast()).collect(),
            final_norm_w: cast_vec(&self.final_norm_w),
            final_norm_b: cast_opt(&self.final_norm_b),
            lm_head: cast_opt(&self.lm_head),
        }
    }

    /// Applies `f` to every weight tensor (each optional one that is present).
    pub fn for_each_tensor_mut(&mut self, mut f: impl FnMut(&mut [T])) {
        f(&mut self.tok_emb);
        f(&mut self.final_norm_w);
        for v in [&mut self.pos_emb, &mut self.final_norm_b, &mut self.lm_head]
            .into_iter()
            .flatten()
        {
            f(v);
        }
        for l in &mut self.layers {
            for v in [
                &mut l.attn_norm_w,
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.mlp_norm_w,
                &mut l.w_in,
                &mut l.w_out,
            ] {
                f(v);
            }
            for v in [
                &mut l.attn_norm_b,
                &mut l.bq,
                &mut l.bk,
                &mut l.bv,
                &mut l.bo,
                &mut l.mlp_norm_b,
                &mut l.b_in,
                &mut l.w_up,
                &mut l.b_out,
            ]
            .into_iter()
            .flatten()
            {
                f(v);
            }
        }
    }

    /// The LM head matrix `[vocab, d]` (the embedding when tied).
    pub fn head(&self) -> &[T] {
        self.lm_head.as_deref().unwrap_or(&self.tok_emb)
    }

    /// Number of parameters of the frozen model (tied head counted once).
    pub fn n_params(&self) -> usize {
        let opt = |v: &Option<Vec<T>>| v.as_ref().map_or(0, |v| v.len());
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.attn_norm_w.len()
                    + opt(&l.attn_norm_b)
                    + l.wq.len()
                    + l.wk.len()
                    + l.wv.len()
                    + opt(&l.bq)
                    + opt(&l.bk)
                    + opt(&l.bv)
                    + l.wo.len()
                    + opt(&l.bo)
                    + l.mlp_norm_w.len()
                    + opt(&l.mlp_norm_b)
                    + l.w_in.len()
                    + opt(&l.b_in)
                    + opt(&l.w_up)
                    + l.w_out.len()
                    + opt(&l.b_out)
            })
            .sum();
        self.tok_emb.len()
            + opt(&self.pos_emb)
            + layers
            + self.final_norm_w.len()
            + opt(&self.final_norm_b)
            + opt(&self.lm_head)
    }
}

impl ModelWeights<f32> {
    /// The same weights with every value rounded to fp16: what the GPU engine computes with.
    pub fn rounded_to_f16(mut self) -> Self {
        self.for_each_tensor_mut(|v| {
            v.iter_mut()
                .for_each(|x| *x = half::f16::from_f32(*x).to_f32())
        });
        self
    }
}
