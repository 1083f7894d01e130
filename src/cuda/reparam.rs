//! Li & Liang's prefix reparameterization MLP ([`Reparam`]) on a backend, in fp32: the matmuls,
//! bias adds, tanh and its derivative through `kernels/reparam.cu` (one thread per output, fp32
//! accumulation), the bias gradients as column sums. [`forward`] and [`backward`] follow
//! [`Reparam::forward`] / [`Reparam::backward`] step by step; parameters are uploaded per call
//! (they are small and the host owns them, see [`crate::cuda::device_optim`]).
//!
//! [`ReparamOps`] is what the backend needs: the GPU launches the kernels.

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::cuda::abi::PT_EW_THREADS;
use crate::cuda::backend::{Backend, GpuBackend};
use crate::cuda::context::launched;
use crate::prefix::{Reparam, ReparamCache, ReparamGrads};

/// The epilogue of one matmul (`PT_REPARAM_*` in `kernels/reparam.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// `c = acc`.
    Plain = 0,
    /// `c = acc + bias[j]`.
    Bias = 1,
    /// `c = tanh(acc + bias[j])`.
    Tanh = 2,
    /// `c = acc · (1 − h[i,j]²)`.
    TanhBwd = 3,
}

/// `C[m,n] = op(A)·op(B)` then the epilogue: `op(A)` is `A[m,k]`, or `A[k,m]ᵀ` with `ta`;
/// `op(B)` is `B[k,n]`, or `B[n,k]ᵀ` with `tb` (the reference `matmul`'s convention).
#[derive(Clone, Copy, Debug)]
pub struct GemmSpec {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ta: bool,
    pub tb: bool,
    pub epilogue: Epilogue,
}

impl GemmSpec {
    /// The sizes as the kernel's `int`s.
    pub fn dims(&self) -> Result<(i32, i32, i32)> {
        let i =
            |x: usize| i32::try_from(x).map_err(|_| anyhow!("reparam gemm: size {x} too large"));
        Ok((i(self.m)?, i(self.n)?, i(self.k)?))
    }

    /// Checks every buffer's length (`bias`, `h`: when the epilogue reads them).
    pub fn check(
        &self,
        a: usize,
        b: usize,
        bias: Option<usize>,
        h: Option<usize>,
        c: usize,
    ) -> Result<()> {
        let (m, n, k) = (self.m, self.n, self.k);
        let want = |what: &str, got: usize, expected: usize| -> Result<()> {
            if got != expected {
                bail!("reparam gemm {what}: expected {expected} elements, got {got}");
            }
            Ok(())
        };
        want("A", a, m * k)?;
        want("B", b, k * n)?;
        want("C", c, m * n)?;
        match self.epilogue {
            Epilogue::Plain => {}
            Epilogue::Bias | Epilogue::Tanh => want("bias", bias.unwrap_or(0), n)?,
            Epilogue::TanhBwd => want("H", h.unwrap_or(0), m * n)?,
        }
        self.dims().map(|_| ())
    }
}

/// (rows, cols) of a column sum of `x_len` elements into `cols` sums.
pub fn col_sum_dims(x_len: usize, cols: usize) -> Result<(i32, i32)> {
    if cols == 0 || x_len % cols != 0 {
        bail!("reparam col_sum: {x_len} elements are not rows of {cols}");
    }
    let i = |x: usize| i32::try_from(x).map_err(|_| anyhow!("reparam col_sum: size {x} too large"));
    Ok((i(x_len / cols)?, i(cols)?))
}

/// The reparameterization kernels of a backend.
pub trait ReparamOps: Backend {
    /// `pt_reparam_gemm`; `bias` / `h` only where the epilogue reads them.
    fn reparam_gemm(
        &self,
        s: &GemmSpec,
        a: &Self::Buf<f32>,
        b: &Self::Buf<f32>,
        bias: Option<&Self::Buf<f32>>,
        h: Option<&Self::Buf<f32>>,
        c: &mut Self::Buf<f32>,
    ) -> Result<()>;
    /// `out[j] = Σ_r x[r, j]`.
    fn col_sum(&self, x: &Self::Buf<f32>, out: &mut Self::Buf<f32>) -> Result<()>;
}

/// A grid-stride launch of `PT_EW_THREADS`-thread blocks (the kernels' `__launch_bounds__`)
/// over `work` items (at most 8 blocks per SM).
fn grid(be: &GpuBackend, work: usize) -> LaunchConfig {
    let cap = (be.gpu.sm_count() * 8) as usize;
    LaunchConfig {
        grid_dim: (
            work.div_ceil(PT_EW_THREADS as usize).clamp(1, cap) as u32,
            1,
            1,
        ),
        block_dim: (PT_EW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl ReparamOps for GpuBackend {
    fn reparam_gemm(
        &self,
        s: &GemmSpec,
        a: &Self::Buf<f32>,
        b: &Self::Buf<f32>,
        bias: Option<&Self::Buf<f32>>,
        h: Option<&Self::Buf<f32>>,
        c: &mut Self::Buf<f32>,
    ) -> Result<()> {
        s.check(
            a.len(),
            b.len(),
            bias.map(|x| x.len()),
            h.map(|x| x.len()),
            c.len(),
        )?;
        let (m, n, k) = s.dims()?;
        let (ta, tb, ep) = (s.ta as i32, s.tb as i32, s.epilogue as i32);
        let f = self.gpu.function("reparam", "pt_reparam_gemm")?;
        let cfg = grid(self, s.m * s.n);
        let mut l = self.gpu.stream().launch_builder(&f);
        l.arg(&m)
            .arg(&n)
            .arg(&k)
            .arg(&ta)
            .arg(&tb)
            .arg(&ep)
            .arg(a)
            .arg(b);
        l.arg(bias.unwrap_or(a)).arg(h.unwrap_or(a)).arg(c);
        // SAFETY: lengths checked above; unused bias/h pointers are valid and never read.
        launched("pt_reparam_gemm", unsafe { l.launch(cfg) })
    }

    fn col_sum(&self, x: &Self::Buf<f32>, out: &mut Self::Buf<f32>) -> Result<()> {
        let (rows, cols) = col_sum_dims(x.len(), out.len())?;
        let f = self.gpu.function("reparam", "pt_reparam_col_sum")?;
        let cfg = grid(self, out.len());
        let mut l = self.gpu.stream().launch_builder(&f);
        l.arg(&rows).arg(&cols).arg(x).arg(out);
        // SAFETY: x holds rows·cols elements, out cols.
        launched("pt_reparam_col_sum", unsafe { l.launch(cfg) })
    }
}

fn upload<B: Backend>(be: &B, what: &str, x: &[f32]) -> Result<B::Buf<f32>> {
    let mut buf = be.alloc::<f32>(what, x.len())?;
    be.write(what, x, &mut buf)?;
    Ok(buf)
}

fn gemm(m: usize, n: usize, k: usize, ta: bool, tb: bool, epilogue: Epilogue) -> GemmSpec {
    GemmSpec {
        m,
        n,
        k,
        ta,
        tb,
        epilogue,
    }
}

/// [`Reparam::forward`] on the backend: `H = tanh(E·W1ᵀ + b1)`, `Y = H·W2ᵀ + b2`.
pub fn forward<B: ReparamOps>(be: &B, r: &Reparam<f32>) -> Result<(Vec<f32>, ReparamCache<f32>)> {
    let (p, e, k, o) = (r.len, r.emb_dim, r.hidden, r.out_dim());
    let emb = upload(be, "reparam embedding", &r.embedding)?;
    let w1 = upload(be, "reparam W1", &r.w1)?;
    let b1 = upload(be, "reparam b1", &r.b1)?;
    let w2 = upload(be, "reparam W2", &r.w2)?;
    let b2 = upload(be, "reparam b2", &r.b2)?;
    let mut h = be.alloc::<f32>("reparam H", p * k)?;
    let mut y = be.alloc::<f32>("reparam output", p * o)?;
    be.reparam_gemm(
        &gemm(p, k, e, false, true, Epilogue::Tanh),
        &emb,
        &w1,
        Some(&b1),
        None,
        &mut h,
    )?;
    be.reparam_gemm(
        &gemm(p, o, k, false, true, Epilogue::Bias),
        &h,
        &w2,
        Some(&b2),
        None,
        &mut y,
    )?;
    let y = be.read("reparam output", &y, 0..p * o)?;
    let h = be.read("reparam H", &h, 0..p * k)?;
    Ok((y, ReparamCache { h }))
}

/// [`Reparam::backward`] on the backend from `d_peft` = dLoss/dY `[P, 2·L·kv_dim]`.
pub fn backward<B: ReparamOps>(
    be: &B,
    r: &Reparam<f32>,
    cache: &ReparamCache<f32>,
    d_peft: &[f32],
) -> Result<ReparamGrads<f32>> {
    let (p, e, k, o) = (r.len, r.emb_dim, r.hidden, r.out_dim());
    if d_peft.len() != p * o || cache.h.len() != p * k {
        bail!(
            "reparam backward: d_peft or the cache does not match the reparameterization's shape"
        );
    }
    let dy = upload(be, "reparam dY", d_peft)?;
    let h = upload(be, "reparam H", &cache.h)?;
    let emb = upload(be, "reparam embedding", &r.embedding)?;
    let w1 = upload(be, "reparam W1", &r.w1)?;
    let w2 = upload(be, "reparam W2", &r.w2)?;
    let mut dw2 = be.alloc::<f32>("reparam dW2", o * k)?;
    let mut db2 = be.alloc::<f32>("reparam db2", o)?;
    let mut da = be.alloc::<f32>("reparam dA", p * k)?;
    let mut dw1 = be.alloc::<f32>("reparam dW1", k * e)?;
    let mut db1 = be.alloc::<f32>("reparam db1", k)?;
    let mut demb = be.alloc::<f32>("reparam dE", p * e)?;
    // dW2 = dYᵀ·H, db2 = Σ_p dY, dA = (dY·W2) ⊙ (1 − H²), dW1 = dAᵀ·E, db1 = Σ_p dA, dE = dA·W1.
    be.reparam_gemm(
        &gemm(o, k, p, true, false, Epilogue::Plain),
        &dy,
        &h,
        None,
        None,
        &mut dw2,
    )?;
    be.col_sum(&dy, &mut db2)?;
    be.reparam_gemm(
        &gemm(p, k, o, false, false, Epilogue::TanhBwd),
        &dy,
        &w2,
        None,
        Some(&h),
        &mut da,
    )?;
    be.reparam_gemm(
        &gemm(k, e, p, true, false, Epilogue::Plain),
        &da,
        &emb,
        None,
        None,
        &mut dw1,
    )?;
    be.col_sum(&da, &mut db1)?;
    be.reparam_gemm(
        &gemm(p, e, k, false, false, Epilogue::Plain),
        &da,
        &w1,
        None,
        None,
        &mut demb,
    )?;
    Ok(ReparamGrads {
        embedding: be.read("reparam dE", &demb, 0..p * e)?,
        w1: be.read("reparam dW1", &dw1, 0..k * e)?,
        b1: be.read("reparam db1", &db1, 0..k)?,
        w2: be.read("reparam dW2", &dw2, 0..o * k)?,
        b2: be.read("reparam db2", &db2, 0..o)?,
    })
}
