//! The model engine on the host emulation of the kernels: [`EmuBackend`] implements the
//! engine's [`Backend`] with host vectors as "device" buffers, the real kernel sources run
//! through the emulation ([`crate::emu::ops`], [`crate::emu`]) and a host GEMM that behaves like
//! cuBLAS's fp16 GEMM (fp16 in, fp32 accumulation, fp16 out). [`EmuEngine`] is the same engine
//! code as the GPU's `CudaEngine`, so tests check the whole engine (buffer wiring, fused weights,
//! residual/bias folding, the chunked head, the backward, loss scaling) against the CPU reference
//! without a GPU. It is slow (every block thread is an OS thread): for small models only.

use std::ops::Range;
use std::sync::Arc;

use anyhow::{bail, Result};
use half::f16;

use crate::cuda::abi::{
    pt_act_params, pt_ce_params, pt_embedding_params, pt_heads_params, pt_norm_params,
    pt_rows_params,
};
use crate::cuda::attention::NO_PREFIX;
use crate::cuda::backend::{AttnBufs, AttnGradBufs, Backend, Elem, NormBufs, RopeBufs};
use crate::cuda::decode::{DecodeBufs, DecodeShape};
use crate::cuda::engine::ModelEngine;
use crate::cuda::model_ops::check_len;
use crate::emu::ops::{self as emu_ops, HostRope};
use crate::emu::{self, HalfInputs};
use crate::model::config::ModelWeights;
use crate::reference::attention::AttnShape;
use crate::reference::real::{matmul, Trans};

/// Host buffers and the emulated kernels.
#[derive(Debug, Default)]
pub struct EmuBackend;

/// The model engine on the host emulation.
pub type EmuEngine = ModelEngine<EmuBackend>;

impl EmuEngine {
    /// The engine on the emulation (an error when this build has none).
    pub fn new_emulated(weights: Arc<ModelWeights<f32>>) -> Result<Self> {
        if !emu_ops::available() {
            bail!("this build has no host emulation of the kernels (CUDA headers not found)");
        }
        ModelEngine::with_backend(EmuBackend, weights)
    }
}

/// Attention backward outputs on the host.
pub struct EmuAttnScratch {
    dq: Vec<f16>,
    dk: Vec<f16>,
    dv: Vec<f16>,
    dpk: Vec<f16>,
    dpv: Vec<f16>,
}

fn put<T: Copy>(dst: &mut [T], src: &[T]) -> Result<()> {
    check_len("output", dst.len(), src.len())?;
    dst[..src.len()].copy_from_slice(src);
    Ok(())
}

fn host_rope<'a>(r: &'a Option<RopeBufs<'a, EmuBackend>>) -> Option<HostRope<'a>> {
    r.as_ref().map(|r| HostRope {
        pos_offset: r.pos_offset,
        cos: r.cos,
        sin: r.sin,
    })
}

fn half_inputs(s: &AttnShape, scale: f32, inp: &AttnBufs<'_, EmuBackend>) -> Result<HalfInputs> {
    check_len("q", inp.q.len(), s.q_len())?;
    check_len("k", inp.k.len(), s.kv_len())?;
    check_len("v", inp.v.len(), s.kv_len())?;
    check_len("prefix_k", inp.prefix_k.len(), s.bank_len())?;
    check_len("prefix_v", inp.prefix_v.len(), s.bank_len())?;
    check_len("prefix_index", inp.prefix_index.len(), s.batch)?;
    check_len("valid_len", inp.valid_len.len(), s.batch)?;
    Ok(HalfInputs {
        q: inp.q[..s.q_len()].to_vec(),
        k: inp.k[..s.kv_len()].to_vec(),
        v: inp.v[..s.kv_len()].to_vec(),
        prefix_k: inp.prefix_k[..s.bank_len()].to_vec(),
        prefix_v: inp.prefix_v[..s.bank_len()].to_vec(),
        prefix_index: inp.prefix_index[..s.batch]
            .iter()
            .map(|&x| usize::try_from(x).unwrap_or(NO_PREFIX))
            .collect(),
        valid_len: inp.valid_len[..s.batch]
            .iter()
            .map(|&x| x as usize)
            .collect(),
        scale,
    })
}

/// `C = op(A)·op(B)` like cuBLAS's fp16 GEMM: fp16 operands, fp32 accumulation, fp16 result.
#[allow(clippy::too_many_arguments)]
fn host_gemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f16],
    b: &[f16],
    b_trans: Trans,
    c: &mut [f16],
) -> Result<()> {
    check_len("GEMM A", a.len(), m * k)?;
    check_len("GEMM B", b.len(), n * k)?;
    check_len("GEMM C", c.len(), m * n)?;
    let a32: Vec<f32> = a[..m * k].iter().map(|x| x.to_f32()).collect();
    let b32: Vec<f32> = b[..n * k].iter().map(|x| x.to_f32()).collect();
    let mut c32 = vec![0.0f32; m * n];
    matmul(m, n, k, &a32, Trans::No, &b32, b_trans, &mut c32, false);
    for (o, v) in c.iter_mut().zip(&c32) {
        *o = f16::from_f32(*v);
    }
    Ok(())
}

impl Backend for EmuBackend {
    type Buf<T: Elem> = Vec<T>;
    type AttnScratch = EmuAttnScratch;

    fn describe(&self) -> String {
        "the host emulation of the kernels (CPU)".into()
    }

    fn memory_in_use(&self) -> Option<usize> {
        None
    }

    fn len<T: Elem>(b: &Vec<T>) -> usize {
        b.len()
    }

    fn alloc<T: Elem>(&self, _what: &str, n: usize) -> Result<Vec<T>> {
        Ok(vec![T::default(); n.max(1)])
    }

    fn write<T: Elem>(&self, what: &str, src: &[T], dst: &mut Vec<T>) -> Result<()> {
        if src.len() > dst.len() {
            bail!(
                "{what}: {} elements into a buffer of {}",
                src.len(),
                dst.len()
            );
        }
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn read<T: Elem>(&self, what: &str, src: &Vec<T>, range: Range<usize>) -> Result<Vec<T>> {
        if range.end > src.len() || range.start > range.end {
            bail!("{what}: range {range:?} of a buffer of {}", src.len());
        }
        Ok(src[range].to_vec())
    }

    fn copy<T: Elem>(
        &self,
        what: &str,
        src: &Vec<T>,
        range: Range<usize>,
        dst: &mut Vec<T>,
        at: usize,
    ) -> Result<()> {
        let n = range.len();
        if range.end > src.len() || at + n > dst.len() {
            bail!("{what}: copy {range:?} to {at} out of bounds");
        }
        dst[at..at + n].copy_from_slice(&src[range]);
        Ok(())
    }

    fn zero<T: Elem>(&self, _what: &str, dst: &mut Vec<T>) -> Result<()> {
        dst.iter_mut().for_each(|x| *x = T::default());
        Ok(())
    }

    fn gemm_a_bt(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &Vec<f16>,
        b: &Vec<f16>,
        c: &mut Vec<f16>,
    ) -> Result<()> {
        host_gemm(m, n, k, a, b, Trans::Yes, c)
    }

    fn gemm_a_b(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &Vec<f16>,
        b: &Vec<f16>,
        c: &mut Vec<f16>,
    ) -> Result<()> {
        host_gemm(m, n, k, a, b, Trans::No, c)
    }

    fn embedding(
        &self,
        p: &pt_embedding_params,
        tokens: &Vec<i32>,
        pos_offset: &Vec<i32>,
        tok_emb: &Vec<f16>,
        pos_emb: Option<&Vec<f16>>,
        x: &mut Vec<f32>,
    ) -> Result<()> {
        let out =
            emu_ops::embedding_forward(p, tokens, pos_offset, tok_emb, pos_emb.map(|v| &v[..]))?;
        put(x, &out)
    }

    fn add_norm(&self, p: &pt_norm_params, b: NormBufs<'_, Self>) -> Result<()> {
        let out = emu_ops::add_norm_forward(
            p,
            b.x,
            b.y.map(|v| &v[..]),
            b.y_bias.map(|v| &v[..]),
            b.w,
            b.b.map(|v| &v[..]),
            b.x_save.is_some(),
        )?;
        put(b.h, &out.h)?;
        if let (Some(dst), Some(src)) = (b.x_save, &out.x_save) {
            put(dst, src)?;
        }
        if let Some(dst) = b.mean {
            put(dst, &out.mean)?;
        }
        put(b.rstd, &out.rstd)
    }

    fn norm_bwd(
        &self,
        p: &pt_norm_params,
        dy: &Vec<f16>,
        x: &Vec<f16>,
        w: &Vec<f16>,
        mean: Option<&Vec<f32>>,
        rstd: &Vec<f32>,
        dx: &mut Vec<f32>,
        dx16: Option<&mut Vec<f16>>,
    ) -> Result<()> {
        let mean: &[f32] = mean.map_or(&[], |m| &m[..]);
        let out = emu_ops::norm_backward(p, dy, x, w, mean, rstd, dx)?;
        if let Some(dst) = dx16 {
            put(dst, &out)?;
        }
        Ok(())
    }

    fn gelu_fwd(
        &self,
        p: &pt_act_params,
        a: &mut Vec<f16>,
        bias: Option<&Vec<f16>>,
        out: &mut Vec<f16>,
    ) -> Result<()> {
        let y = emu_ops::gelu_forward(p, a, bias.map(|v| &v[..]))?;
        put(out, &y)
    }

    fn gelu_bwd(
        &self,
        p: &pt_act_params,
        dy: &Vec<f16>,
        a: &Vec<f16>,
        da: &mut Vec<f16>,
    ) -> Result<()> {
        put(da, &emu_ops::gelu_backward(p, dy, a)?)
    }

    fn swiglu_fwd(&self, p: &pt_act_params, gu: &Vec<f16>, out: &mut Vec<f16>) -> Result<()> {
        put(out, &emu_ops::swiglu_forward(p, gu)?)
    }

    fn swiglu_bwd(
        &self,
        p: &pt_act_params,
        dy: &Vec<f16>,
        gu: &Vec<f16>,
        dgu: &mut Vec<f16>,
    ) -> Result<()> {
        put(dgu, &emu_ops::swiglu_backward(p, dy, gu)?)
    }

    fn rows_to_heads(
        &self,
        p: &pt_heads_params,
        src: &Vec<f16>,
        bias: Option<&Vec<f16>>,
        rope: Option<RopeBufs<'_, Self>>,
        dst: &mut Vec<f16>,
    ) -> Result<()> {
        let r = host_rope(&rope);
        put(
            dst,
            &emu_ops::rows_to_heads(p, src, bias.map(|v| &v[..]), r.as_ref())?,
        )
    }

    fn heads_to_rows(
        &self,
        p: &pt_heads_params,
        src: &Vec<f16>,
        rope: Option<RopeBufs<'_, Self>>,
        dst: &mut Vec<f16>,
    ) -> Result<()> {
        let r = host_rope(&rope);
        emu_ops::heads_to_rows(p, src, r.as_ref(), dst)
    }

    fn gather_rows(
        &self,
        p: &pt_rows_params,
        src_rows: usize,
        src: &Vec<f16>,
        index: &Vec<i32>,
        dst: &mut Vec<f16>,
    ) -> Result<()> {
        let d = p.d as usize;
        check_len("src", src.len(), src_rows * d)?;
        put(dst, &emu_ops::gather_rows(p, &src[..src_rows * d], index)?)
    }

    fn scatter_rows(
        &self,
        p: &pt_rows_params,
        dst_rows: usize,
        src: &Vec<f16>,
        index: &Vec<i32>,
        dst: &mut Vec<f16>,
    ) -> Result<()> {
        let d = p.d as usize;
        check_len("dst", dst.len(), dst_rows * d)?;
        emu_ops::scatter_rows(p, src, index, &mut dst[..dst_rows * d])
    }

    fn cross_entropy(
        &self,
        p: &pt_ce_params,
        logits: &mut Vec<f16>,
        targets: &Vec<i32>,
        loss: &mut Vec<f32>,
    ) -> Result<()> {
        put(loss, &emu_ops::cross_entropy(p, logits, targets)?)
    }

    fn attn_scratch(&self, cap: &AttnShape) -> Result<EmuAttnScratch> {
        let z = |n: usize| vec![f16::ZERO; n.max(1)];
        Ok(EmuAttnScratch {
            dq: z(cap.q_len()),
            dk: z(cap.kv_len()),
            dv: z(cap.kv_len()),
            dpk: z(cap.bank_len()),
            dpv: z(cap.bank_len()),
        })
    }

    fn attn_fwd(
        &self,
        s: &AttnShape,
        scale: f32,
        inp: AttnBufs<'_, Self>,
        o: &mut Vec<f16>,
        lse: &mut Vec<f32>,
    ) -> Result<()> {
        let (oo, ll) = emu::forward(s, &half_inputs(s, scale, &inp)?)?;
        put(o, &oo)?;
        put(lse, &ll)
    }

    fn attn_bwd(
        &self,
        s: &AttnShape,
        scale: f32,
        deterministic: bool,
        inp: AttnBufs<'_, Self>,
        o: &Vec<f16>,
        lse: &Vec<f32>,
        d_o: &Vec<f16>,
        scratch: &mut EmuAttnScratch,
    ) -> Result<()> {
        check_len("o", o.len(), s.q_len())?;
        check_len("d_o", d_o.len(), s.q_len())?;
        check_len("lse", lse.len(), s.lse_len())?;
        let g = emu::backward(
            s,
            &half_inputs(s, scale, &inp)?,
            &o[..s.q_len()],
            &lse[..s.lse_len()],
            &d_o[..s.q_len()],
            deterministic,
        )?;
        put(&mut scratch.dq, &g.dq)?;
        put(&mut scratch.dk, &g.dk)?;
        put(&mut scratch.dv, &g.dv)?;
        put(&mut scratch.dpk, &g.d_prefix_k)?;
        put(&mut scratch.dpv, &g.d_prefix_v)
    }

    fn decode_attn(
        &self,
        s: &DecodeShape,
        scale: f32,
        bufs: DecodeBufs<'_, Vec<f16>>,
        past: &Vec<i32>,
        n_new: &Vec<i32>,
        o: &mut Vec<f16>,
    ) -> Result<()> {
        let host = DecodeBufs {
            q: &bufs.q[..],
            k_new: &bufs.k_new[..],
            v_new: &bufs.v_new[..],
            cache_k: &bufs.cache_k[..],
            cache_v: &bufs.cache_v[..],
        };
        crate::emu::decode::forward_into(s, scale, &host, &past[..s.batch], &n_new[..s.batch], o)
    }

    fn attn_grads(scratch: &EmuAttnScratch) -> AttnGradBufs<'_, Self> {
        AttnGradBufs {
            dq: &scratch.dq,
            dk: &scratch.dk,
            dv: &scratch.dv,
            d_prefix_k: &scratch.dpk,
            d_prefix_v: &scratch.dpv,
        }
    }
}
