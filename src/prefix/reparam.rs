//! Li & Liang's reparameterization of a prefix (PEFT's `prefix_projection=True`):
//! `Embedding(P, e) → Linear(e, k) → tanh → Linear(k, 2·L·kv_dim)` gives the PEFT tensor
//! `[P, 2·L·kv_dim]` (layout in [`super::peft`]). Every part is trained; after training only the
//! output is kept ([`Reparam::fold`]).
//!
//! Li & Liang embed in d_model; PEFT embeds in `token_dim` (= kv_dim); the embedding width `e` is
//! a parameter here. Weights are in PyTorch's layout (`[out, in]`) and initialised like PyTorch:
//! `nn.Embedding` ~ N(0, 1); `nn.Linear` weight and bias ~ U(−1/√in, 1/√in).
//!
//! With `E` the embedding, `A = E·W1ᵀ + b1`, `H = tanh(A)`, `Y = H·W2ᵀ + b2`:
//! `dW2 = dYᵀ·H`, `db2 = Σ_p dY`, `dA = (dY·W2) ⊙ (1 − H²)`, `dW1 = dAᵀ·E`, `db1 = Σ_p dA`,
//! `dE = dA·W1`.

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal, Uniform};

use super::peft::{from_peft, peft_width};
use super::PrefixBank;
use crate::real::{matmul, Real, Trans};

/// The reparameterization's parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Reparam<T> {
    pub n_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Prefix length P.
    pub len: usize,
    /// Embedding width `e`.
    pub emb_dim: usize,
    /// MLP hidden width `k` (Li & Liang: 512 or 800).
    pub hidden: usize,
    /// `[P, e]`.
    pub embedding: Vec<T>,
    /// `[k, e]`.
    pub w1: Vec<T>,
    /// `[k]`.
    pub b1: Vec<T>,
    /// `[2·L·kv_dim, k]`.
    pub w2: Vec<T>,
    /// `[2·L·kv_dim]`.
    pub b2: Vec<T>,
}

/// What the backward needs from the forward: `H = tanh(A)` `[P, k]`.
#[derive(Clone, Debug)]
pub struct ReparamCache<T> {
    pub h: Vec<T>,
}

/// Gradients of every parameter of a [`Reparam`] (same shapes).
#[derive(Clone, Debug, PartialEq)]
pub struct ReparamGrads<T> {
    pub embedding: Vec<T>,
    pub w1: Vec<T>,
    pub b1: Vec<T>,
    pub w2: Vec<T>,
    pub b2: Vec<T>,
}

impl<T: Real> ReparamGrads<T> {
    /// All gradients in one vector, in [`Reparam::to_flat`]'s order.
    pub fn to_flat(&self) -> Vec<T> {
        [&self.embedding, &self.w1, &self.b1, &self.w2, &self.b2]
            .into_iter()
            .flat_map(|v| v.iter().copied())
            .collect()
    }
}

/// `out[r, :] += bias` for every row.
fn add_bias<T: Real>(out: &mut [T], bias: &[T]) {
    for row in out.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(o, b)| *o += *b);
    }
}

/// Column sums of a `[rows, cols]` matrix.
fn col_sum<T: Real>(x: &[T], cols: usize) -> Vec<T> {
    let mut s = vec![T::zero(); cols];
    for row in x.chunks_exact(cols) {
        s.iter_mut().zip(row).for_each(|(a, b)| *a += *b);
    }
    s
}

impl<T: Real> Reparam<T> {
    /// PyTorch-default initialisation from a seeded generator.
    pub fn random(
        n_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        len: usize,
        emb_dim: usize,
        hidden: usize,
        seed: u64,
    ) -> Self {
        let out = peft_width(n_layers, kv_heads, head_dim);
        let mut rng = StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0, 1.0).unwrap();
        let mut uniform = |n: usize, fan_in: usize| -> Vec<T> {
            let b = 1.0 / (fan_in as f64).sqrt();
            let u = Uniform::new(-b, b).expect("Reparam::random: zero width");
            (0..n).map(|_| T::of(u.sample(&mut rng))).collect()
        };
        let w1 = uniform(hidden * emb_dim, emb_dim);
        let b1 = uniform(hidden, emb_dim);
        let w2 = uniform(out * hidden, hidden);
        let b2 = uniform(out, hidden);
        let mut rng = StdRng::seed_from_u64(seed ^ 0x9E37_79B9_7F4A_7C15);
        let embedding = (0..len * emb_dim)
            .map(|_| T::of(normal.sample(&mut rng)))
            .collect();
        Reparam {
            n_layers,
            kv_heads,
            head_dim,
            len,
            emb_dim,
            hidden,
            embedding,
            w1,
            b1,
            w2,
            b2,
        }
    }

    /// The same parameters in another scalar type.
    pub fn cast<U: Real>(&self) -> Reparam<U> {
        use crate::real::cast;
        Reparam {
            n_layers: self.n_layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            len: self.len,
            emb_dim: self.emb_dim,
            hidden: self.hidden,
            embedding: cast(&self.embedding),
            w1: cast(&self.w1),
            b1: cast(&self.b1),
            w2: cast(&self.w2),
            b2: cast(&self.b2),
        }
    }

    /// Output width `2·L·kv_dim`.
    pub fn out_dim(&self) -> usize {
        peft_width(self.n_layers, self.kv_heads, self.head_dim)
    }

    /// The PEFT tensor `[P, 2·L·kv_dim]` and the cache for [`backward`](Self::backward).
    pub fn forward(&self) -> (Vec<T>, ReparamCache<T>) {
        let (p, e, k, o) = (self.len, self.emb_dim, self.hidden, self.out_dim());
        let mut h = vec![T::zero(); p * k];
        matmul(
            p,
            k,
            e,
            &self.embedding,
            Trans::No,
            &self.w1,
            Trans::Yes,
            &mut h,
            false,
        );
        add_bias(&mut h, &self.b1);
        h.iter_mut().for_each(|x| *x = x.tanh());
        let mut y = vec![T::zero(); p * o];
        matmul(p, o, k, &h, Trans::No, &self.w2, Trans::Yes, &mut y, false);
        add_bias(&mut y, &self.b2);
        (y, ReparamCache { h })
    }

    /// Gradients of all parameters given `d_peft` = dLoss/d(output) `[P, 2·L·kv_dim]`.
    pub fn backward(&self, cache: &ReparamCache<T>, d_peft: &[T]) -> ReparamGrads<T> {
        let (p, e, k, o) = (self.len, self.emb_dim, self.hidden, self.out_dim());
        assert_eq!(d_peft.len(), p * o, "Reparam::backward: d_peft length");
        let h = &cache.h;
        let mut w2 = vec![T::zero(); o * k];
        matmul(o, k, p, d_peft, Trans::Yes, h, Trans::No, &mut w2, false);
        let b2 = col_sum(d_peft, o);
        let mut da = vec![T::zero(); p * k];
        matmul(
            p,
            k,
            o,
            d_peft,
            Trans::No,
            &self.w2,
            Trans::No,
            &mut da,
            false,
        );
        da.iter_mut()
            .zip(h)
            .for_each(|(d, &hv)| *d *= T::one() - hv * hv);
        let mut w1 = vec![T::zero(); k * e];
        matmul(
            k,
            e,
            p,
            &da,
            Trans::Yes,
            &self.embedding,
            Trans::No,
            &mut w1,
            false,
        );
        let b1 = col_sum(&da, k);
        let mut embedding = vec![T::zero(); p * e];
        matmul(
            p,
            e,
            k,
            &da,
            Trans::No,
            &self.w1,
            Trans::No,
            &mut embedding,
            false,
        );
        ReparamGrads {
            embedding,
            w1,
            b1,
            w2,
            b2,
        }
    }

    /// The plain prefix the reparameterization produces (what is kept after training).
    pub fn fold(&self) -> PrefixBank<T> {
        from_peft(
            &self.forward().0,
            self.n_layers,
            self.kv_heads,
            self.head_dim,
        )
    }

    /// Number of trained parameters.
    pub fn n_params(&self) -> usize {
        self.embedding.len() + self.w1.len() + self.b1.len() + self.w2.len() + self.b2.len()
    }

    /// All parameters in one vector: embedding, W1, b1, W2, b2 (for the optimizer).
    pub fn to_flat(&self) -> Vec<T> {
        [&self.embedding, &self.w1, &self.b1, &self.w2, &self.b2]
            .into_iter()
            .flat_map(|v| v.iter().copied())
            .collect()
    }

    /// Reads back what [`to_flat`](Self::to_flat) wrote.
    pub fn copy_from_flat(&mut self, flat: &[T]) {
        assert_eq!(
            flat.len(),
            self.n_params(),
            "Reparam::copy_from_flat: length"
        );
        let mut rest = flat;
        for part in [
            &mut self.embedding,
            &mut self.w1,
            &mut self.b1,
            &mut self.w2,
            &mut self.b2,
        ] {
            let (head, tail) = rest.split_at(part.len());
            part.copy_from_slice(head);
            rest = tail;
        }
    }
}
