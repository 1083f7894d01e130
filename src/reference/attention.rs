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

use super::real::Real;

/// Sizes of one prefix-attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Batch size (sequences).
    pub batch: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads; divides `q_heads`.
    pub kv_heads: usize,
    /// Sequence length (padded).
    pub seq: usize,
    /// Prefix length P (may be 0).
    pub prefix: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Number of prefixes in the bank.
    pub n_prefixes: usize,
}

impl AttnShape {
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }
    /// Elements of Q or O: `B·Hq·T·D`.
    pub fn q_len(&self) -> usize {
        self.batch * self.q_heads * self.seq * self.head_dim
    }
    /// Elements of sequence K or V: `B·Hkv·T·D`.
    pub fn kv_len(&self) -> usize {
        self.batch * self.kv_heads * self.seq * self.head_dim
    }
    /// Elements of the prefix bank for K or V: `n_prefixes·Hkv·P·D`.
    pub fn bank_len(&self) -> usize {
        self.n_prefixes * self.kv_heads * self.prefix * self.head_dim
    }
    /// Elements of the LSE: `B·Hq·T`.
    pub fn lse_len(&self) -> usize {
        self.batch * self.q_heads * self.seq
    }
}

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

    /// Row `t` of sequence K or V for (b, kv head).
    fn seq_row(buf: &'a [T], s: &AttnShape, b: usize, hk: usize, t: usize) -> &'a [T] {
        let off = ((b * s.kv_heads + hk) * s.seq + t) * s.head_dim;
        &buf[off..off + s.head_dim]
    }

    /// Row `j` of the prefix bank for (prefix, kv head).
    fn prefix_row(buf: &'a [T], s: &AttnShape, p: usize, hk: usize, j: usize) -> &'a [T] {
        let off = ((p * s.kv_heads + hk) * s.prefix + j) * s.head_dim;
        &buf[off..off + s.head_dim]
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

/// Scaled scores of one query row against [prefix ++ sequence[0..=t]].
fn row_scores<T: Real>(
    inp: &AttnInputs<T>,
    s: &AttnShape,
    b: usize,
    hk: usize,
    t: usize,
    q: &[T],
) -> Vec<T> {
    let pi = inp.prefix_index[b];
    let mut sc = Vec::with_capacity(s.prefix + t + 1);
    for j in 0..s.prefix {
        sc.push(dot(q, AttnInputs::prefix_row(inp.prefix_k, s, pi, hk, j)) * inp.scale);
    }
    for j in 0..=t {
        sc.push(dot(q, AttnInputs::seq_row(inp.k, s, b, hk, j)) * inp.scale);
    }
    sc
}

/// Forward: returns `(O [B,Hq,T,D], LSE [B,Hq,T])`, LSE in natural log.
pub fn forward<T: Real>(s: &AttnShape, inp: &AttnInputs<T>) -> (Vec<T>, Vec<T>) {
    inp.check(s);
    let (t_len, d) = (s.seq, s.head_dim);
    let mut o = vec![T::zero(); s.q_len()];
    let mut lse = vec![T::zero(); s.lse_len()];
    o.par_chunks_mut(t_len * d.max(1))
        .zip(lse.par_chunks_mut(t_len.max(1)))
        .enumerate()
        .for_each(|(bh, (o_bh, lse_bh))| {
            let (b, h) = (bh / s.q_heads, bh % s.q_heads);
            let hk = h / s.group();
            let pi = inp.prefix_index[b];
            for t in 0..inp.valid_len[b] {
                let q = &inp.q[(bh * t_len + t) * d..(bh * t_len + t + 1) * d];
                let sc = row_scores(inp, s, b, hk, t, q);
                let m = sc.iter().copied().fold(T::neg_infinity(), T::max);
                let w: Vec<T> = sc.iter().map(|&x| (x - m).exp()).collect();
                let z: T = w.iter().copied().sum();
                let out = &mut o_bh[t * d..(t + 1) * d];
                for (j, &wj) in w.iter().enumerate() {
                    let vrow = if j < s.prefix {
                        AttnInputs::prefix_row(inp.prefix_v, s, pi, hk, j)
                    } else {
                        AttnInputs::seq_row(inp.v, s, b, hk, j - s.prefix)
                    };
                    axpy(wj / z, vrow, out);
                }
                lse_bh[t] = m + z.ln();
            }
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
            let mut dpk = vec![T::zero(); p_len * d];
            let mut dpv = vec![T::zero(); p_len * d];
            for g in 0..s.group() {
                let h = hk * s.group() + g;
                let bh = b * s.q_heads + h;
                for t in 0..inp.valid_len[b] {
                    let r = (bh * t_len + t) * d;
                    let q = &inp.q[r..r + d];
                    let dorow = &d_o[r..r + d];
                    let di = dot(dorow, &o[r..r + d]);
                    let sc = row_scores(inp, s, b, hk, t, q);
                    let l = lse[bh * t_len + t];
                    let dq_row = &mut dq_g[(g * t_len + t) * d..(g * t_len + t + 1) * d];
                    for (j, &sj) in sc.iter().enumerate() {
                        let pij = (sj - l).exp();
                        let (krow, vrow) = if j < p_len {
                            (
                                AttnInputs::prefix_row(inp.prefix_k, s, pi, hk, j),
                                AttnInputs::prefix_row(inp.prefix_v, s, pi, hk, j),
                            )
                        } else {
                            (
                                AttnInputs::seq_row(inp.k, s, b, hk, j - p_len),
                                AttnInputs::seq_row(inp.v, s, b, hk, j - p_len),
                            )
                        };
                        let dp = dot(dorow, vrow);
                        let ds = pij * (dp - di) * inp.scale;
                        axpy(ds, krow, dq_row);
                        let (dk_row, dv_row) = if j < p_len {
                            (&mut dpk[j * d..(j + 1) * d], &mut dpv[j * d..(j + 1) * d])
                        } else {
                            let jj = j - p_len;
                            (
                                &mut dk_bk[jj * d..(jj + 1) * d],
                                &mut dv_bk[jj * d..(jj + 1) * d],
                            )
                        };
                        axpy(ds, q, dk_row);
                        axpy(pij, dorow, dv_row);
                    }
                }
            }
            (pi, dpk, dpv)
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
