//! One training call's device work: the forward from the bank (`BankSource`), the loss head on
//! the target rows in chunks (`LossSink`), the prefix-only backward down to the bank's gradient
//! (`GradSink`), and the dynamic loss scaling (as torch's `GradScaler`) that decides after it.

use super::*;

/// Dynamic loss scale.
#[derive(Clone, Copy, Debug)]
pub(super) struct LossScaler {
    pub(super) scale: f32,
    pub(super) good_steps: u32,
}

/// Where a call's prefix bank comes from.
pub(crate) enum BankSource<'a, B: Backend> {
    /// No prefix (the base model).
    None,
    /// A host bank, uploaded in fp16 (the engine's calls from the [`Engine`] interface).
    Host(&'a PrefixBank<f32>),
    /// A device-resident fp32 master bank in [`PrefixBank::to_flat`]'s order
    /// (`[L][K|V][n, Hkv, P, D]`), rounded to fp16 into the workspace by kernels (training with
    /// the state on the device: nothing crosses the bus).
    Device {
        master: &'a B::Buf<f32>,
        n_prefixes: usize,
        len: usize,
    },
}

impl<B: Backend> BankSource<'_, B> {
    /// (prefix length, number of prefixes); (0, 0) without a prefix.
    pub(super) fn dims(&self) -> (usize, usize) {
        match self {
            BankSource::Host(p) if p.len > 0 => (p.len, p.n_prefixes),
            BankSource::Device {
                n_prefixes, len, ..
            } if *len > 0 => (*len, *n_prefixes),
            _ => (0, 0),
        }
    }
}

/// Where the head's per-target losses go.
pub(super) enum LossSink<'a, B: Backend> {
    /// Read back: `head` returns the loss sum of each sequence.
    Host,
    /// Left on the device from element `at` of `buf`, in target order (read later, with the
    /// rest of a training step's results, in one transfer).
    Device { buf: &'a mut B::Buf<f32>, at: usize },
}

/// Where the backward's per-layer prefix gradients (loss-scaled, fp32, flat in
/// [`PrefixBank::to_flat`]'s order) go.
pub(super) enum GradSink<'a, B: Backend> {
    /// The workspace, for [`ModelEngine::download_prefix_grads`].
    Workspace,
    /// A device buffer: written (`accumulate` false) or added to (gradient accumulation over a
    /// step's micro-batches).
    Device {
        grad: &'a mut B::Buf<f32>,
        accumulate: bool,
    },
}

/// Sizes of one call.
#[derive(Clone, Copy, Debug)]
pub(super) struct CallShape {
    pub(super) batch: usize,
    pub(super) seq: usize,
    pub(super) prefix: usize,
    pub(super) n_prefixes: usize,
}

impl CallShape {
    pub(super) fn rows(&self) -> usize {
        self.batch * self.seq
    }
}

impl<B: Backend> ModelEngine<B> {
    /// Makes sure the workspace and RoPE tables fit `shape` (grow only).
    pub(super) fn prepare(
        &mut self,
        shape: &CallShape,
        train: bool,
        max_position: usize,
    ) -> Result<()> {
        let want = Capacity {
            batch: shape.batch,
            seq: shape.seq,
            prefix: shape.prefix,
            n_prefixes: shape.n_prefixes,
            train,
            recompute: self.recompute,
        };
        let fits = self.ws.as_ref().is_some_and(|w| w.cap.covers(&want));
        if !fits {
            let cap = self.ws.as_ref().map_or(want, |w| w.cap.max(&want));
            self.ws = None; // free the old one first
            self.ws = Some(Workspace::new(
                &self.be,
                &self.cfg,
                cap,
                self.head_chunk_elems,
            )?);
        }
        if self.cfg.arch == Arch::Llama
            && self
                .rope
                .as_ref()
                .map_or(true, |r| r.n_positions < max_position)
        {
            let n = max_position.max(self.cfg.max_positions.min(1 << 16));
            self.rope = Some(RopeTables::new(&self.be, &self.cfg, n)?);
        }
        Ok(())
    }

    /// The loss scaler after a backward at the current scale (torch's `GradScaler.update`):
    /// `finite` counts a clean step (the scale doubles after `GROWTH_INTERVAL` of them);
    /// otherwise the scale is halved and returned (the step is to be skipped), or an error
    /// when it is already as low as it goes.
    pub(crate) fn after_backward(&mut self, finite: bool) -> Result<Option<f32>> {
        let s = self.scaler.scale;
        if finite {
            self.scaler.good_steps += 1;
            if self.scaler.good_steps >= GROWTH_INTERVAL && s < MAX_SCALE {
                self.scaler.scale = s * 2.0;
                self.scaler.good_steps = 0;
            }
            return Ok(None);
        }
        self.scaler.good_steps = 0;
        let new_scale = s / 2.0;
        if new_scale < MIN_SCALE {
            bail!(
                "the prefix gradient is not finite even at loss scale {s}: the fp16 backward \
                 overflowed (use --device cpu)"
            );
        }
        self.scaler.scale = new_scale;
        self.overflow_skips += 1;
        Ok(Some(new_scale))
    }

    /// One micro-batch of a training step whose state stays on the device: the forward from
    /// the fp32 master bank `master` (`n_prefixes` prefixes of length `len`, flat in
    /// [`PrefixBank::to_flat`]'s order), the head with its per-target losses copied to
    /// `losses[at..]` (unscaled, in target order), and the backward of
    /// `loss_scale · Σ loss / step_targets` with the prefix gradient written to `grad`, or added
    /// to it with `accumulate`. Nothing is read back and nothing waits for the device. Returns
    /// the micro-batch's target count. `check` is a bank of the master's shape (for the input
    /// checks only).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn train_micro(
        &mut self,
        master: &B::Buf<f32>,
        check: &PrefixBank<f32>,
        batch: &Batch,
        opts: &RunOptions,
        step_targets: usize,
        losses: &mut B::Buf<f32>,
        at: usize,
        grad: &mut B::Buf<f32>,
        accumulate: bool,
    ) -> Result<usize> {
        check_run(&self.cfg, Some(check), batch, opts)?;
        let n: usize = batch.n_targets().iter().sum();
        ensure!(
            n > 0 && step_targets >= n,
            "a training micro-batch needs target tokens ({n} of {step_targets})"
        );
        ensure!(
            B::len(master) == check.n_params() && B::len(grad) >= check.n_params(),
            "device training state: {} master / {} gradient elements for a bank of {}",
            B::len(master),
            B::len(grad),
            check.n_params()
        );
        let source = BankSource::Device {
            master,
            n_prefixes: check.n_prefixes,
            len: check.len,
        };
        let shape = self.forward(source, batch, opts, true)?;
        let s = self.scaler.scale;
        let sink = LossSink::Device { buf: losses, at };
        self.head(&shape, batch, Some(s / step_targets as f32), sink)?;
        self.backward(&shape, GradSink::Device { grad, accumulate })?;
        self.note_memory();
        Ok(n)
    }

    /// Uploads the batch and the bank, runs the forward to the final hidden states (in
    /// `ws.h`), keeping per-layer activations when `train`.
    pub(super) fn forward(
        &mut self,
        prefix: BankSource<'_, B>,
        batch: &Batch,
        opts: &RunOptions,
        train: bool,
    ) -> Result<CallShape> {
        let cfg = self.cfg.clone();
        let (p_len, n_prefixes) = prefix.dims();
        let shape = CallShape {
            batch: batch.batch,
            seq: batch.seq,
            prefix: p_len,
            n_prefixes,
        };
        let offset = match opts.positions {
            Positions::AfterPrefix => p_len,
            Positions::FromZero => 0,
        };
        self.prepare(&shape, train, offset + batch.seq)?;
        let Self {
            be,
            model,
            ws,
            rope,
            ..
        } = self;
        let ws = ws.as_mut().expect("prepared workspace");
        let (b, t, rows) = (shape.batch, shape.seq, shape.rows());
        let hd = cfg.head_dim;

        // Inputs.
        let tokens: Vec<i32> = batch.tokens.iter().map(|&t| t as i32).collect();
        be.write("uploading token ids", &tokens, &mut ws.tokens)?;
        be.write(
            "uploading position offsets",
            &vec![offset as i32; b],
            &mut ws.pos_offset,
        )?;
        let s_attn = AttnShape {
            batch: b,
            q_heads: cfg.n_heads,
            kv_heads: cfg.n_kv_heads,
            seq: t,
            prefix: p_len,
            head_dim: hd,
            n_prefixes,
        };
        let (pi, vl) = attn::index_arrays(&s_attn, &batch.prefix_index, &batch.valid_len)?;
        be.write("uploading prefix indices", &pi, &mut ws.prefix_index)?;
        be.write("uploading valid lengths", &vl, &mut ws.valid_len)?;
        let bank_len = s_attn.bank_len();
        match prefix {
            _ if bank_len == 0 => {}
            BankSource::None => {}
            BankSource::Host(p) => {
                for l in 0..cfg.n_layers {
                    let (bk, bv) = &mut ws.bank[l];
                    be.write("uploading prefix keys", &to_f16(&p.k[l]), bk)?;
                    be.write("uploading prefix values", &to_f16(&p.v[l]), bv)?;
                }
            }
            BankSource::Device { master, .. } => {
                for l in 0..cfg.n_layers {
                    let (bk, bv) = &mut ws.bank[l];
                    let base = 2 * l * bank_len;
                    be.to_f16(master, base..base + bank_len, bk, 0)?;
                    be.to_f16(master, base + bank_len..base + 2 * bank_len, bv, 0)?;
                }
            }
        }

        embed(be, &cfg, model, b, t, ws)?;

        // The branch output still to be added to the residual, with its bias.
        let mut pending: Option<Option<&B::Buf<f16>>> = None;
        let n_saved = ws.saved.len();
        for (l, lw) in model.layers.iter().enumerate() {
            let keep_input = !ws.layer_inputs.is_empty();
            layer_forward(
                be,
                &cfg,
                lw,
                ws,
                rope.as_ref(),
                Attend::Batch(&s_attn),
                l,
                l % n_saved,
                pending,
                keep_input,
            )?;
            pending = Some(lw.b_out.as_ref());
        }
        final_norm(be, &cfg, model, ws, rows, pending)?;
        Ok(shape)
    }

    /// The head and cross-entropy over the target rows, in chunks. Returns the loss sum per
    /// sequence; with `grad_scale`, leaves the gradient of `grad_scale·Σ loss` with respect to
    /// the hidden states in `ws.y` (zero on other rows).
    pub(super) fn head(
        &mut self,
        shape: &CallShape,
        batch: &Batch,
        grad_scale: Option<f32>,
        mut sink: LossSink<'_, B>,
    ) -> Result<Vec<f64>> {
        let Self {
            be, model, ws, cfg, ..
        } = self;
        let ws = ws.as_mut().expect("workspace");
        let (d, vocab) = (cfg.d_model, cfg.vocab_size);
        let rows = shape.rows();
        let targets: Vec<(usize, u32)> = (0..rows)
            .filter(|&r| batch.is_valid_row(r))
            .filter_map(|r| batch.labels[r].map(|t| (r, t)))
            .collect();
        if grad_scale.is_some() {
            be.zero("zeroing the hidden-state gradient", &mut ws.y)?;
        }
        let head = model.head();
        let mut offset = 0;
        for group in targets.chunks(ws.chunk) {
            let c = group.len();
            let idx: Vec<i32> = group.iter().map(|&(r, _)| r as i32).collect();
            let labels: Vec<i32> = group.iter().map(|&(_, t)| t as i32).collect();
            be.write("uploading head rows", &idx, &mut ws.head_idx)?;
            be.write("uploading labels", &labels, &mut ws.head_labels)?;
            let rp = ops::rows_params(c, d)?;
            be.gather_rows(&rp, rows, &ws.h, &ws.head_idx, &mut ws.head_h)?;
            be.gemm_a_bt(c, vocab, d, &ws.head_h, head, &mut ws.logits)?;
            let cp = ops::ce_params(c, vocab, grad_scale)?;
            be.cross_entropy(&cp, &mut ws.logits, &ws.head_labels, &mut ws.chunk_loss)?;
            let (dst, at) = match &mut sink {
                LossSink::Host => (&mut ws.head_loss, offset),
                LossSink::Device { buf, at } => (&mut **buf, *at + offset),
            };
            be.copy("collecting losses", &ws.chunk_loss, 0..c, dst, at)?;
            if grad_scale.is_some() {
                be.gemm_a_b(c, d, vocab, &ws.logits, head, &mut ws.head_dh)?;
                be.scatter_rows(&rp, rows, &ws.head_dh, &ws.head_idx, &mut ws.y)?;
            }
            offset += c;
        }
        let mut loss_sum = vec![0.0f64; shape.batch];
        if offset > 0 && matches!(sink, LossSink::Host) {
            let losses = be.read("downloading losses", &ws.head_loss, 0..offset)?;
            for (&(r, _), &l) in targets.iter().zip(&losses) {
                loss_sum[r / shape.seq] += l as f64;
            }
        }
        Ok(loss_sum)
    }

    /// Full-vocabulary logits `[rows.len(), V]` of the given rows of the last forward's hidden
    /// states (`n_rows` rows in all), in chunks of the head workspace.
    pub(super) fn row_logits(&mut self, rows: &[usize], n_rows: usize) -> Result<Vec<f32>> {
        let Self {
            be, model, ws, cfg, ..
        } = self;
        let ws = ws.as_mut().expect("workspace");
        let (d, vocab) = (cfg.d_model, cfg.vocab_size);
        let mut out = Vec::with_capacity(rows.len() * vocab);
        for group in rows.chunks(ws.chunk) {
            let c = group.len();
            let idx: Vec<i32> = group.iter().map(|&r| r as i32).collect();
            be.write("uploading logit rows", &idx, &mut ws.head_idx)?;
            let rp = ops::rows_params(c, d)?;
            be.gather_rows(&rp, n_rows, &ws.h, &ws.head_idx, &mut ws.head_h)?;
            be.gemm_a_bt(c, vocab, d, &ws.head_h, model.head(), &mut ws.logits)?;
            let l = be.read("downloading logits", &ws.logits, 0..c * vocab)?;
            out.extend(l.iter().map(|x| x.to_f32()));
        }
        Ok(out)
    }

    /// The prefix-only backward from the hidden-state gradient in `ws.y`, the (loss-scaled)
    /// prefix gradient into `sink`.
    pub(super) fn backward(&mut self, shape: &CallShape, mut sink: GradSink<'_, B>) -> Result<()> {
        let cfg = self.cfg.clone();
        let deterministic = self.deterministic;
        let Self {
            be,
            model,
            ws,
            rope,
            ..
        } = self;
        let ws = ws.as_mut().expect("workspace");
        let (b, t, rows) = (shape.batch, shape.seq, shape.rows());
        let (d, hd) = (cfg.d_model, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.q_dim(), cfg.kv_dim());
        let qkv_w = q_dim + 2 * kv_dim;
        let kind = norm_kind(&cfg);
        let use_rope = cfg.arch == Arch::Llama;
        let n_pos = rope.as_ref().map_or(0, |r| r.n_positions);
        let s_attn = AttnShape {
            batch: b,
            q_heads: cfg.n_heads,
            kv_heads: cfg.n_kv_heads,
            seq: t,
            prefix: shape.prefix,
            head_dim: hd,
            n_prefixes: shape.n_prefixes,
        };
        let bank_len = s_attn.bank_len();

        // Final norm: dx = norm'(dh).
        let p0 = ops::norm_params(rows, d, cfg.norm_eps, kind, false)?;
        be.norm_bwd(
            &p0,
            &ws.y,
            &ws.final_x,
            &model.final_norm_w,
            Some(&ws.final_mean),
            &ws.final_rstd,
            &mut ws.dx,
            Some(&mut ws.dx16),
        )?;
        let pacc = ops::norm_params(rows, d, cfg.norm_eps, kind, true)?;
        let act_p = ops::act_params(rows, cfg.d_ff)?;
        let n_saved = ws.saved.len();
        for l in (0..cfg.n_layers).rev() {
            let lw = &model.layers[l];
            if !ws.layer_inputs.is_empty() {
                // Recomputation: rerun this layer's forward from its kept input into slot 0.
                let rd = rows * d;
                let (x, inputs) = (&mut ws.x, &ws.layer_inputs);
                be.copy("restoring a layer input", &inputs[l], 0..rd, x, 0)?;
                let attend = Attend::Batch(&s_attn);
                layer_forward(be, &cfg, lw, ws, rope.as_ref(), attend, l, 0, None, false)?;
            }
            let sv = &ws.saved[l % n_saved];
            // MLP block: d_act = dx·W_out, through the activation, dh = d_a·W_in, norm'.
            be.gemm_a_b(rows, cfg.d_ff, d, &ws.dx16, &lw.w_out, &mut ws.act)?;
            let f_in = match cfg.arch {
                Arch::Gpt2 => {
                    be.gelu_bwd(&act_p, &ws.act, &sv.a, &mut ws.d_a)?;
                    cfg.d_ff
                }
                Arch::Llama => {
                    be.swiglu_bwd(&act_p, &ws.act, &sv.a, &mut ws.d_a)?;
                    2 * cfg.d_ff
                }
            };
            be.gemm_a_b(rows, d, f_in, &ws.d_a, &lw.w_in, &mut ws.y)?;
            be.norm_bwd(
                &pacc,
                &ws.y,
                &sv.mlp_x,
                &lw.mlp_norm_w,
                Some(&sv.mlp_mean),
                &sv.mlp_rstd,
                &mut ws.dx,
                Some(&mut ws.dx16),
            )?;

            // Attention block: dO = dx·W_o in heads, the attention backward, then (below layer
            // 0 only) back through RoPE, the QKV projection and the norm.
            be.gemm_a_b(rows, q_dim, d, &ws.dx16, &lw.wo, &mut ws.o_rows)?;
            let op = ops::heads_params(b, t, cfg.n_heads, hd, q_dim, 0, false, 0)?;
            be.rows_to_heads(&op, &ws.o_rows, None, None, &mut ws.d_o)?;
            let (bk, bv) = &ws.bank[l];
            let inputs = AttnBufs {
                q: &sv.q,
                k: &sv.k,
                v: &sv.v,
                prefix_k: bk,
                prefix_v: bv,
                prefix_index: &ws.prefix_index,
                valid_len: &ws.valid_len,
            };
            be.attn_bwd(
                &s_attn,
                attn_scale(&cfg),
                deterministic,
                inputs,
                &sv.o,
                &sv.lse,
                &ws.d_o,
                &mut ws.attn,
            )?;
            let grads = B::attn_grads(&ws.attn);
            if bank_len > 0 {
                let base = l * 2 * bank_len;
                let parts = [
                    (grads.d_prefix_k, base),
                    (grads.d_prefix_v, base + bank_len),
                ];
                for (src, at) in parts {
                    match &mut sink {
                        GradSink::Workspace => be.copy(
                            "collecting prefix gradients",
                            src,
                            0..bank_len,
                            &mut ws.prefix_grads,
                            at,
                        )?,
                        GradSink::Device {
                            grad,
                            accumulate: false,
                        } => be.copy("collecting prefix gradients", src, 0..bank_len, grad, at)?,
                        GradSink::Device {
                            grad,
                            accumulate: true,
                        } => be.accumulate(src, 0..bank_len, grad, at)?,
                    }
                }
            }
            if l == 0 {
                break;
            }
            let parts = [
                (grads.dq, 0, cfg.n_heads, use_rope),
                (grads.dk, q_dim, cfg.n_kv_heads, use_rope),
                (grads.dv, q_dim + kv_dim, cfg.n_kv_heads, false),
            ];
            for (src, col, heads, rot) in parts {
                let hp = ops::heads_params(b, t, heads, hd, qkv_w, col, rot, n_pos)?;
                let rope_bufs = rot.then(|| {
                    let r = rope.as_ref().expect("RoPE tables");
                    RopeBufs {
                        pos_offset: &ws.pos_offset,
                        cos: &r.cos,
                        sin: &r.sin,
                    }
                });
                be.heads_to_rows(&hp, src, rope_bufs, &mut ws.qkv)?;
            }
            be.gemm_a_b(rows, d, qkv_w, &ws.qkv, &lw.wqkv, &mut ws.y)?;
            be.norm_bwd(
                &pacc,
                &ws.y,
                &sv.attn_x,
                &lw.attn_norm_w,
                Some(&sv.attn_mean),
                &sv.attn_rstd,
                &mut ws.dx,
                Some(&mut ws.dx16),
            )?;
        }

        Ok(())
    }

    /// The prefix gradient [`ModelEngine::backward`] left in the workspace, times `unscale`, on
    /// the host; `None` when it is not finite (fp16 overflow).
    pub(super) fn download_prefix_grads(
        &mut self,
        shape: &CallShape,
        unscale: f32,
    ) -> Result<Option<PrefixBank<f32>>> {
        let cfg = &self.cfg;
        let (be, ws) = (&self.be, self.ws.as_ref().expect("workspace"));
        let hd = cfg.head_dim;
        let bank_len = shape.n_prefixes * cfg.n_kv_heads * shape.prefix * hd;
        let mut grad = PrefixBank::<f32>::zeros(
            shape.n_prefixes,
            cfg.n_layers,
            cfg.n_kv_heads,
            shape.prefix,
            hd,
        );
        if bank_len > 0 {
            let all = be.read(
                "downloading prefix gradients",
                &ws.prefix_grads,
                0..cfg.n_layers * 2 * bank_len,
            )?;
            let widen = |x: &[f32]| -> Vec<f32> { x.iter().map(|v| v * unscale).collect() };
            for l in 0..cfg.n_layers {
                let base = l * 2 * bank_len;
                grad.k[l] = widen(&all[base..base + bank_len]);
                grad.v[l] = widen(&all[base + bank_len..base + 2 * bank_len]);
            }
        } else {
            // Wait for the device like the other branch does.
            be.read("synchronizing", &ws.head_loss, 0..1)?;
        }
        Ok(grad.all_finite().then_some(grad))
    }
}

/// The error of a non-finite loss on the GPU engine.
pub(crate) fn non_finite_loss(loss: f64) -> String {
    format!(
        "the GPU forward gave a non-finite loss ({loss}): the fp16 activations overflowed (use \
         --device cpu for this model or data)"
    )
}
