//! The engine's device memory between calls: the activation workspace sized for the largest
//! batch seen (grown, never shrunk; what a layer keeps for the backward, or only its input when
//! recomputing) and the RoPE tables.

use super::*;

// Workspaces.

/// The capacity a workspace was sized for: every call with smaller or equal dimensions fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Capacity {
    pub(super) batch: usize,
    pub(super) seq: usize,
    pub(super) prefix: usize,
    pub(super) n_prefixes: usize,
    /// Per-layer activations kept for a backward (else one layer's, reused).
    pub(super) train: bool,
    /// With `train`: keep only each layer's input and recompute the rest in the backward.
    pub(super) recompute: bool,
}

impl Capacity {
    pub(super) fn covers(&self, other: &Capacity) -> bool {
        self.batch >= other.batch
            && self.seq >= other.seq
            && self.prefix >= other.prefix
            && self.n_prefixes >= other.n_prefixes
            && (self.train || !other.train)
            && self.recompute == other.recompute
    }

    pub(super) fn max(&self, o: &Capacity) -> Capacity {
        Capacity {
            batch: self.batch.max(o.batch),
            seq: self.seq.max(o.seq),
            prefix: self.prefix.max(o.prefix),
            n_prefixes: self.n_prefixes.max(o.n_prefixes),
            train: self.train || o.train,
            recompute: o.recompute,
        }
    }

    pub(super) fn attn_shape(&self, cfg: &ModelConfig) -> AttnShape {
        AttnShape {
            batch: self.batch,
            q_heads: cfg.n_heads,
            kv_heads: cfg.n_kv_heads,
            seq: self.seq,
            prefix: self.prefix,
            head_dim: cfg.head_dim,
            n_prefixes: self.n_prefixes,
        }
    }
}

/// What one layer's forward keeps for the backward.
pub(super) struct LayerSaved<B: Backend> {
    /// Attention block input (fp16 copy of the residual) and its norm statistics.
    pub(super) attn_x: B::Buf<f16>,
    pub(super) attn_mean: B::Buf<f32>,
    pub(super) attn_rstd: B::Buf<f32>,
    /// `[B, H, T, D]` after bias and RoPE; the attention output and its LSE.
    pub(super) q: B::Buf<f16>,
    pub(super) k: B::Buf<f16>,
    pub(super) v: B::Buf<f16>,
    pub(super) o: B::Buf<f16>,
    pub(super) lse: B::Buf<f32>,
    /// MLP block input and its norm statistics.
    pub(super) mlp_x: B::Buf<f16>,
    pub(super) mlp_mean: B::Buf<f32>,
    pub(super) mlp_rstd: B::Buf<f32>,
    /// GPT-2: the biased pre-activation `[rows, f]`; Llama: `[gate | up]` `[rows, 2f]`.
    pub(super) a: B::Buf<f16>,
}

pub(super) struct Workspace<B: Backend> {
    pub(super) cap: Capacity,
    pub(super) saved: Vec<LayerSaved<B>>,
    pub(super) tokens: B::Buf<i32>,
    pub(super) pos_offset: B::Buf<i32>,
    pub(super) prefix_index: B::Buf<i32>,
    pub(super) valid_len: B::Buf<i32>,
    /// Decoding: where each new key/value row goes in the cache `[B, Hkv, T]` (taken out while
    /// the layers borrow the workspace).
    pub(super) append_idx: Option<B::Buf<i32>>,
    /// Per layer, the prefix bank's keys and values in fp16.
    pub(super) bank: Vec<(B::Buf<f16>, B::Buf<f16>)>,
    /// Residual stream `[rows, d]` fp32, the norm output `[rows, d]` (after the last layer: the
    /// final hidden states), and the final norm's input and statistics.
    pub(super) x: B::Buf<f32>,
    pub(super) h: B::Buf<f16>,
    /// Recomputation: each layer's block input (fp32 residual after the add).
    pub(super) layer_inputs: Vec<B::Buf<f32>>,
    pub(super) final_x: B::Buf<f16>,
    pub(super) final_mean: B::Buf<f32>,
    pub(super) final_rstd: B::Buf<f32>,
    /// `[rows, q + 2kv]`: the fused projection (forward) / its gradient (backward).
    pub(super) qkv: B::Buf<f16>,
    /// `[rows, q_dim]`: the attention output as rows / the output projection's input gradient.
    pub(super) o_rows: B::Buf<f16>,
    /// `[B, Hq, T, D]`: dO.
    pub(super) d_o: B::Buf<f16>,
    /// `[rows, d]`: branch outputs (forward), norm input gradients (backward).
    pub(super) y: B::Buf<f16>,
    /// `[rows, f]`: the activation output / its gradient.
    pub(super) act: B::Buf<f16>,
    /// `[rows, f or 2f]`: the pre-activation gradient.
    pub(super) d_a: B::Buf<f16>,
    /// Residual gradient, fp32 and its fp16 copy.
    pub(super) dx: B::Buf<f32>,
    pub(super) dx16: B::Buf<f16>,
    /// Head chunk: rows, logits, row gradient, indices, labels, losses.
    pub(super) chunk: usize,
    pub(super) head_h: B::Buf<f16>,
    pub(super) logits: B::Buf<f16>,
    pub(super) head_dh: B::Buf<f16>,
    pub(super) head_idx: B::Buf<i32>,
    pub(super) head_labels: B::Buf<i32>,
    pub(super) head_loss: B::Buf<f32>,
    pub(super) chunk_loss: B::Buf<f32>,
    /// Attention backward scratch and gradients (reused per layer).
    pub(super) attn: B::AttnScratch,
    /// Per layer `[k | v]` prefix gradients (fp16, loss-scaled), copied out of `attn_grads`.
    pub(super) prefix_grads: B::Buf<f32>,
    pub(super) bytes: usize,
}

impl<B: Backend> Workspace<B> {
    pub(super) fn new(
        be: &B,
        cfg: &ModelConfig,
        cap: Capacity,
        head_chunk_elems: usize,
    ) -> Result<Self> {
        let (b, t) = (cap.batch, cap.seq);
        let rows = b * t;
        let (d, hd) = (cfg.d_model, cfg.head_dim);
        let q_dim = cfg.q_dim();
        let kv_dim = cfg.kv_dim();
        let f_in = match cfg.arch {
            Arch::Gpt2 => cfg.d_ff,
            Arch::Llama => 2 * cfg.d_ff,
        };
        let bank = cap.n_prefixes * cfg.n_kv_heads * cap.prefix * hd;
        let chunk = (head_chunk_elems / cfg.vocab_size.max(1)).clamp(1, rows.max(1));
        let mut bytes = 0usize;
        let mut h16 = |what: &str, n: usize| {
            bytes += 2 * n;
            be.alloc::<f16>(what, n)
        };
        let n_saved = if cap.train && !cap.recompute {
            cfg.n_layers
        } else {
            1
        };
        let mut layer_inputs = Vec::new();
        if cap.train && cap.recompute {
            for l in 0..cfg.n_layers {
                layer_inputs
                    .push(be.alloc::<f32>(&format!("layer {l} input (recomputation)"), rows * d)?);
            }
        }
        let mut saved = Vec::with_capacity(n_saved);
        let mut f32s = Vec::new();
        for l in 0..n_saved {
            let w = |s: &str| format!("layer {l} {s} ({b} sequences × {t} tokens)");
            saved.push(LayerSaved {
                attn_x: h16(&w("attention input"), rows * d)?,
                attn_mean: be.alloc("norm statistics", rows)?,
                attn_rstd: be.alloc("norm statistics", rows)?,
                q: h16(&w("queries"), rows * q_dim)?,
                k: h16(&w("keys"), rows * kv_dim)?,
                v: h16(&w("values"), rows * kv_dim)?,
                o: h16(&w("attention output"), rows * q_dim)?,
                lse: be.alloc("attention LSE", b * cfg.n_heads * t)?,
                mlp_x: h16(&w("MLP input"), rows * d)?,
                mlp_mean: be.alloc("norm statistics", rows)?,
                mlp_rstd: be.alloc("norm statistics", rows)?,
                a: h16(&w("MLP pre-activation"), rows * f_in)?,
            });
            f32s.push(4 * (5 * rows + b * cfg.n_heads * t));
        }
        let mut bank_bufs = Vec::with_capacity(cfg.n_layers);
        for _ in 0..cfg.n_layers {
            bank_bufs.push((h16("prefix keys", bank)?, h16("prefix values", bank)?));
        }
        let ws = Workspace {
            cap,
            tokens: be.alloc("token ids", rows)?,
            pos_offset: be.alloc("position offsets", b)?,
            prefix_index: be.alloc("prefix indices", b)?,
            valid_len: be.alloc("valid lengths", b)?,
            append_idx: Some(be.alloc("cache slots", rows * cfg.n_kv_heads)?),
            bank: bank_bufs,
            x: be.alloc("residual stream", rows * d)?,
            h: h16("norm output", rows * d)?,
            final_x: h16("final norm input", rows * d)?,
            final_mean: be.alloc("norm statistics", rows)?,
            final_rstd: be.alloc("norm statistics", rows)?,
            qkv: h16("qkv projection", rows * (q_dim + 2 * kv_dim))?,
            o_rows: h16("attention output rows", rows * q_dim)?,
            d_o: h16("attention output gradient", rows * q_dim)?,
            y: h16("branch output", rows * d)?,
            act: h16("MLP activation", rows * cfg.d_ff)?,
            d_a: h16("MLP pre-activation gradient", rows * f_in)?,
            dx: be.alloc("residual gradient", rows * d)?,
            dx16: h16("residual gradient (fp16)", rows * d)?,
            chunk,
            head_h: h16("head chunk rows", chunk * d)?,
            logits: h16(
                &format!(
                    "head logits chunk ({chunk} rows × {} vocab)",
                    cfg.vocab_size
                ),
                chunk * cfg.vocab_size,
            )?,
            head_dh: h16("head chunk gradient", chunk * d)?,
            head_idx: be.alloc("head row indices", chunk)?,
            head_labels: be.alloc("head labels", chunk)?,
            head_loss: be.alloc("head losses", rows)?,
            chunk_loss: be.alloc("head chunk losses", chunk)?,
            attn: be
                .attn_scratch(&cap.attn_shape(cfg))
                .context("allocating the attention backward workspace")?,
            prefix_grads: be.alloc("prefix gradients", cfg.n_layers * 2 * bank)?,
            saved,
            bytes: 0,
            layer_inputs,
        };
        let extra: usize = f32s.iter().sum::<usize>()
            + 4 * rows * (2 * d + 3 + 1)
            + 4 * rows * d * ws.layer_inputs.len();
        Ok(Workspace {
            bytes: bytes + extra,
            ..ws
        })
    }
}

/// RoPE cos/sin tables `[n_positions, D/2]` in fp32 (angles computed in f64 on the host).
pub(super) struct RopeTables<B: Backend> {
    pub(super) n_positions: usize,
    pub(super) cos: B::Buf<f32>,
    pub(super) sin: B::Buf<f32>,
}

impl<B: Backend> RopeTables<B> {
    pub(super) fn new(be: &B, cfg: &ModelConfig, n_positions: usize) -> Result<Self> {
        let positions: Vec<usize> = (0..n_positions).collect();
        let r = Rope::<f64>::new(cfg.head_dim, cfg.rope_theta, &positions);
        let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        Ok(RopeTables {
            n_positions,
            cos: upload(be, "RoPE cosines", &f(&r.cos))?,
            sin: upload(be, "RoPE sines", &f(&r.sin))?,
        })
    }
}
