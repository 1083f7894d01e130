//! The layer code shared by training and decoding: the embedding, one layer's forward over a
//! batch or a decode step's KV cache (`Attend`), and the final norm.

use super::*;

/// Embeds the `[b, t]` tokens of `ws.tokens` (positions from `ws.pos_offset`) into the residual
/// stream `ws.x`.
pub(super) fn embed<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    model: &DevModel<B>,
    b: usize,
    t: usize,
    ws: &mut Workspace<B>,
) -> Result<()> {
    let p = ops::embedding_params(
        b,
        t,
        cfg.d_model,
        cfg.vocab_size,
        model.pos_emb.as_ref().map_or(0, |_| cfg.max_positions),
    )?;
    be.embedding(
        &p,
        &ws.tokens,
        &ws.pos_offset,
        &model.tok_emb,
        model.pos_emb.as_ref(),
        &mut ws.x,
    )
}

/// The last residual add (the pending branch output with its bias) and the final norm into
/// `ws.h`, keeping its input and statistics for the backward.
pub(super) fn final_norm<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    model: &DevModel<B>,
    ws: &mut Workspace<B>,
    rows: usize,
    pending: Option<Option<&B::Buf<f16>>>,
) -> Result<()> {
    let norm_p = ops::norm_params(rows, cfg.d_model, cfg.norm_eps, norm_kind(cfg), false)?;
    be.add_norm(
        &norm_p,
        NormBufs {
            x: &mut ws.x,
            y: pending.map(|_| &ws.y),
            y_bias: pending.flatten(),
            w: &model.final_norm_w,
            b: model.final_norm_b.as_ref(),
            x_save: Some(&mut ws.final_x),
            h: &mut ws.h,
            mean: Some(&mut ws.final_mean),
            rstd: &mut ws.final_rstd,
        },
    )
}

/// Where a layer's attention reads its keys and values.
pub(super) enum Attend<'a, B: Backend> {
    /// The fused prefix attention (`kernels/prefix_attention.cu`) over the layer's prefix bank
    /// in `ws.bank` and the batch's own keys: training and the loss.
    Batch(&'a AttnShape),
    /// A decode step over the layer's KV cache.
    Cache(CacheStep<'a, B>),
}

/// One layer's part of a decode step: the prefill runs the fused kernel (`prefill`: the bank is
/// in `ws.bank`, `ws.prefix_index` is negative for requests without a prefix, `ws.valid_len`
/// holds the prompt lengths), later steps the decode kernel (`ws.prefix_index` = cached entries,
/// `ws.valid_len` = new tokens); then the new keys and values are appended to the cache.
pub(super) struct CacheStep<'a, B: Backend> {
    pub(super) shape: &'a DecodeShape,
    pub(super) prefill: Option<&'a AttnShape>,
    pub(super) k: &'a mut B::Buf<f16>,
    pub(super) v: &'a mut B::Buf<f16>,
    /// Cache row (`[B·Hkv·capacity]` rows of D) of each new key/value row.
    pub(super) append_idx: &'a B::Buf<i32>,
}

impl<B: Backend> Attend<'_, B> {
    pub(super) fn batch_seq(&self) -> (usize, usize) {
        match self {
            Attend::Batch(s) => (s.batch, s.seq),
            Attend::Cache(c) => (c.shape.batch, c.shape.n_new),
        }
    }
}

/// One layer's forward from the residual stream `ws.x` (first adding the pending branch output
/// `ws.y` with its bias, when `pending`), keeping its activations in saved slot `slot` (the
/// block inputs only for [`Attend::Batch`], which a backward may follow) and, with
/// `keep_input`, the block input in `ws.layer_inputs[l]` (for recomputation). Leaves the MLP's
/// output (bias not added) in `ws.y`.
#[allow(clippy::too_many_arguments)]
pub(super) fn layer_forward<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    lw: &DevLayer<B>,
    ws: &mut Workspace<B>,
    rope: Option<&RopeTables<B>>,
    attend: Attend<'_, B>,
    layer: usize,
    slot: usize,
    pending: Option<Option<&B::Buf<f16>>>,
    keep_input: bool,
) -> Result<()> {
    let (b, t) = attend.batch_seq();
    let keep_x = matches!(attend, Attend::Batch(_));
    let rows = b * t;
    let (d, hd) = (cfg.d_model, cfg.head_dim);
    let (q_dim, kv_dim) = (cfg.q_dim(), cfg.kv_dim());
    let qkv_w = q_dim + 2 * kv_dim;
    let kind = norm_kind(cfg);
    let norm_p = ops::norm_params(rows, d, cfg.norm_eps, kind, false)?;
    let use_rope = cfg.arch == Arch::Llama;
    let n_pos = rope.map_or(0, |r| r.n_positions);
    let sv = &mut ws.saved[slot];
    // Attention block.
    be.add_norm(
        &norm_p,
        NormBufs {
            x: &mut ws.x,
            y: pending.map(|_| &ws.y),
            y_bias: pending.flatten(),
            w: &lw.attn_norm_w,
            b: lw.attn_norm_b.as_ref(),
            x_save: keep_x.then_some(&mut sv.attn_x),
            h: &mut ws.h,
            mean: Some(&mut sv.attn_mean),
            rstd: &mut sv.attn_rstd,
        },
    )?;
    if keep_input {
        // Recomputation: the block input (after the add) is all this layer keeps.
        be.copy(
            "keeping a layer input",
            &ws.x,
            0..rows * d,
            &mut ws.layer_inputs[layer],
            0,
        )?;
    }
    be.gemm_a_bt(rows, qkv_w, d, &ws.h, &lw.wqkv, &mut ws.qkv)?;
    let parts: [(usize, usize, bool, &mut B::Buf<f16>); 3] = [
        (0, cfg.n_heads, use_rope, &mut sv.q),
        (q_dim, cfg.n_kv_heads, use_rope, &mut sv.k),
        (q_dim + kv_dim, cfg.n_kv_heads, false, &mut sv.v),
    ];
    for (i, (col, heads, rot, dst)) in parts.into_iter().enumerate() {
        let hp = ops::heads_params(b, t, heads, hd, qkv_w, col, rot, n_pos)?;
        let bias = lw.bqkv.as_ref().map(|bs| &bs[i]);
        let rope_bufs = rot.then(|| {
            let r = rope.expect("RoPE tables");
            RopeBufs {
                pos_offset: &ws.pos_offset,
                cos: &r.cos,
                sin: &r.sin,
            }
        });
        be.rows_to_heads(&hp, &ws.qkv, bias, rope_bufs, dst)?;
    }
    let (bk, bv) = &ws.bank[layer];
    let fused = |s: &AttnShape, o: &mut B::Buf<f16>, lse: &mut B::Buf<f32>| {
        let inputs = AttnBufs {
            q: &sv.q,
            k: &sv.k,
            v: &sv.v,
            prefix_k: bk,
            prefix_v: bv,
            prefix_index: &ws.prefix_index,
            valid_len: &ws.valid_len,
        };
        be.attn_fwd(s, attn_scale(cfg), inputs, o, lse)
    };
    match attend {
        Attend::Batch(s) => fused(s, &mut sv.o, &mut sv.lse)?,
        Attend::Cache(c) => {
            match c.prefill {
                Some(s) => fused(s, &mut sv.o, &mut sv.lse)?,
                None => be.decode_attn(
                    c.shape,
                    attn_scale(cfg),
                    DecodeBufs {
                        q: &sv.q,
                        k_new: &sv.k,
                        v_new: &sv.v,
                        cache_k: c.k,
                        cache_v: c.v,
                    },
                    &ws.prefix_index,
                    &ws.valid_len,
                    &mut sv.o,
                )?,
            }
            let ap = ops::rows_params(b * c.shape.kv_heads * t, hd)?;
            let cache_rows = b * c.shape.kv_heads * c.shape.capacity;
            be.scatter_rows(&ap, cache_rows, &sv.k, c.append_idx, c.k)?;
            be.scatter_rows(&ap, cache_rows, &sv.v, c.append_idx, c.v)?;
        }
    }
    let op = ops::heads_params(b, t, cfg.n_heads, hd, q_dim, 0, false, 0)?;
    be.heads_to_rows(&op, &sv.o, None, &mut ws.o_rows)?;
    be.gemm_a_bt(rows, d, q_dim, &ws.o_rows, &lw.wo, &mut ws.y)?;

    // MLP block.
    be.add_norm(
        &norm_p,
        NormBufs {
            x: &mut ws.x,
            y: Some(&ws.y),
            y_bias: lw.bo.as_ref(),
            w: &lw.mlp_norm_w,
            b: lw.mlp_norm_b.as_ref(),
            x_save: keep_x.then_some(&mut sv.mlp_x),
            h: &mut ws.h,
            mean: Some(&mut sv.mlp_mean),
            rstd: &mut sv.mlp_rstd,
        },
    )?;
    let act_p = ops::act_params(rows, cfg.d_ff)?;
    match cfg.arch {
        Arch::Gpt2 => {
            be.gemm_a_bt(rows, cfg.d_ff, d, &ws.h, &lw.w_in, &mut sv.a)?;
            be.gelu_fwd(&act_p, &mut sv.a, lw.b_in.as_ref(), &mut ws.act)?;
        }
        Arch::Llama => {
            be.gemm_a_bt(rows, 2 * cfg.d_ff, d, &ws.h, &lw.w_in, &mut sv.a)?;
            be.swiglu_fwd(&act_p, &sv.a, &mut ws.act)?;
        }
    }
    be.gemm_a_bt(rows, d, cfg.d_ff, &ws.act, &lw.w_out, &mut ws.y)?;
    Ok(())
}
