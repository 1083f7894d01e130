//! KV-cache decoding on the device: the cache (`KvDecodeCache`), the prefill and the decode
//! step, beam reordering, growth, and the joins of continuous batching (`prefix-tune serve`).

use super::*;

/// Cache entries allocated after the prefill for the tokens still to come (per sequence), unless
/// [`ModelEngine::set_decode_headroom`] says otherwise; the cache grows past it when needed.
pub(super) const DECODE_HEADROOM: usize = 256;

/// Decoding state of [`ModelEngine`]: per layer, the device-side keys (after RoPE) and values
/// `[B, Hkv, capacity, D]`, whose first entries of each sequence are its prefix, then its tokens
/// so far. Allocated at the first [`Engine::decode`] call (the prefill), for the longest prefix
/// and prompt plus the engine's headroom. [`DecodeCache::reorder`] is recorded on the host and
/// applied on the device (a row gather) at the next decode call.
pub(super) struct KvDecodeCache<B: Backend> {
    /// The bank until the prefill copies each sequence's prefix into the cache.
    pub(super) bank: Option<PrefixBank<f32>>,
    /// Per sequence: its prefix (meaningful until the prefill), prefix entries, tokens so far.
    pub(super) index: Vec<Option<usize>>,
    pub(super) prefix_len: Vec<usize>,
    pub(super) tokens: Vec<usize>,
    /// Per sequence, the position convention.
    pub(super) positions: Vec<Positions>,
    /// Allocated at the prefill: entries per (sequence, kv head).
    pub(super) capacity: usize,
    pub(super) k: Vec<B::Buf<f16>>,
    pub(super) v: Vec<B::Buf<f16>>,
    /// Device rows of the current sequences (a reorder not yet applied), `None` when in order.
    pub(super) pending: Option<Vec<usize>>,
    /// Sequences in the device buffers (before `pending`).
    pub(super) dev_batch: usize,
}

impl<B: Backend> KvDecodeCache<B> {
    pub(super) fn allocated(&self) -> bool {
        !self.k.is_empty()
    }
}

impl<B: Backend + 'static> DecodeCache for KvDecodeCache<B>
where
    B::Buf<f16>: Send,
{
    fn batch(&self) -> usize {
        self.tokens.len()
    }

    fn reorder(&mut self, rows: &[usize]) -> Result<()> {
        let n = self.tokens.len();
        if let Some(&r) = rows.iter().find(|&&r| r >= n) {
            bail!("reorder: row {r} of a cache of {n} sequences");
        }
        let pick = |v: &Vec<usize>| rows.iter().map(|&r| v[r]).collect::<Vec<_>>();
        self.prefix_len = pick(&self.prefix_len);
        self.tokens = pick(&self.tokens);
        self.positions = rows.iter().map(|&r| self.positions[r]).collect();
        self.index = rows.iter().map(|&r| self.index[r]).collect();
        if self.allocated() {
            let cur: Vec<usize> = self
                .pending
                .take()
                .unwrap_or_else(|| (0..self.dev_batch).collect());
            self.pending = Some(rows.iter().map(|&r| cur[r]).collect());
        }
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl<B: Backend> ModelEngine<B> {
    /// Cache entries (per sequence) allocated after the prefill of a decode session for the
    /// tokens to come; a session that outgrows them doubles the cache.
    pub fn set_decode_headroom(&mut self, tokens: usize) {
        self.decode_headroom = tokens;
    }

    /// Allocates the cache for the prefill `n_new` and copies each sequence's prefix into it.
    pub(super) fn alloc_kv_cache(
        &mut self,
        cache: &mut KvDecodeCache<B>,
        n_new: &[usize],
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (hkv, hd) = (cfg.n_kv_heads, cfg.head_dim);
        let b = cache.tokens.len();
        let t_max = n_new.iter().copied().max().unwrap_or(0);
        let p_max = cache.prefix_len.iter().copied().max().unwrap_or(0);
        let mut cap = p_max + t_max + self.decode_headroom;
        if cfg.arch == Arch::Gpt2 {
            // No sequence can outgrow the learned positions (plus a prefix from zero).
            cap = cap.min(p_max + cfg.max_positions + t_max);
        }
        let layer = b * hkv * cap * hd;
        let mut k = Vec::with_capacity(cfg.n_layers);
        let mut v = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let what = |kv: &str| {
                format!("layer {l} KV cache {kv} ({b} sequences × {cap} entries; fewer sequences or a smaller headroom need less)")
            };
            let mut kb = self.be.alloc::<f16>(&what("keys"), layer)?;
            let mut vb = self.be.alloc::<f16>(&what("values"), layer)?;
            if let Some(bank) = cache.bank.as_ref().filter(|p| p.len > 0) {
                let per = bank.prefix_len_elems();
                let p = bank.len;
                let mut hk = vec![f16::ZERO; layer];
                let mut hv = vec![f16::ZERO; layer];
                for (s, idx) in cache.index.iter().enumerate() {
                    let Some(i) = *idx else { continue };
                    for h in 0..hkv {
                        let src = i * per + h * p * hd;
                        let dst = (s * hkv + h) * cap * hd;
                        for e in 0..p * hd {
                            hk[dst + e] = f16::from_f32(bank.k[l][src + e]);
                            hv[dst + e] = f16::from_f32(bank.v[l][src + e]);
                        }
                    }
                }
                self.be
                    .write("uploading prefix keys into the KV cache", &hk, &mut kb)?;
                self.be
                    .write("uploading prefix values into the KV cache", &hv, &mut vb)?;
            }
            k.push(kb);
            v.push(vb);
        }
        cache.k = k;
        cache.v = v;
        cache.capacity = cap;
        cache.dev_batch = b;
        cache.bank = None;
        Ok(())
    }

    /// Applies a pending reorder: gathers the cache rows on the device.
    pub(super) fn apply_reorder(&mut self, cache: &mut KvDecodeCache<B>) -> Result<()> {
        let Some(rows) = cache.pending.take() else {
            return Ok(());
        };
        let cfg = &self.cfg;
        let row = cfg.n_kv_heads * cache.capacity * cfg.head_dim;
        let n = rows.len();
        let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let dev_idx = upload(&self.be, "uploading reorder rows", &idx)?;
        let rp = ops::rows_params(n, row)?;
        for l in 0..cfg.n_layers {
            for buf in [&mut cache.k[l], &mut cache.v[l]] {
                let mut dst = self
                    .be
                    .alloc::<f16>("KV cache (reordered)", n.max(1) * row)?;
                self.be
                    .gather_rows(&rp, cache.dev_batch, buf, &dev_idx, &mut dst)?;
                *buf = dst;
            }
        }
        cache.dev_batch = n;
        Ok(())
    }

    /// Grows the cache to `new_cap` entries per (sequence, kv head), keeping its content (one
    /// row gather per buffer; the entries past the old capacity are left undefined).
    pub(super) fn grow_kv_cache(
        &mut self,
        cache: &mut KvDecodeCache<B>,
        new_cap: usize,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (old, n_seq) = (cache.capacity, cache.dev_batch * cfg.n_kv_heads);
        let idx: Vec<i32> = (0..n_seq * new_cap)
            .map(|r| {
                let (sh, i) = (r / new_cap, r % new_cap);
                (sh * old + i.min(old - 1)) as i32
            })
            .collect();
        let dev_idx = upload(&self.be, "uploading KV-cache growth rows", &idx)?;
        let rp = ops::rows_params(n_seq * new_cap, cfg.head_dim)?;
        for l in 0..cfg.n_layers {
            for buf in [&mut cache.k[l], &mut cache.v[l]] {
                let what = format!(
                    "layer {l} KV cache grown to {new_cap} entries for {} sequences (fewer \
                     sequences or fewer new tokens need less)",
                    cache.dev_batch
                );
                let mut dst = self
                    .be
                    .alloc::<f16>(&what, n_seq * new_cap * cfg.head_dim)?;
                self.be
                    .gather_rows(&rp, n_seq * old, buf, &dev_idx, &mut dst)?;
                *buf = dst;
            }
        }
        cache.capacity = new_cap;
        Ok(())
    }

    /// One decode step with the KV cache (see [`KvDecodeCache`]).
    pub(super) fn kv_decode(
        &mut self,
        cache: &mut KvDecodeCache<B>,
        tokens: &[Vec<u32>],
    ) -> Result<Vec<f32>> {
        let cfg = self.cfg.clone();
        let (hd, hkv) = (cfg.head_dim, cfg.n_kv_heads);
        let b = cache.tokens.len();
        ensure!(
            tokens.len() == b,
            "decode: {} token lists for {b} sequences",
            tokens.len()
        );
        if b == 0 {
            return Ok(Vec::new());
        }
        let n_new: Vec<usize> = tokens.iter().map(Vec::len).collect();
        let next_pos: Vec<usize> = (0..b)
            .map(|s| match cache.positions[s] {
                Positions::AfterPrefix => cache.prefix_len[s] + cache.tokens[s],
                Positions::FromZero => cache.tokens[s],
            })
            .collect();
        let mut max_pos = 0;
        for (s, t) in tokens.iter().enumerate() {
            ensure!(!t.is_empty(), "decode: sequence {s} has no new token");
            if let Some(&bad) = t.iter().find(|&&x| x as usize >= cfg.vocab_size) {
                bail!(
                    "decode: token id {bad} is outside the vocabulary of {}",
                    cfg.vocab_size
                );
            }
            let needed = next_pos[s] + t.len();
            if cfg.arch == Arch::Gpt2 && needed > cfg.max_positions {
                bail!(
                    "GPT-2 has {} learned positions; sequence {s} would need {needed}",
                    cfg.max_positions
                );
            }
            max_pos = max_pos.max(needed);
        }
        // The prefill (the first call) runs the fused kernel over the bank, which the cache's
        // allocation then drops (each sequence's prefix is copied into its cache).
        let prefill_bank = if cache.allocated() {
            None
        } else {
            let bank = cache.bank.clone();
            self.alloc_kv_cache(cache, &n_new)?;
            Some(bank)
        };
        self.apply_reorder(cache)?;
        let t = n_new.iter().copied().max().unwrap_or(1);
        let past: Vec<usize> = (0..b)
            .map(|s| cache.prefix_len[s] + cache.tokens[s])
            .collect();
        let needed = (0..b).map(|s| past[s] + t).max().unwrap_or(0);
        if needed > cache.capacity {
            let grown = needed.max(2 * cache.capacity);
            self.grow_kv_cache(cache, grown)?;
        }
        let cap = cache.capacity;
        let prefill_shape = prefill_bank.as_ref().map(|bank| {
            let (p, n) = bank.as_ref().map_or((0, 0), |k| (k.len, k.n_prefixes));
            AttnShape {
                batch: b,
                q_heads: cfg.n_heads,
                kv_heads: hkv,
                seq: t,
                prefix: p,
                head_dim: hd,
                n_prefixes: n,
            }
        });
        let shape = CallShape {
            batch: b,
            seq: t,
            prefix: prefill_shape.map_or(0, |s| s.prefix),
            n_prefixes: prefill_shape.map_or(0, |s| s.n_prefixes),
        };
        self.prepare(&shape, false, max_pos)?;
        let Self {
            be,
            model,
            ws,
            rope,
            ..
        } = self;
        let ws = ws.as_mut().expect("prepared workspace");
        let rows = b * t;
        let mut toks = vec![0i32; rows];
        for (s, tk) in tokens.iter().enumerate() {
            for (i, &x) in tk.iter().enumerate() {
                toks[s * t + i] = x as i32;
            }
        }
        let offsets: Vec<i32> = next_pos.iter().map(|&p| p as i32).collect();
        let past_i: Vec<i32> = past.iter().map(|&x| x as i32).collect();
        let new_i: Vec<i32> = n_new.iter().map(|&x| x as i32).collect();
        be.write("uploading token ids", &toks, &mut ws.tokens)?;
        be.write("uploading position offsets", &offsets, &mut ws.pos_offset)?;
        be.write("uploading new-token counts", &new_i, &mut ws.valid_len)?;
        match (
            &prefill_shape,
            prefill_bank.as_ref().and_then(Option::as_ref),
        ) {
            (Some(s), Some(bank)) if s.prefix > 0 => {
                // The fused kernel: each sequence's prefix index, -1 for none.
                let index: Vec<usize> = cache
                    .index
                    .iter()
                    .map(|i| i.unwrap_or(attn::NO_PREFIX))
                    .collect();
                let (pi, _) = attn::index_arrays(s, &index, &n_new)?;
                be.write("uploading prefix indices", &pi, &mut ws.prefix_index)?;
                for l in 0..cfg.n_layers {
                    let (bk, bv) = &mut ws.bank[l];
                    be.write("uploading prefix keys", &to_f16(&bank.k[l]), bk)?;
                    be.write("uploading prefix values", &to_f16(&bank.v[l]), bv)?;
                }
            }
            (Some(_), _) => be.write(
                "uploading prefix indices",
                &vec![0; b],
                &mut ws.prefix_index,
            )?,
            (None, _) => be.write("uploading cache lengths", &past_i, &mut ws.prefix_index)?,
        }
        // Where each new key/value row goes in the cache (padding rows land past the sequence's
        // length, where they are never read and later overwritten).
        let mut append = Vec::with_capacity(b * hkv * t);
        for (s, &p) in past.iter().enumerate() {
            for h in 0..hkv {
                for i in 0..t {
                    append.push(((s * hkv + h) * cap + p + i) as i32);
                }
            }
        }
        // (After an error inside the layers the buffer is not put back: allocated again.)
        let mut append_idx = match ws.append_idx.take() {
            Some(buf) => buf,
            None => be.alloc("cache slots", append.len())?,
        };
        be.write("uploading cache slots", &append, &mut append_idx)?;
        let dshape = DecodeShape {
            batch: b,
            q_heads: cfg.n_heads,
            kv_heads: hkv,
            head_dim: hd,
            n_new: t,
            capacity: cap,
        };
        crate::cuda::decode::check_lengths(&dshape, &past_i, &new_i)?;

        embed(be, &cfg, model, b, t, ws)?;
        let mut pending: Option<Option<&B::Buf<f16>>> = None;
        for (l, lw) in model.layers.iter().enumerate() {
            let attend = Attend::Cache(CacheStep {
                shape: &dshape,
                prefill: prefill_shape.as_ref(),
                k: &mut cache.k[l],
                v: &mut cache.v[l],
                append_idx: &append_idx,
            });
            layer_forward(
                be,
                &cfg,
                lw,
                ws,
                rope.as_ref(),
                attend,
                l,
                0,
                pending,
                false,
            )?;
            pending = Some(lw.b_out.as_ref());
        }
        ws.append_idx = Some(append_idx);
        final_norm(be, &cfg, model, ws, rows, pending)?;
        for (s, &n) in n_new.iter().enumerate() {
            cache.tokens[s] += n;
        }
        let last: Vec<usize> = (0..b).map(|s| s * t + n_new[s] - 1).collect();
        let logits = self.row_logits(&last, rows)?;
        self.note_memory();
        Ok(logits)
    }
}

impl<B: Backend + 'static> ModelEngine<B> {
    /// Continuous batching: appends the sequences of `other` (a decode cache of this engine,
    /// past its prefill) after those of `cache` (likewise). The joined buffers have the larger
    /// capacity of the two; each source is scattered into them on the device.
    pub fn join_decode(
        &mut self,
        cache: &mut dyn DecodeCache,
        mut other: Box<dyn DecodeCache>,
    ) -> Result<()> {
        let Some(b) = other.as_any_mut().downcast_mut::<KvDecodeCache<B>>() else {
            bail!("join_decode: the cache to join was made by another engine");
        };
        let Some(a) = cache.as_any_mut().downcast_mut::<KvDecodeCache<B>>() else {
            bail!("join_decode: this cache was made by another engine");
        };
        ensure!(
            a.allocated() && b.allocated(),
            "join_decode: both caches must be past their prefill (a first decode call)"
        );
        self.apply_reorder(a)?;
        self.apply_reorder(b)?;
        let cfg = &self.cfg;
        let (hkv, hd) = (cfg.n_kv_heads, cfg.head_dim);
        let cap = a.capacity.max(b.capacity);
        let n = a.dev_batch + b.dev_batch;
        // Destination row of every source row (sequence s, kv head h, entry i), sequences of
        // `b` after those of `a`.
        let dest = |c: &KvDecodeCache<B>, first_seq: usize| -> Vec<i32> {
            (0..c.dev_batch * hkv)
                .flat_map(|sh| (0..c.capacity).map(move |i| (first_seq * hkv + sh) * cap + i))
                .map(|r| r as i32)
                .collect()
        };
        let ia = upload(&self.be, "uploading KV-cache join rows", &dest(a, 0))?;
        let ib = upload(
            &self.be,
            "uploading KV-cache join rows",
            &dest(b, a.dev_batch),
        )?;
        let pa = ops::rows_params(a.dev_batch * hkv * a.capacity, hd)?;
        let pb = ops::rows_params(b.dev_batch * hkv * b.capacity, hd)?;
        let dst_rows = n * hkv * cap;
        for l in 0..cfg.n_layers {
            for (dst_buf, src_b) in [(&mut a.k[l], &b.k[l]), (&mut a.v[l], &b.v[l])] {
                let what = format!(
                    "layer {l} KV cache joined to {n} sequences × {cap} entries (a smaller \
                     --max-batch or context needs less)"
                );
                let mut dst = self.be.alloc::<f16>(&what, dst_rows * hd)?;
                self.be
                    .scatter_rows(&pa, dst_rows, dst_buf, &ia, &mut dst)?;
                self.be.scatter_rows(&pb, dst_rows, src_b, &ib, &mut dst)?;
                *dst_buf = dst;
            }
        }
        a.capacity = cap;
        a.dev_batch = n;
        a.index.extend(b.index.iter().copied());
        a.prefix_len.extend(b.prefix_len.iter().copied());
        a.tokens.extend(b.tokens.iter().copied());
        a.positions.extend(b.positions.iter().copied());
        self.note_memory();
        Ok(())
    }

    /// Sequences of a decode cache of this engine that hold a prefix (each a copy of it in its
    /// own cache rows); `None` when the cache is another engine's.
    pub fn decode_prefix_copies(cache: &mut dyn DecodeCache) -> Option<(usize, usize)> {
        let c = cache.as_any_mut().downcast_mut::<KvDecodeCache<B>>()?;
        let with = c.prefix_len.iter().filter(|&&p| p > 0).count();
        Some((with, c.prefix_len.iter().sum()))
    }
}
