//! The scalar type of the reference path and its matrix product (device-neutral: the model,
//! prefix and reference modules all use it; `reference::real` re-exports it).
//!
//! Everything in `reference/` is generic over [`Real`] so the same code runs in f32 (the engine)
//! and in f64 (finite-difference tests and the precision oracle). Matrix products go through the
//! `gemm` crate (multithreaded with rayon), never through hand-written loops.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

use num_traits::{Float, FromPrimitive, ToPrimitive};

/// A floating-point scalar the reference engine can run in (f32 or f64).
pub trait Real:
    Float
    + FromPrimitive
    + ToPrimitive
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + Default
    + Debug
    + Send
    + Sync
    + 'static
{
    /// Converts from f64 (rounding for f32).
    fn of(x: f64) -> Self;
    /// Converts to f64 exactly.
    fn f64(self) -> f64;
}

impl Real for f32 {
    #[inline]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn f64(self) -> f64 {
        self as f64
    }
}

impl Real for f64 {
    #[inline]
    fn of(x: f64) -> Self {
        x
    }
    #[inline]
    fn f64(self) -> f64 {
        self
    }
}

/// Whether a matrix operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    /// Use the row-major matrix as stored.
    No,
    /// Use its transpose.
    Yes,
}

/// `c = beta·c + a·b` on row-major matrices, where `a` is `m×k` after `ta` and `b` is `k×n`
/// after `tb`. `a` is stored as `m×k` (or `k×m` when transposed), `b` as `k×n` (or `n×k`).
/// `beta` must be 0 or 1 (overwrite or accumulate).
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    ta: Trans,
    b: &[T],
    tb: Trans,
    c: &mut [T],
    accumulate: bool,
) {
    assert!(
        a.len() >= m * k,
        "matmul: a has {} elements, needs {}",
        a.len(),
        m * k
    );
    assert!(
        b.len() >= k * n,
        "matmul: b has {} elements, needs {}",
        b.len(),
        k * n
    );
    assert!(
        c.len() >= m * n,
        "matmul: c has {} elements, needs {}",
        c.len(),
        m * n
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].iter_mut().for_each(|x| *x = T::zero());
        }
        return;
    }
    // Strides in elements: (row stride, column stride) of the logical operand.
    let (a_rs, a_cs) = match ta {
        Trans::No => (k as isize, 1),
        Trans::Yes => (1, m as isize),
    };
    let (b_rs, b_cs) = match tb {
        Trans::No => (n as isize, 1),
        Trans::Yes => (1, k as isize),
    };
    // Small products are not worth waking the thread pool.
    let parallelism = if m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above guarantee every addressed element lies inside its slice:
    // the largest offset of each operand is (rows-1)*rs + (cols-1)*cs < len.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            if accumulate { T::one() } else { T::zero() },
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Relative norm error ‖a − b‖ / ‖b‖ in f64 (b is the reference).
pub fn rel_err<A: Real, B: Real>(a: &[A], b: &[B]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_err: length mismatch");
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        let d = x.f64() - y.f64();
        num += d * d;
        den += y.f64() * y.f64();
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Converts a slice between scalar types.
pub fn cast<A: Real, B: Real>(x: &[A]) -> Vec<B> {
    x.iter().map(|v| B::of(v.f64())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f64], ta: Trans, b: &[f64], tb: Trans) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    let av = if ta == Trans::No {
                        a[i * k + p]
                    } else {
                        a[p * m + i]
                    };
                    let bv = if tb == Trans::No {
                        b[p * n + j]
                    } else {
                        b[j * k + p]
                    };
                    s += av * bv;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn matmul_matches_naive_in_every_transpose() {
        let (m, n, k) = (7, 5, 9);
        let a: Vec<f64> = (0..m * k)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0)
            .collect();
        let b: Vec<f64> = (0..k * n)
            .map(|i| ((i * 17 % 13) as f64 - 6.0) / 5.0)
            .collect();
        for ta in [Trans::No, Trans::Yes] {
            for tb in [Trans::No, Trans::Yes] {
                let want = naive(m, n, k, &a, ta, &b, tb);
                let mut c = vec![1.0; m * n];
                matmul(m, n, k, &a, ta, &b, tb, &mut c, false);
                assert!(rel_err(&c, &want) < 1e-14, "{ta:?} {tb:?}");
                matmul(m, n, k, &a, ta, &b, tb, &mut c, true);
                let twice: Vec<f64> = want.iter().map(|x| 2.0 * x).collect();
                assert!(rel_err(&c, &twice) < 1e-14, "accumulate {ta:?} {tb:?}");
            }
        }
    }
}
