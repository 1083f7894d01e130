//! Prefix attention, the plain way: the specification every other attention is held against.
//!
//! Keys and values are `[prefix ++ sequence]`: the prefix (one entry of a bank, chosen per
//! sequence) is always visible, the sequence is causal. Queries `[B, Hq, T, D]`, sequence keys and
//! values `[B, Hkv, T, D]`, prefix bank `[n_prefixes, Hkv, P, D]`, grouped-query attention (query
//! head `h` reads kv head `h / (Hq / Hkv)`, as HF's `repeat_kv`), right padding given by a valid
//! length per sequence. Rows at or past a sequence's valid length are padding: their output and
//! LSE are 0 and they contribute nothing to any gradient.
//!
//! Backward returns dQ, dK, dV and the prefix gradients summed over the sequences that use each
//! prefix and over the query heads of each kv head.

use rayon::prelude::*;

use super::real::{matmul, Real, Trans};

pub use crate::types::AttnShape;

/// Inputs of prefix attention (borrowed).
#[derive(Clone, Copy, Debug)]
pub struct AttnInputs<'a, T> {
    /// Queries `[B, Hq, T, D]`.
    pub q: &'a [T],
    /// Sequence keys `[B, Hkv, T, D]`.
    pub k: &'a [T],
    /// Sequence values `[B, Hkv, T, D]`.
    pub v: &'a [T],
    /// Prefix key bank `[n_prefixes, Hkv, P, D]`.
    pub prefix_k: &'a [T],
    /// Prefix value bank `[n_prefixes, Hkv, P, D]`.
    pub prefix_v: &'a [T],
    /// Which prefix each sequence uses, `[B]`.
    pub prefix_index: &'a [usize],
    /// Valid (unpadded) length of each sequence, `[B]`, each ≤ T.
    pub valid_len: &'a [usize],
    /// Softmax scale (usually `1/sqrt(D)`).
    pub scale: T,
}

/// Gradients of prefix attention.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnGrads<T> {
    /// `[B, Hq, T, D]`.
    pub dq: Vec<T>,
    /// `[B, Hkv, T, D]`.
    pub dk: Vec<T>,
    /// `[B, Hkv, T, D]`.
    pub dv: Vec<T>,
    /// `[n_prefixes, Hkv, P, D]`, summed over the sequences using each prefix.
    pub d_prefix_k: Vec<T>,
    /// `[n_prefixes, Hkv, P, D]`.
    pub d_prefix_v: Vec<T>,
}

impl<'a, T: Real> AttnInputs<'a, T> {
    /// Panics with a clear message when a buffer does not match the shape (a programming error).
    pub fn check(&self, s: &AttnShape) {
        assert!(
            s.kv_heads > 0 && s.q_heads % s.kv_heads == 0,
            "q_heads must be a multiple of kv_heads: {s:?}"
        );
        assert_eq!(self.q.len(), s.q_len(), "q");
        assert_eq!(self.k.len(), s.kv_len(), "k");
        assert_eq!(self.v.len(), s.kv_len(), "v");
        assert_eq!(self.prefix_k.len(), s.bank_len(), "prefix_k");
        assert_eq!(self.prefix_v.len(), s.bank_len(), "prefix_v");
        assert_eq!(self.prefix_index.len(), s.batch, "prefix_index");
        assert_eq!(self.valid_len.len(), s.batch, "valid_len");
        for (b, (&pi, &vl)) in self.prefix_index.iter().zip(self.valid_len).enumerate() {
            assert!(
                s.prefix == 0 || pi < s.n_prefixes,
                "sequence {b}: prefix index {pi} out of range"
            );
            assert!(vl <= s.seq, "sequence {b}: valid length {vl} > {}", s.seq);
        }
    }

    /// The keys and values query rows of sequence `b` read through kv head `hk`, concatenated:
    /// `[prefix ++ sequence[0..n]]`, each `[P + n, D]`.
    fn keys_values(&self, s: &AttnShape, b: usize, hk: usize, n: usize) -> (Vec<T>, Vec<T>) {
        let d = s.head_dim;
        let pre = (self.prefix_index[b] * s.kv_heads + hk) * s.prefix * d;
        let seq = (b * s.kv_heads + hk) * s.seq * d;
        let cat = |bank: &[T], buf: &[T]| {
            let mut out = bank[pre..pre + s.prefix * d].to_vec();
            out.extend_from_slice(&buf[seq..seq + n * d]);
            out
        };
        (cat(self.prefix_k, self.k), cat(self.prefix_v, self.v))
    }
}

/// Scaled, masked scores of query rows `0..n` against `[prefix ++ sequence[0..n]]`:
/// `S = Q·Kᵀ·scale`, `[n, P + n]`, with −∞ where sequence key `j` lies after query `t`.
fn scores<T: Real>(q: &[T], keys: &[T], n: usize, p_len: usize, d: usize, scale: T) -> Vec<T> {
    let width = p_len + n;
    let mut sc = vec![T::zero(); n * width];
    matmul(n, width, d, q, Trans::No, keys, Trans::Yes, &mut sc, false);
    for t in 0..n {
        for (j, x) in sc[t * width..(t + 1) * width].iter_mut().enumerate() {
            *x = if j <= p_len + t {
                *x * scale
            } else {
                T::neg_infinity()
            };
        }
    }
    sc
}

/// Forward: returns `(O [B,Hq,T,D], LSE [B,Hq,T])`, LSE in natural log.
pub fn forward<T: Real>(s: &AttnShape, inp: &AttnInputs<T>) -> (Vec<T>, Vec<T>) {
    inp.check(s);
    let (t_len, d, p_len) = (s.seq, s.head_dim, s.prefix);
    let mut o = vec![T::zero(); s.q_len()];
    let mut lse = vec![T::zero(); s.lse_len()];
    o.par_chunks_mut(t_len * d.max(1))
        .zip(lse.par_chunks_mut(t_len.max(1)))
        .enumerate()
        .for_each(|(bh, (o_bh, lse_bh))| {
            let (b, h) = (bh / s.q_heads, bh % s.q_heads);
            let n = inp.valid_len[b];
            if n == 0 {
                return;
            }
            let (keys, values) = inp.keys_values(s, b, h / s.group(), n);
            let q = &inp.q[bh * t_len * d..(bh * t_len + n) * d];
            // Softmax of each row, in place: scores become weights.
            let mut w = scores(q, &keys, n, p_len, d, inp.scale);
            for (t, row) in w.chunks_mut(p_len + n).enumerate() {
                // Keys after t are masked (−∞): weight 0, no exponential needed.
                let (visible, masked) = row.split_at_mut(p_len + t + 1);
                masked.fill(T::zero());
                let m = visible.iter().copied().fold(T::neg_infinity(), T::max);
                visible.iter_mut().for_each(|x| *x = (*x - m).exp());
                let z: T = visible.iter().copied().sum();
                visible.iter_mut().for_each(|x| *x /= z);
                lse_bh[t] = m + z.ln();
            }
            // O = W·V
            matmul(
                n,
                d,
                p_len + n,
                &w,
                Trans::No,
                &values,
                Trans::No,
                o_bh,
                false,
            );
        });
    (o, lse)
}

/// Backward from `dO`, given the forward's `O` and `LSE`.
pub fn backward<T: Real>(
    s: &AttnShape,
    inp: &AttnInputs<T>,
    o: &[T],
    lse: &[T],
    d_o: &[T],
) -> AttnGrads<T> {
    inp.check(s);
    assert_eq!(o.len(), s.q_len(), "o");
    assert_eq!(d_o.len(), s.q_len(), "d_o");
    assert_eq!(lse.len(), s.lse_len(), "lse");
    let (t_len, d, p_len) = (s.seq, s.head_dim, s.prefix);
    let mut dq = vec![T::zero(); s.q_len()];
    let mut dk = vec![T::zero(); s.kv_len()];
    let mut dv = vec![T::zero(); s.kv_len()];
    let block = t_len * d;
    // One task per (sequence, kv head): it owns dK/dV of that head and dQ of its query heads,
    // and returns its partial prefix gradients, reduced below in a fixed order.
    let partials: Vec<(usize, Vec<T>, Vec<T>)> = dq
        .par_chunks_mut((block * s.group()).max(1))
        .zip(
            dk.par_chunks_mut(block.max(1))
                .zip(dv.par_chunks_mut(block.max(1))),
        )
        .enumerate()
        .map(|(bk, (dq_g, (dk_bk, dv_bk)))| {
            let (b, hk) = (bk / s.kv_heads, bk % s.kv_heads);
            let pi = inp.prefix_index[b];
            let n = inp.valid_len[b];
            let width = p_len + n;
            // Gradients of [prefix ++ sequence[0..n]] keys and values, summed over query heads.
            let mut d_keys = vec![T::zero(); width * d];
            let mut d_values = vec![T::zero(); width * d];
            if n > 0 {
                let (keys, values) = inp.keys_values(s, b, hk, n);
                for g in 0..s.group() {
                    let bh = b * s.q_heads + hk * s.group() + g;
                    let rows = bh * t_len * d..(bh * t_len + n) * d;
                    let (q, dorow) = (&inp.q[rows.clone()], &d_o[rows.clone()]);
                    // P = exp(S − LSE), recomputed.
                    let mut p = scores(q, &keys, n, p_len, d, inp.scale);
                    for (t, row) in p.chunks_mut(width).enumerate() {
                        let l = lse[bh * t_len + t];
                        let (visible, masked) = row.split_at_mut(p_len + t + 1);
                        masked.fill(T::zero());
                        visible.iter_mut().for_each(|x| *x = (*x - l).exp());
                    }
                    // dV += Pᵀ·dO
                    matmul(
                        width,
                        d,
                        n,
                        &p,
                        Trans::Yes,
                        dorow,
                        Trans::No,
                        &mut d_values,
                        true,
                    );
                    // dP = dO·Vᵀ, then dS = P ∘ (dP − rowsum(dO ∘ O)) · scale, in place.
                    let mut ds = vec![T::zero(); n * width];
                    matmul(
                        n,
                        width,
                        d,
                        dorow,
                        Trans::No,
                        &values,
                        Trans::Yes,
                        &mut ds,
                        false,
                    );
                    for t in 0..n {
                        let r = (bh * t_len + t) * d;
                        let di = dot(&d_o[r..r + d], &o[r..r + d]);
                        for j in 0..width {
                            let x = &mut ds[t * width + j];
                            *x = p[t * width + j] * (*x - di) * inp.scale;
                        }
                    }
                    // dQ = dS·K, dK += dSᵀ·Q
                    let dq_rows = &mut dq_g[g * block..g * block + n * d];
                    matmul(
                        n,
                        d,
                        width,
                        &ds,
                        Trans::No,
                        &keys,
                        Trans::No,
                        dq_rows,
                        false,
                    );
                    matmul(
                        width,
                        d,
                        n,
                        &ds,
                        Trans::Yes,
                        q,
                        Trans::No,
                        &mut d_keys,
                        true,
                    );
                }
            }
            // Split [prefix ++ sequence] back: the sequence part is this head's dK/dV.
            dk_bk[..n * d].copy_from_slice(&d_keys[p_len * d..]);
            dv_bk[..n * d].copy_from_slice(&d_values[p_len * d..]);
            d_keys.truncate(p_len * d);
            d_values.truncate(p_len * d);
            (pi, d_keys, d_values)
        })
        .collect();
    let mut d_prefix_k = vec![T::zero(); s.bank_len()];
    let mut d_prefix_v = vec![T::zero(); s.bank_len()];
    if p_len > 0 {
        for (bk, (pi, dpk, dpv)) in partials.into_iter().enumerate() {
            let hk = bk % s.kv_heads;
            let off = (pi * s.kv_heads + hk) * p_len * d;
            axpy(T::one(), &dpk, &mut d_prefix_k[off..off + p_len * d]);
            axpy(T::one(), &dpv, &mut d_prefix_v[off..off + p_len * d]);
        }
    }
    AttnGrads {
        dq,
        dk,
        dv,
        d_prefix_k,
        d_prefix_v,
    }
}

#[inline]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::zero(), |acc, (&x, &y)| acc + x * y)
}

#[inline]
fn axpy<T: Real>(alpha: T, x: &[T], y: &mut [T]) {
    y.iter_mut().zip(x).for_each(|(y, &x)| *y += alpha * x);
}
