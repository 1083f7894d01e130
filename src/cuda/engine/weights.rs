//! The frozen model's weights on the device: uploaded once in fp16, the projections that read
//! the same input fused (`[Wq; Wk; Wv]`, Llama's `[W_gate; W_up]`) so each is one GEMM.

use super::*;

// Weights on the device.

pub(super) struct DevLayer<B: Backend> {
    pub(super) attn_norm_w: B::Buf<f16>,
    pub(super) attn_norm_b: Option<B::Buf<f16>>,
    /// `[q_dim + 2·kv_dim, d]`, and the q, k, v biases.
    pub(super) wqkv: B::Buf<f16>,
    pub(super) bqkv: Option<[B::Buf<f16>; 3]>,
    /// `[d, q_dim]`.
    pub(super) wo: B::Buf<f16>,
    pub(super) bo: Option<B::Buf<f16>>,
    pub(super) mlp_norm_w: B::Buf<f16>,
    pub(super) mlp_norm_b: Option<B::Buf<f16>>,
    /// GPT-2 `[f, d]` (+ bias); Llama `[2f, d]` = `[W_gate; W_up]`.
    pub(super) w_in: B::Buf<f16>,
    pub(super) b_in: Option<B::Buf<f16>>,
    /// `[d, f]`.
    pub(super) w_out: B::Buf<f16>,
    pub(super) b_out: Option<B::Buf<f16>>,
}

pub(super) struct DevModel<B: Backend> {
    pub(super) tok_emb: B::Buf<f16>,
    pub(super) pos_emb: Option<B::Buf<f16>>,
    pub(super) layers: Vec<DevLayer<B>>,
    pub(super) final_norm_w: B::Buf<f16>,
    pub(super) final_norm_b: Option<B::Buf<f16>>,
    /// Untied head `[vocab, d]` (`None`: the token embedding).
    pub(super) lm_head: Option<B::Buf<f16>>,
    pub(super) bytes: usize,
}

impl<B: Backend> DevModel<B> {
    pub(super) fn upload(be: &B, m: &ModelWeights<f32>) -> Result<Self> {
        let mut bytes = 0usize;
        let mut up = |what: &str, x: &[f32]| -> Result<B::Buf<f16>> {
            bytes += 2 * x.len();
            upload(be, what, &to_f16(x))
        };
        let tok_emb = up("token embedding", &m.tok_emb)?;
        let pos_emb = m
            .pos_emb
            .as_deref()
            .map(|p| up("position embedding", p))
            .transpose()?;
        let mut layers = Vec::with_capacity(m.layers.len());
        for (l, lw) in m.layers.iter().enumerate() {
            let name = |s: &str| format!("layer {l} {s}");
            let cat = |parts: &[&[f32]]| parts.concat();
            let bqkv = match (&lw.bq, &lw.bk, &lw.bv) {
                (Some(q), Some(k), Some(v)) => Some([
                    up(&name("q bias"), q)?,
                    up(&name("k bias"), k)?,
                    up(&name("v bias"), v)?,
                ]),
                (None, None, None) => None,
                _ => bail!("layer {l}: q/k/v biases must be all present or all absent"),
            };
            let w_in = match &lw.w_up {
                Some(up_w) => cat(&[&lw.w_in, up_w]),
                None => lw.w_in.clone(),
            };
            layers.push(DevLayer {
                attn_norm_w: up(&name("attention norm"), &lw.attn_norm_w)?,
                attn_norm_b: lw
                    .attn_norm_b
                    .as_deref()
                    .map(|b| up(&name("attention norm bias"), b))
                    .transpose()?,
                wqkv: up(&name("qkv projection"), &cat(&[&lw.wq, &lw.wk, &lw.wv]))?,
                bqkv,
                wo: up(&name("output projection"), &lw.wo)?,
                bo: lw
                    .bo
                    .as_deref()
                    .map(|b| up(&name("output bias"), b))
                    .transpose()?,
                mlp_norm_w: up(&name("MLP norm"), &lw.mlp_norm_w)?,
                mlp_norm_b: lw
                    .mlp_norm_b
                    .as_deref()
                    .map(|b| up(&name("MLP norm bias"), b))
                    .transpose()?,
                w_in: up(&name("MLP input projection"), &w_in)?,
                b_in: lw
                    .b_in
                    .as_deref()
                    .map(|b| up(&name("MLP input bias"), b))
                    .transpose()?,
                w_out: up(&name("MLP output projection"), &lw.w_out)?,
                b_out: lw
                    .b_out
                    .as_deref()
                    .map(|b| up(&name("MLP output bias"), b))
                    .transpose()?,
            });
        }
        let final_norm_w = up("final norm", &m.final_norm_w)?;
        let final_norm_b = m
            .final_norm_b
            .as_deref()
            .map(|b| up("final norm bias", b))
            .transpose()?;
        let lm_head = m.lm_head.as_deref().map(|h| up("LM head", h)).transpose()?;
        Ok(DevModel {
            tok_emb,
            pos_emb,
            layers,
            final_norm_w,
            final_norm_b,
            lm_head,
            bytes,
        })
    }

    pub(super) fn head(&self) -> &B::Buf<f16> {
        self.lm_head.as_ref().unwrap_or(&self.tok_emb)
    }
}
