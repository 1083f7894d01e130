//! The scalar type of the reference path and its matrix product (device-neutral: the model,
//! prefix and reference modules all use it; `reference::real` re-exports it).
//!
//! Everything in `reference/` is generic over [`Real`] so the same code runs in f32 (the engine)
//! and in f64 (finite-difference tests and the precision oracle). Matrix products go through the
//! `gemm` crate (multithreaded with rayon, its AVX-512 kernels where the CPU has them), except the
//! one shape it is slow at, chosen by measurement (BENCHMARKS.md): an f32 product of a few rows by
//! a transposed weight matrix (decoding: `x · Wᵀ` with m ≤ 16 rows), which [`skinny`] does as
//! dot products of contiguous rows, the weights streamed once, without gemm's packing copy.

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
    if let (Trans::No, Trans::Yes, true) = (ta, tb, m <= skinny::MAX_ROWS) {
        if let (Some(a), Some(b), Some(c)) = (as_f32(a), as_f32(b), as_f32_mut(c)) {
            skinny::matmul_abt(m, n, k, a, b, c, accumulate);
            return;
        }
    }
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

/// `x` as `&[f32]` when `T` is f32.
fn as_f32<T: Real>(x: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32 (same type, so same size, alignment and validity).
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<f32>(), x.len()) })
}

/// `x` as `&mut [f32]` when `T` is f32.
fn as_f32_mut<T: Real>(x: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32 (same type); the borrow of `x` moves into the result.
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast::<f32>(), x.len()) })
}

/// The f32 product of a few rows by a transposed matrix, `c (+)= a · bᵀ` with `a` m×k (m ≤
/// [`MAX_ROWS`](skinny::MAX_ROWS)) and `b` n×k, both row-major: every output is the dot product
/// of two contiguous rows. The n output columns are split over rayon's threads in blocks; each
/// block streams its rows of `b` once (the `a` rows stay in L1/L2). With AVX-512 (detected at
/// run time) four rows of `a` share each load of `b` in explicit FMA intrinsics; otherwise the
/// dot products run in 16 independent lanes that LLVM vectorises (an AVX2+FMA copy and a
/// portable one).
pub mod skinny {
    use rayon::prelude::*;

    /// The most rows this path takes (above, gemm's kernels win).
    pub const MAX_ROWS: usize = 16;
    /// Output columns per task.
    const BLOCK: usize = 64;
    const LANES: usize = 16;

    /// `c[i][j] (+)= Σ_l a[i][l] · b[j][l]` for i < m, j < n, l < k.
    pub fn matmul_abt(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        accumulate: bool,
    ) {
        let blocks = n.div_ceil(BLOCK);
        let tile = |blk: usize| -> Vec<f32> {
            let j0 = blk * BLOCK;
            let j1 = (j0 + BLOCK).min(n);
            let mut out = vec![0f32; m * (j1 - j0)];
            dispatch(m, k, a, &b[j0 * k..j1 * k], j1 - j0, &mut out);
            out
        };
        let tiles: Vec<Vec<f32>> = if m * n * k >= 1 << 18 {
            (0..blocks).into_par_iter().map(tile).collect()
        } else {
            (0..blocks).map(tile).collect()
        };
        for (blk, t) in tiles.iter().enumerate() {
            let j0 = blk * BLOCK;
            let w = t.len() / m.max(1);
            for i in 0..m {
                let dst = &mut c[i * n + j0..i * n + j0 + w];
                let src = &t[i * w..(i + 1) * w];
                if accumulate {
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                } else {
                    dst.copy_from_slice(src);
                }
            }
        }
    }

    /// `out[i][j] = a_i · b_j` for the `nb` rows of `b`, on the best instruction set there is.
    fn dispatch(m: usize, k: usize, a: &[f32], b: &[f32], nb: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                return unsafe { tile_avx512(m, k, a, b, nb, out) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { tile_avx2(m, k, a, b, nb, out) };
            }
        }
        tile_portable(m, k, a, b, nb, out)
    }

    /// AVX-512: four rows of `a` against each row of `b` (each 16-float chunk of `b` loaded
    /// once per four FMAs), the ragged end of `k` by a masked load.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_avx512(m: usize, k: usize, a: &[f32], b: &[f32], nb: usize, out: &mut [f32]) {
        use std::arch::x86_64::*;
        assert!(a.len() >= m * k && b.len() >= nb * k && out.len() >= m * nb);
        let full = k / LANES * LANES;
        let tail: __mmask16 = ((1u32 << (k - full)) - 1) as __mmask16;
        // SAFETY (every load below): row r of `a` is a[r*k..(r+1)*k] and row j of `b` is
        // b[j*k..(j+1)*k], inside the slices by the assert; the chunk offsets stay below `full`
        // ≤ k and the masked tail loads only the k - full elements left.
        let row = |p: *const f32, c: usize| unsafe { _mm512_loadu_ps(p.add(c)) };
        let rest = |p: *const f32| unsafe { _mm512_maskz_loadu_ps(tail, p.add(full)) };
        for j in 0..nb {
            let bj = b.as_ptr().add(j * k);
            let mut i = 0;
            while i + 4 <= m {
                let r: [*const f32; 4] = std::array::from_fn(|t| a.as_ptr().add((i + t) * k));
                let mut s = [_mm512_setzero_ps(); 4];
                let mut c = 0;
                while c < full {
                    let q = row(bj, c);
                    for t in 0..4 {
                        s[t] = _mm512_fmadd_ps(row(r[t], c), q, s[t]);
                    }
                    c += LANES;
                }
                if full < k {
                    let q = rest(bj);
                    for t in 0..4 {
                        s[t] = _mm512_fmadd_ps(rest(r[t]), q, s[t]);
                    }
                }
                for t in 0..4 {
                    out[(i + t) * nb + j] = _mm512_reduce_add_ps(s[t]);
                }
                i += 4;
            }
            for i in i..m {
                let r = a.as_ptr().add(i * k);
                let mut s = _mm512_setzero_ps();
                let mut c = 0;
                while c < full {
                    s = _mm512_fmadd_ps(row(r, c), row(bj, c), s);
                    c += LANES;
                }
                if full < k {
                    s = _mm512_fmadd_ps(rest(r), rest(bj), s);
                }
                out[i * nb + j] = _mm512_reduce_add_ps(s);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2(m: usize, k: usize, a: &[f32], b: &[f32], nb: usize, out: &mut [f32]) {
        tile_portable(m, k, a, b, nb, out)
    }

    /// The tile, one dot product at a time (inlined into the AVX2 copy above, which LLVM
    /// vectorises for AVX2).
    #[inline(always)]
    fn tile_portable(m: usize, k: usize, a: &[f32], b: &[f32], nb: usize, out: &mut [f32]) {
        for j in 0..nb {
            let bj = &b[j * k..(j + 1) * k];
            for i in 0..m {
                out[i * nb + j] = dot(&a[i * k..(i + 1) * k], bj);
            }
        }
    }

    /// Every instruction-set variant this CPU can run, by name (for the tests).
    #[cfg(test)]
    #[allow(clippy::type_complexity)]
    pub(super) fn variants() -> Vec<(
        &'static str,
        fn(usize, usize, &[f32], &[f32], usize, &mut [f32]),
    )> {
        let mut v: Vec<(
            &'static str,
            fn(usize, usize, &[f32], &[f32], usize, &mut [f32]),
        )> = vec![("portable", tile_portable)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                v.push(("avx512", |m, k, a, b, nb, o| unsafe {
                    tile_avx512(m, k, a, b, nb, o)
                }));
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has AVX2 and FMA.
                v.push(("avx2", |m, k, a, b, nb, o| unsafe {
                    tile_avx2(m, k, a, b, nb, o)
                }));
            }
        }
        v
    }

    /// Σ x·y in [`LANES`] independent partial sums, then the remainder.
    #[inline(always)]
    fn dot(x: &[f32], y: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let (xc, yc) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
        let (xr, yr) = (xc.remainder(), yc.remainder());
        for (p, q) in xc.zip(yc) {
            for l in 0..LANES {
                acc[l] += p[l] * q[l];
            }
        }
        let mut s: f32 = acc.iter().sum();
        for (p, q) in xr.iter().zip(yr) {
            s += p * q;
        }
        s
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

    /// The f32 few-rows path (and gemm just above its row limit) against the f64 product, on
    /// random values, ragged sizes (n not a multiple of the block, k not of the lanes), both
    /// overwrite (over a poisoned output) and accumulate.
    #[test]
    fn f32_few_rows_path_matches_f64() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 200, 37),
            (3, 130, 576),
            (8, 1000, 64),
            (16, 65, 1537),
            (17, 70, 100),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let want = naive(
                m,
                n,
                k,
                &cast::<f32, f64>(&a),
                Trans::No,
                &cast::<f32, f64>(&b),
                Trans::Yes,
            );
            let mut c = vec![f32::NAN; m * n];
            matmul(m, n, k, &a, Trans::No, &b, Trans::Yes, &mut c, false);
            let e = rel_err(&c, &want);
            assert!(e < 1e-5, "m {m} n {n} k {k}: rel err {e:e}");
            matmul(m, n, k, &a, Trans::No, &b, Trans::Yes, &mut c, true);
            let twice: Vec<f64> = want.iter().map(|x| 2.0 * x).collect();
            let e = rel_err(&c, &twice);
            assert!(e < 1e-5, "accumulate m {m} n {n} k {k}: rel err {e:e}");
        }
    }

    /// Each instruction-set variant of the few-rows tile this CPU runs (not only the one the
    /// dispatch picks), against the f64 product, over a NaN-poisoned output; m covers the
    /// four-row groups, their remainder rows and both, k the 16-lane chunks and the ragged end.
    #[test]
    fn every_few_rows_variant_matches_f64() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x7113);
        let variants = skinny::variants();
        println!(
            "variants: {:?}",
            variants.iter().map(|v| v.0).collect::<Vec<_>>()
        );
        for &(m, nb, k) in &[(1, 3, 5), (4, 7, 16), (5, 9, 33), (7, 2, 576), (16, 5, 100)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..nb * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let want = naive(
                m,
                nb,
                k,
                &cast::<f32, f64>(&a),
                Trans::No,
                &cast::<f32, f64>(&b),
                Trans::Yes,
            );
            for (name, tile) in &variants {
                let mut out = vec![f32::NAN; m * nb];
                tile(m, k, &a, &b, nb, &mut out);
                let e = rel_err(&out, &want);
                assert!(e < 1e-5, "{name} m {m} nb {nb} k {k}: rel err {e:e}");
            }
        }
    }
}
