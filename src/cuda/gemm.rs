//! Row-major fp16 matrix products through cuBLAS (`cublasGemmEx`: fp16 in and out, fp32
//! accumulation), the two shapes a frozen model's forward and input-only backward need:
//!
//! - [`Gemm::a_bt`]: `C[m,n] = A[m,k] · B[n,k]ᵀ` — a linear layer `y = x·Wᵀ` with `W [out, in]`;
//! - [`Gemm::a_b`]: `C[m,n] = A[m,k] · B[k,n]` — its input gradient `dx = dy·W`.
//!
//! cuBLAS is column-major: a row-major `[r, c]` matrix is its column-major transpose. So for
//! row-major `C = A·Bᵀ` we ask cuBLAS for `Cᵀ = B·Aᵀ` (op(B) = T on the stored `[n,k]`, op(A) = N,
//! m ↔ n swapped), and for `C = A·B` for `Cᵀ = Bᵀ·Aᵀ` (both N).

use std::panic::{catch_unwind, AssertUnwindSafe};

use anyhow::{anyhow, bail, Result};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm as _, GemmConfig};
use cudarc::driver::{DevicePtr, DevicePtrMut};
use half::f16;

use super::context::GpuContext;

/// A cuBLAS handle bound to the context's stream.
pub struct Gemm {
    blas: CudaBlas,
}

fn dim(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow!("GEMM {what} = {v} exceeds cuBLAS's int range"))
}

fn check(what: &str, got: usize, want: usize) -> Result<()> {
    if got < want {
        bail!("GEMM operand {what}: {got} elements, the product needs {want}");
    }
    Ok(())
}

impl Gemm {
    /// Loads cuBLAS (an error, not a panic, when libcublas is missing) and binds it to the
    /// context's stream.
    pub fn new(gpu: &GpuContext) -> Result<Self> {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            bail!(
                "cuBLAS could not be loaded (libcublas.so.13 not found): install the CUDA 13 \
                 runtime libraries or add their directory to LD_LIBRARY_PATH"
            );
        }
        let stream = gpu.stream().clone();
        match catch_unwind(AssertUnwindSafe(|| CudaBlas::new(stream))) {
            Ok(Ok(blas)) => Ok(Gemm { blas }),
            Ok(Err(e)) => bail!("creating a cuBLAS handle: {e:?}"),
            Err(_) => bail!("creating a cuBLAS handle: the cuBLAS library failed to load"),
        }
    }

    /// Row-major `C[m,n] = A[m,k]·B[n,k]ᵀ + beta·C` (`beta` 0 overwrites C).
    #[allow(clippy::too_many_arguments)]
    pub fn a_bt<A, B, C>(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &A,
        b: &B,
        c: &mut C,
        beta: f32,
    ) -> Result<()>
    where
        A: DevicePtr<f16>,
        B: DevicePtr<f16>,
        C: DevicePtrMut<f16>,
    {
        check("A", a.len(), m * k)?;
        check("B", b.len(), n * k)?;
        check("C", c.len(), m * n)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: dim("n", n)?,
            n: dim("m", m)?,
            k: dim("k", k)?,
            alpha: f16::ONE,
            lda: dim("k", k.max(1))?,
            ldb: dim("k", k.max(1))?,
            beta: f16::from_f32(beta),
            ldc: dim("n", n)?,
        };
        // SAFETY: the operands hold at least the elements the product reads/writes (checked).
        unsafe { self.blas.gemm(cfg, b, a, c) }
            .map_err(|e| anyhow!("cuBLAS GEMM ({m}x{k})·({n}x{k})ᵀ failed: {e:?}"))
    }

    /// Row-major `C[m,n] = A[m,k]·B[k,n] + beta·C`.
    #[allow(clippy::too_many_arguments)]
    pub fn a_b<A, B, C>(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &A,
        b: &B,
        c: &mut C,
        beta: f32,
    ) -> Result<()>
    where
        A: DevicePtr<f16>,
        B: DevicePtr<f16>,
        C: DevicePtrMut<f16>,
    {
        check("A", a.len(), m * k)?;
        check("B", b.len(), k * n)?;
        check("C", c.len(), m * n)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: dim("n", n)?,
            n: dim("m", m)?,
            k: dim("k", k)?,
            alpha: f16::ONE,
            lda: dim("n", n)?,
            ldb: dim("k", k.max(1))?,
            beta: f16::from_f32(beta),
            ldc: dim("n", n)?,
        };
        // SAFETY: the operands hold at least the elements the product reads/writes (checked).
        unsafe { self.blas.gemm(cfg, b, a, c) }
            .map_err(|e| anyhow!("cuBLAS GEMM ({m}x{k})·({k}x{n}) failed: {e:?}"))
    }
}
