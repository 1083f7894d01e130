//! Prefix attention computed blockwise, the way the CUDA kernel computes it (FlashAttention-2).
//!
//! Same contract as [`super::attention`] (same [`AttnShape`], [`AttnInputs`], [`AttnGrads`], the
//! natural-log LSE, zero output and LSE for padding rows) and the same results up to rounding.
//! This module doubles as the written-down algorithm of the GPU attention kernels: each function
//! below names the kernel (grid, CTA, tiles) it stands for, and the loops are the kernel's loops.
//! Matrix products on tiles go through [`matmul`]; on the GPU they are the tensor-core MMAs.
//!
//! # Forward (one CTA per (sequence b, query head h, query block))
//! - Load the `Bq × D` query tile; set the running max `m = −∞`, running sum `l = 0`, and the
//!   output accumulator `acc = 0` per row.
//! - Visit key blocks in order: first the prefix blocks (rows of the prefix bank entry chosen by
//!   `prefix_index[b]`, always visible), then the sequence blocks (rows of this sequence's K/V,
//!   causal). The concatenation `[prefix ++ sequence]` is never materialised: the two sources are
//!   read through two different pointers. Sequence key blocks lying entirely above the diagonal
//!   (first key > last query of the tile) are not visited; blocks that cross the diagonal are
//!   masked element by element (`key > query` gets −∞), and so are rows at or past the valid length.
//! - Per key block: `S = Q·Kᵀ · (scale·log2 e)` (scores in base 2, the scale folded with log2 e so
//!   the exponentials are `exp2`), `m' = max(m, rowmax S)`, `p = exp2(S − m')`,
//!   `α = exp2(m − m')`, `l = α·l + rowsum p`, `acc = α·acc + p·V`, `m = m'`. A row whose scores
//!   are all masked so far keeps `m = −∞`; it then subtracts 0 instead of `m'` (as FA2 does) so
//!   no `−∞ − (−∞)` appears.
//! - Epilogue: `O = acc / l`, `LSE₂ = m + log2 l` (base 2), stored as the natural-log
//!   `LSE = LSE₂ · ln 2`. Rows at or past the valid length store O = 0, LSE = 0.
//!
//! Tiles at the end of the prefix or of the sequence are shorter than the block size; the kernel
//! predicates the missing rows off (zero-filled loads, −∞ scores), here the tile is simply
//! shorter, which is the same arithmetic.
//!
//! # Backward
//! - Preprocess kernel: `D_i = rowsum(dO ∘ O)` per query row.
//! - Main kernel, one CTA per (sequence b, kv head, key block), key blocks visited prefix blocks
//!   first, then sequence blocks. For its key block the CTA keeps `dK`, `dV` tiles in registers
//!   and loops over the query heads of its kv head (GQA) and over the query blocks that can see
//!   the key block (for a sequence key block: those not entirely above it; for a prefix key block:
//!   all of them, up to the valid length). Per (query head, query block):
//!   `S = Q·Kᵀ·(scale·log2 e)`, `P = exp2(S − LSE₂)` (masked entries 0),
//!   `dV += Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ∘ (dP − D)`, `dK += dSᵀ·Q`, `dQ += dS·K`.
//!   At the end `dK` is multiplied by `scale`; `dQ` is accumulated in fp32 across key-block CTAs
//!   (atomics, or the deterministic variant that serialises them) and scaled by `scale` in a
//!   convert pass. Here the key blocks of one (b, kv head) run in order, so `dQ` is summed in the
//!   fixed order prefix blocks, then sequence blocks.
//! - Prefix gradients: each (b, kv head) writes its prefix `dK`/`dV` to a per-sequence partial
//!   buffer; a reduction pass adds the partials of the sequences that use each prefix, in
//!   increasing sequence order, so the result is deterministic.

use rayon::prelude::*;

use super::attention::{AttnGrads, AttnInputs, AttnShape};
use super::real::{matmul, Real, Trans};

/// Tile sizes of the blockwise attention: query rows per CTA and key rows per inner step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Query rows per block (`Bq`).
    pub q: usize,
    /// Key rows per block (`Bk`).
    pub k: usize,
}

impl BlockSizes {
    /// 64 × 64 tiles (the deterministic dQ kernel's, `PT_ATTN_DQ_BLOCK_M`/`_N` in
    /// `kernels/abi/attention.h`; the forward kernel uses 128 × 64 at D = 64, 128 × 32 at 128).
    pub const DEFAULT: BlockSizes = BlockSizes { q: 64, k: 64 };

    fn check(&self) {
        assert!(
            self.q > 0 && self.k > 0,
            "block sizes must be positive: {self:?}"
        );
    }
}

/// One key block: where its rows come from and which key positions it covers.
#[derive(Clone, Copy, Debug)]
enum KeyBlock {
    /// Prefix rows `[start, end)` of the bank entry: always visible.
    Prefix { start: usize, end: usize },
    /// Sequence rows `[start, end)`: visible to query `i` when `key ≤ i`.
    Seq { start: usize, end: usize },
}

impl KeyBlock {
    fn rows(&self) -> (usize, usize) {
        match *self {
            KeyBlock::Prefix { start, end } | KeyBlock::Seq { start, end } => (start, end),
        }
    }
}

/// The key blocks that query rows `[q0, q1)` of a sequence visit, in visiting order: every
/// prefix block, then the sequence blocks that are not entirely above the diagonal.
fn key_blocks(p_len: usize, q1: usize, bk: usize) -> Vec<KeyBlock> {
    let mut blocks = Vec::new();
    for start in (0..p_len).step_by(bk) {
        blocks.push(KeyBlock::Prefix {
            start,
            end: (start + bk).min(p_len),
        });
    }
    // Key block [start, start+bk) is visited iff start ≤ q1 − 1 (the tile's last query); its
    // keys at or past q1 are invisible to every query of the tile and are predicated off.
    for start in (0..q1).step_by(bk) {
        blocks.push(KeyBlock::Seq {
            start,
            end: (start + bk).min(q1),
        });
    }
    blocks
}

/// Whether query row `i` (a sequence position) sees key `j` of block `kb`, given the valid length.
#[inline]
fn visible(kb: &KeyBlock, i: usize, j: usize, valid: usize) -> bool {
    i < valid
        && match kb {
            KeyBlock::Prefix { .. } => true,
            KeyBlock::Seq { .. } => j <= i,
        }
}

/// The K and V tiles of key block `kb` for (sequence b, kv head hk): `[rows, D]` each, read
/// straight from the prefix bank or from the sequence's K/V.
fn kv_tiles<'a, T: Real>(
    s: &AttnShape,
    inp: &AttnInputs<'a, T>,
    b: usize,
    hk: usize,
    kb: &KeyBlock,
) -> (&'a [T], &'a [T]) {
    let d = s.head_dim;
    let (start, end) = kb.rows();
    let base = match kb {
        KeyBlock::Prefix { .. } => (inp.prefix_index[b] * s.kv_heads + hk) * s.prefix,
        KeyBlock::Seq { .. } => (b * s.kv_heads + hk) * s.seq,
    };
    let (k, v) = match kb {
        KeyBlock::Prefix { .. } => (inp.prefix_k, inp.prefix_v),
        KeyBlock::Seq { .. } => (inp.k, inp.v),
    };
    let range = (base + start) * d..(base + end) * d;
    (&k[range.clone()], &v[range])
}

/// Base-2 scaled scores of a query tile against a key tile, masked: `S = Q·Kᵀ·scale_log2`,
/// −∞ where the key is not visible. `q0` is the first query row, `valid` the valid length.
#[allow(clippy::too_many_arguments)]
fn masked_scores<T: Real>(
    q_tile: &[T],
    k_tile: &[T],
    q0: usize,
    kb: &KeyBlock,
    d: usize,
    valid: usize,
    scale_log2: T,
    s_tile: &mut [T],
) {
    let qn = q_tile.len() / d;
    let (k0, k1) = kb.rows();
    let kn = k1 - k0;
    matmul(
        qn,
        kn,
        d,
        q_tile,
        Trans::No,
        k_tile,
        Trans::Yes,
        s_tile,
        false,
    );
    for r in 0..qn {
        for c in 0..kn {
            let x = &mut s_tile[r * kn + c];
            *x = if visible(kb, q0 + r, k0 + c, valid) {
                *x * scale_log2
            } else {
                T::neg_infinity()
            };
        }
    }
}

/// Forward: returns `(O [B,Hq,T,D], LSE [B,Hq,T])`, LSE in natural log, computed blockwise.
pub fn forward<T: Real>(s: &AttnShape, inp: &AttnInputs<T>, bs: BlockSizes) -> (Vec<T>, Vec<T>) {
    inp.check(s);
    bs.check();
    let (t_len, d) = (s.seq, s.head_dim);
    let mut o = vec![T::zero(); s.q_len()];
    let mut lse = vec![T::zero(); s.lse_len()];
    if s.q_len() == 0 || s.lse_len() == 0 {
        return (o, lse);
    }
    let scale_log2 = inp.scale * T::of(std::f64::consts::LOG2_E);
    // Grid: (b, h) × query blocks; each task below is one CTA.
    o.par_chunks_mut(t_len * d)
        .zip(lse.par_chunks_mut(t_len))
        .enumerate()
        .for_each(|(bh, (o_bh, lse_bh))| {
            o_bh.par_chunks_mut(bs.q * d)
                .zip(lse_bh.par_chunks_mut(bs.q))
                .enumerate()
                .for_each(|(qb, (o_tile, lse_tile))| {
                    forward_cta(s, inp, bs, scale_log2, bh, qb * bs.q, o_tile, lse_tile)
                });
        });
    (o, lse)
}

/// One forward CTA: query rows `[q0, q0 + rows)` of (b, h) = `bh`, writing their O and LSE.
#[allow(clippy::too_many_arguments)]
fn forward_cta<T: Real>(
    s: &AttnShape,
    inp: &AttnInputs<T>,
    bs: BlockSizes,
    scale_log2: T,
    bh: usize,
    q0: usize,
    o_tile: &mut [T],
    lse_tile: &mut [T],
) {
    let d = s.head_dim;
    let (b, h) = (bh / s.q_heads, bh % s.q_heads);
    let hk = h / s.group();
    let valid = inp.valid_len[b];
    let qn = lse_tile.len();
    if q0 >= valid {
        // The whole tile is padding: the CTA exits early (outputs were zero-initialised).
        return;
    }
    // Rows past the valid length are computed fully masked and written as zero below; the
    // keys this tile can see end at its last valid query.
    let q1 = (q0 + qn).min(valid);
    let q_off = (bh * s.seq + q0) * d;
    let q_tile = &inp.q[q_off..q_off + qn * d];

    let mut m = vec![T::neg_infinity(); qn];
    let mut l = vec![T::zero(); qn];
    let mut acc = vec![T::zero(); qn * d];
    let mut s_tile = vec![T::zero(); qn * bs.k];
    let mut pv = vec![T::zero(); qn * d];

    for kb in key_blocks(s.prefix, q1, bs.k) {
        let (k0, k1) = kb.rows();
        let kn = k1 - k0;
        let (k_tile, v_tile) = kv_tiles(s, inp, b, hk, &kb);
        let s_blk = &mut s_tile[..qn * kn];
        masked_scores(q_tile, k_tile, q0, &kb, d, valid, scale_log2, s_blk);
        // Online softmax: new running max, rescale factor, exponentials, running sum.
        for r in 0..qn {
            let row = &mut s_blk[r * kn..(r + 1) * kn];
            let m_new = row.iter().copied().fold(m[r], T::max);
            // A row with nothing visible yet keeps m = −∞; subtract 0 so exp2 gives 0, not NaN.
            let m_ref = if m_new == T::neg_infinity() {
                T::zero()
            } else {
                m_new
            };
            let alpha = (m[r] - m_ref).exp2();
            let mut rowsum = T::zero();
            for x in row.iter_mut() {
                *x = (*x - m_ref).exp2();
                rowsum += *x;
            }
            l[r] = alpha * l[r] + rowsum;
            acc[r * d..(r + 1) * d].iter_mut().for_each(|a| *a *= alpha);
            m[r] = m_new;
        }
        // acc += P·V (P stays in registers as the A operand on the GPU).
        matmul(
            qn,
            d,
            kn,
            s_blk,
            Trans::No,
            v_tile,
            Trans::No,
            &mut pv,
            false,
        );
        acc.iter_mut().zip(&pv).for_each(|(a, &x)| *a += x);
    }

    // Epilogue: normalise, and store the LSE in natural log.
    let ln2 = T::of(std::f64::consts::LN_2);
    for r in 0..qn {
        if q0 + r >= valid || l[r] == T::zero() {
            continue; // padding row: O = 0, LSE = 0
        }
        let inv_l = T::one() / l[r];
        o_tile[r * d..(r + 1) * d]
            .iter_mut()
            .zip(&acc[r * d..(r + 1) * d])
            .for_each(|(o, &a)| *o = a * inv_l);
        lse_tile[r] = (m[r] + l[r].log2()) * ln2;
    }
}

/// Backward from `dO`, given the forward's `O` and `LSE`, computed blockwise (FA2-style).
pub fn backward<T: Real>(
    s: &AttnShape,
    inp: &AttnInputs<T>,
    o: &[T],
    lse: &[T],
    d_o: &[T],
    bs: BlockSizes,
) -> AttnGrads<T> {
    inp.check(s);
    bs.check();
    assert_eq!(o.len(), s.q_len(), "o");
    assert_eq!(d_o.len(), s.q_len(), "d_o");
    assert_eq!(lse.len(), s.lse_len(), "lse");
    let (t_len, d, p_len) = (s.seq, s.head_dim, s.prefix);
    let mut grads = AttnGrads {
        dq: vec![T::zero(); s.q_len()],
        dk: vec![T::zero(); s.kv_len()],
        dv: vec![T::zero(); s.kv_len()],
        d_prefix_k: vec![T::zero(); s.bank_len()],
        d_prefix_v: vec![T::zero(); s.bank_len()],
    };
    if s.q_len() == 0 {
        return grads;
    }

    // Preprocess kernel: D = rowsum(dO ∘ O), and the LSE back in base 2.
    let delta: Vec<T> = d_o
        .par_chunks(d)
        .zip(o.par_chunks(d))
        .map(|(x, y)| x.iter().zip(y).fold(T::zero(), |a, (&u, &v)| a + u * v))
        .collect();
    let log2e = T::of(std::f64::consts::LOG2_E);
    let lse2: Vec<T> = lse.iter().map(|&x| x * log2e).collect();
    let ctx = BwdCtx {
        s,
        inp,
        d_o,
        delta: &delta,
        lse2: &lse2,
        scale_log2: inp.scale * log2e,
        bs,
    };

    // Main kernel. Each task is the column of key-block CTAs of one (b, kv head); it owns dK/dV
    // of that head, the dQ accumulator of its query heads, and a partial prefix gradient.
    let block = t_len * d;
    let partials: Vec<(Vec<T>, Vec<T>)> = grads
        .dq
        .par_chunks_mut(block * s.group())
        .zip(
            grads
                .dk
                .par_chunks_mut(block)
                .zip(grads.dv.par_chunks_mut(block)),
        )
        .enumerate()
        .map(|(bk, (dq_g, (dk_bk, dv_bk)))| {
            let (b, hk) = (bk / s.kv_heads, bk % s.kv_heads);
            let mut dpk = vec![T::zero(); p_len * d];
            let mut dpv = vec![T::zero(); p_len * d];
            // Key blocks visible to any valid query of this sequence, prefix blocks first.
            for kb in key_blocks(p_len, inp.valid_len[b], bs.k) {
                let (k0, k1) = kb.rows();
                let (dk_t, dv_t) = match kb {
                    KeyBlock::Prefix { .. } => (&mut dpk[k0 * d..k1 * d], &mut dpv[k0 * d..k1 * d]),
                    KeyBlock::Seq { .. } => {
                        (&mut dk_bk[k0 * d..k1 * d], &mut dv_bk[k0 * d..k1 * d])
                    }
                };
                ctx.key_block_cta(b, hk, &kb, dq_g, dk_t, dv_t);
            }
            (dpk, dpv)
        })
        .collect();

    // Convert pass: dQ accumulator × scale.
    grads.dq.par_iter_mut().for_each(|x| *x *= inp.scale);

    // Reduction pass over sequences, in order: prefix gradients per (prefix, kv head).
    if p_len > 0 {
        for (bk, (dpk, dpv)) in partials.into_iter().enumerate() {
            let (b, hk) = (bk / s.kv_heads, bk % s.kv_heads);
            let off = (inp.prefix_index[b] * s.kv_heads + hk) * p_len * d;
            let dst_k = &mut grads.d_prefix_k[off..off + p_len * d];
            dst_k.iter_mut().zip(&dpk).for_each(|(y, &x)| *y += x);
            let dst_v = &mut grads.d_prefix_v[off..off + p_len * d];
            dst_v.iter_mut().zip(&dpv).for_each(|(y, &x)| *y += x);
        }
    }
    grads
}

/// What every backward CTA reads.
struct BwdCtx<'a, T> {
    s: &'a AttnShape,
    inp: &'a AttnInputs<'a, T>,
    d_o: &'a [T],
    delta: &'a [T],
    lse2: &'a [T],
    scale_log2: T,
    bs: BlockSizes,
}

impl<T: Real> BwdCtx<'_, T> {
    /// One backward CTA: key block `kb` of (b, kv head `hk`). Accumulates `dK`, `dV` of the
    /// block into `dk_t`, `dv_t` (`[rows, D]`, already scaled by `scale` on return) and the
    /// unscaled `dS·K` into the dQ accumulator `dq_g` of the kv head's query heads (`[G, T, D]`).
    fn key_block_cta(
        &self,
        b: usize,
        hk: usize,
        kb: &KeyBlock,
        dq_g: &mut [T],
        dk_t: &mut [T],
        dv_t: &mut [T],
    ) {
        let (s, inp, bs) = (self.s, self.inp, self.bs);
        let (t_len, d) = (s.seq, s.head_dim);
        let valid = inp.valid_len[b];
        let (k0, k1) = kb.rows();
        let kn = k1 - k0;
        let (k_tile, v_tile) = kv_tiles(s, inp, b, hk, kb);
        // dK, dV of this key block live in registers for the whole CTA.
        let mut dk_acc = vec![T::zero(); kn * d];
        let mut dv_acc = vec![T::zero(); kn * d];
        let mut p = vec![T::zero(); bs.q * kn];
        let mut dp = vec![T::zero(); bs.q * kn];
        // The first query block that can see this key block: block skipping above the diagonal.
        let first_q = match kb {
            KeyBlock::Prefix { .. } => 0,
            KeyBlock::Seq { start, .. } => start / bs.q * bs.q,
        };
        for g in 0..s.group() {
            let bh = b * s.q_heads + hk * s.group() + g;
            for q0 in (first_q..valid).step_by(bs.q) {
                let qn = bs.q.min(t_len - q0);
                let rows = (bh * t_len + q0) * d..(bh * t_len + q0 + qn) * d;
                let q_tile = &inp.q[rows.clone()];
                let do_tile = &self.d_o[rows];
                let p_blk = &mut p[..qn * kn];
                let dp_blk = &mut dp[..qn * kn];
                // Recompute P from the saved LSE.
                masked_scores(q_tile, k_tile, q0, kb, d, valid, self.scale_log2, p_blk);
                for r in 0..qn {
                    let l2 = self.lse2[bh * t_len + q0 + r];
                    p_blk[r * kn..(r + 1) * kn]
                        .iter_mut()
                        .for_each(|x| *x = (*x - l2).exp2());
                }
                // dV += Pᵀ·dO
                matmul(
                    kn,
                    d,
                    qn,
                    p_blk,
                    Trans::Yes,
                    do_tile,
                    Trans::No,
                    &mut dv_acc,
                    true,
                );
                // dP = dO·Vᵀ, dS = P ∘ (dP − D)
                matmul(
                    qn,
                    kn,
                    d,
                    do_tile,
                    Trans::No,
                    v_tile,
                    Trans::Yes,
                    dp_blk,
                    false,
                );
                for r in 0..qn {
                    let di = self.delta[bh * t_len + q0 + r];
                    for c in 0..kn {
                        let i = r * kn + c;
                        dp_blk[i] = p_blk[i] * (dp_blk[i] - di);
                    }
                }
                // dK += dSᵀ·Q; dQ += dS·K (the fp32 dQ accumulator on the GPU).
                matmul(
                    kn,
                    d,
                    qn,
                    dp_blk,
                    Trans::Yes,
                    q_tile,
                    Trans::No,
                    &mut dk_acc,
                    true,
                );
                let dq_tile = &mut dq_g[(g * t_len + q0) * d..(g * t_len + q0 + qn) * d];
                matmul(
                    qn,
                    d,
                    kn,
                    dp_blk,
                    Trans::No,
                    k_tile,
                    Trans::No,
                    dq_tile,
                    true,
                );
            }
        }
        // Epilogue: dK × scale, then add to the block's gradient rows.
        dk_t.iter_mut()
            .zip(&dk_acc)
            .for_each(|(y, &x)| *y += x * inp.scale);
        dv_t.iter_mut().zip(&dv_acc).for_each(|(y, &x)| *y += x);
    }
}
