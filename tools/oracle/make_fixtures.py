#!/usr/bin/env python3
"""Oracle fixtures for prefix-tune, computed with HF transformers + PEFT (run by hand, never by CI).

Writes, under tests/fixtures/:
  gpt2_tiny/, llama_tiny/      tiny random HF models (save_pretrained: GPT-2 float32, Llama bfloat16)
                               with a tokenizer.json and a PEFT prefix-tuning adapter in peft_adapter/
  oracle_gpt2.json, oracle_llama.json
                               a right-padded batch, per-example summed cross-entropy and target
                               counts with the PEFT prefix, without it (base model) and with the
                               prefix but positions from zero; sampled logits; PEFT's gradient of
                               the batch loss w.r.t. prompt_embeddings [P, 2*L*kv_dim]
  smollm2_logits.json          SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised by transformers, run in
                               float64): token ids and last-position logits of a few prompts, and
                               HF's greedy continuation of "The capital of France is"

All oracle numbers come from the *saved* (rounded) weights reloaded and run in float64.

Label convention: HF passes `labels` aligned with `input_ids` and shifts inside the loss (logits at
position t are scored against labels[t+1]). prefix-tune's `Batch.labels[b][t]` is the token predicted
*from* position t, i.e. ours[b][t] = HF_labels[b][t+1] (and None where HF has -100 or t+1 is past the
end). The JSON stores both `hf_labels` and `labels` (ours, null = no target).

Usage:  /root/.cache/prefix-tune/oracle-venv/bin/python tools/oracle/make_fixtures.py [--skip-smollm2]
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import gguf
import peft
import safetensors
import transformers
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
P = 5  # virtual tokens
SEED = 20261126

VERSIONS = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "peft": peft.__version__,
    "gguf": getattr(gguf, "__version__", "0.19.0"),
    "safetensors": safetensors.__version__,
    "numpy": np.__version__,
    "python": sys.version.split()[0],
}


def cache_dir() -> Path:
    c = os.environ.get("PREFIX_TUNE_CACHE")
    if c:
        return Path(c)
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "prefix-tune"


# ---------------------------------------------------------------------------------------------
# tiny models
# ---------------------------------------------------------------------------------------------


def exact_float64_llama() -> None:
    """Make HF's Llama honest in float64.

    transformers 5.24's Llama computes RMSNorm in float32, RoPE cos/sin in float32 (from a float32
    inv_freq) and the eager attention softmax in float32, whatever the model dtype; in a float64 run
    that leaves ~1e-7 relative errors (seen as a non-linear gradient: the per-example gradients did
    not add up to the batch gradient beyond 1e-7). Replace the three with the same formulas in the
    input's dtype. GPT-2's modules are already dtype-clean.
    """
    import transformers.models.llama.modeling_llama as llama

    def rms_forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    def rope_forward(self, x, position_ids):
        assert self.rope_type == "default", self.rope_type
        rp = self.config.rope_parameters
        dim = getattr(self.config, "head_dim", None) or (
            self.config.hidden_size // self.config.num_attention_heads
        )
        inv = 1.0 / (
            float(rp["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        )
        freqs = position_ids[..., None].to(torch.float64) * inv.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (
            emb.sin() * self.attention_scaling
        ).to(x.dtype)

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k = llama.repeat_kv(key, module.num_key_value_groups)
        v = llama.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = torch.softmax(w, dim=-1)
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    llama.LlamaRMSNorm.forward = rms_forward
    llama.LlamaRotaryEmbedding.forward = rope_forward
    llama.eager_attention_forward = eager


def char_tokenizer_json(vocab_size: int) -> dict:
    """A character-level BPE tokenizer (no merges) with `vocab_size` entries: 0 = <|endoftext|>,
    then printable ASCII. Only there so the loader finds a tokenizer; the oracle uses token ids."""
    chars = [chr(c) for c in range(32, 127)]
    vocab = {"<|endoftext|>": 0}
    for ch in chars:
        if len(vocab) >= vocab_size:
            break
        vocab[ch] = len(vocab)
    i = 0
    while len(vocab) < vocab_size:
        vocab[f"<extra_{i}>"] = len(vocab)
        i += 1
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": 0,
                "content": "<|endoftext|>",
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        ],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


@torch.no_grad()
def redraw(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights std 0.2, biases std 0.1, norm scales 1 ± 0.2 (so norms are not trivial)."""
    for name, p in model.named_parameters():
        is_norm = any(s in name for s in ("ln_", "norm", "layernorm"))
        if is_norm and name.endswith("weight"):
            v = 1.0 + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
        elif name.endswith("bias"):
            v = 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
        else:
            v = 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
        p.copy_(v.to(p.dtype))


def make_batch(gen: torch.Generator, vocab: int, lengths, prompt_lens, pad_id: int = 0):
    """Right-padded batch: input ids, attention mask, HF labels (-100 on prompt and padding)."""
    B, T = len(lengths), max(lengths)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    hf_labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (n, p) in enumerate(zip(lengths, prompt_lens)):
        ids[b, :n] = torch.randint(1, vocab, (n,), generator=gen)
        mask[b, :n] = 1
        hf_labels[b, p:n] = ids[b, p:n]
    return ids, mask, hf_labels


def ce_from_logits(logits: torch.Tensor, hf_labels: torch.Tensor):
    """Per-example summed CE (float64) and target counts with HF's shift convention."""
    lg = logits[:, :-1, :].double()
    tgt = hf_labels[:, 1:]
    logp = torch.log_softmax(lg, dim=-1)
    valid = tgt != -100
    picked = torch.gather(logp, 2, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = -(picked * valid)
    return nll.sum(dim=1), valid.sum(dim=1)


def our_labels(hf_labels: torch.Tensor):
    B, T = hf_labels.shape
    out = []
    for b in range(B):
        row = []
        for t in range(T):
            lab = int(hf_labels[b, t + 1]) if t + 1 < T else -100
            row.append(None if lab == -100 else lab)
        out.append(row)
    return out


def sample_logits(gen: torch.Generator, logits: torch.Tensor, lengths, n: int):
    B, T, V = logits.shape
    out = []
    for _ in range(n):
        b = int(torch.randint(0, B, (1,), generator=gen))
        t = int(torch.randint(0, lengths[b], (1,), generator=gen))
        v = int(torch.randint(0, V, (1,), generator=gen))
        out.append([b, t, v, float(logits[b, t, v])])
    return out


def tensor_list(t: torch.Tensor):
    return t.detach().double().cpu().numpy().tolist()


def build_family(name: str, family: str, gen: torch.Generator) -> None:
    out_dir = FIX / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    V = 97
    if family == "gpt2":
        cfg = GPT2Config(
            vocab_size=V,
            n_embd=48,
            n_layer=2,
            n_head=4,
            n_positions=64,
            n_inner=None,  # 4 * 48
            activation_function="gelu_new",
            layer_norm_epsilon=1e-5,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(cfg)
        save_dtype = torch.float32
    else:
        cfg = LlamaConfig(
            vocab_size=V,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            intermediate_size=80,
            max_position_embeddings=64,
            rope_theta=25000.0,  # not the default 10000
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
            attention_bias=False,
            mlp_bias=False,
        )
        model = LlamaForCausalLM(cfg)
        save_dtype = torch.bfloat16
    redraw(model, gen)
    model = model.to(save_dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(char_tokenizer_json(V), indent=1))

    # PEFT adapter with prompt_embeddings std 0.5 (float32 on disk).
    base32 = type(model).from_pretrained(out_dir, dtype=torch.float32)
    pcfg = PrefixTuningConfig(num_virtual_tokens=P, task_type="CAUSAL_LM")
    pm = get_peft_model(base32, pcfg)
    with torch.no_grad():
        emb = pm.prompt_encoder["default"].embedding.weight
        emb.copy_(0.5 * torch.randn(emb.shape, generator=gen, dtype=torch.float64))
    pm.save_pretrained(out_dir / "peft_adapter", safe_serialization=True)

    # ---- Oracle, float64, from the saved files --------------------------------------------
    base = type(model).from_pretrained(out_dir, dtype=torch.float64, attn_implementation="eager")
    base.eval()
    lengths = [12, 9, 6]
    prompt_lens = [4, 3, 2]
    ids, mask, hf_labels = make_batch(gen, V, lengths, prompt_lens)
    B, T = ids.shape

    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits
    base_sum, n_tgt = ce_from_logits(base_logits, hf_labels)

    # (PEFT refuses is_trainable=True for prompt-learning adapters; it loads them in inference
    # mode, where get_prompt reads embedding.weight directly. We switch its grad on by hand.)
    pm = PeftModel.from_pretrained(base, out_dir / "peft_adapter")
    pm = pm.double()
    pm.eval()  # no dropout anywhere; gradients still flow
    emb = pm.prompt_encoder["default"].embedding.weight
    emb.requires_grad_(True)
    assert emb.dtype == torch.float64 and emb.requires_grad
    pe_saved = emb.detach().clone()
    L = cfg.num_hidden_layers
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert pe_saved.shape == (P, 2 * L * kv_heads * head_dim), pe_saved.shape

    # What positions does HF+PEFT give the real tokens? (PEFT itself adds P to any position_ids
    # passed to it, so bypass it: run the base model on PEFT's prefix cache with explicit
    # position_ids P..P+T-1 and 0..T-1 and compare with PEFT's default call.)
    out = pm(input_ids=ids, attention_mask=mask)
    logits = out.logits

    def explicit(first: int) -> torch.Tensor:
        cache = pm.get_prompt(B, max_cache_len=T + P)
        full_mask = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], dim=1)
        pos = torch.arange(first, first + T).unsqueeze(0).expand(B, T)
        return pm.get_base_model()(
            input_ids=ids, attention_mask=full_mask, past_key_values=cache, position_ids=pos
        ).logits

    with torch.no_grad():
        after = explicit(P)
        from_zero = explicit(0)
    d_after = float((logits.detach() - after).abs().max())
    d_zero = float((logits.detach() - from_zero).abs().max())
    assert d_after == 0.0, f"{name}: default positions are not P..P+T-1 (max diff {d_after})"
    assert d_zero > 1e-3, f"{name}: positions from zero give the same logits ({d_zero})"
    zero_sum, _ = ce_from_logits(from_zero, hf_labels)

    pre_sum, n_tgt2 = ce_from_logits(logits, hf_labels)
    assert torch.equal(n_tgt, n_tgt2)
    total = int(n_tgt.sum())
    mean_loss = pre_sum.sum() / total
    # Cross-check with HF's own loss (token mean over the whole batch; HF's ForCausalLMLoss casts
    # the logits to float32, hence the loose tolerance).
    with torch.no_grad():
        hf_loss = float(pm(input_ids=ids, attention_mask=mask, labels=hf_labels).loss)
    assert abs(hf_loss - float(mean_loss)) < 1e-6 * float(mean_loss), (hf_loss, float(mean_loss))

    # Gradients: of the token-mean batch loss, and of each example's summed loss.
    grad_mean = torch.autograd.grad(mean_loss, emb, retain_graph=True)[0]
    grads_sum = [torch.autograd.grad(pre_sum[b], emb, retain_graph=True)[0] for b in range(B)]
    recomb = sum(grads_sum) / total
    d_rec = float((recomb - grad_mean).abs().max())
    assert d_rec < 1e-10 * float(grad_mean.abs().max()), d_rec

    # The prefix must matter at this weight scale.
    rel_change = float(((pre_sum - base_sum).norm() / base_sum.norm()))
    assert rel_change > 1e-2, f"{name}: prefix changes the loss by only {rel_change}"

    fixture = {
        "description": f"HF transformers + PEFT prefix-tuning oracle for tests/fixtures/{name} "
        "(float64 from the saved weights). See tools/oracle/make_fixtures.py.",
        "model_dir": name,
        "adapter_dir": f"{name}/peft_adapter",
        "family": family,
        "saved_dtype": str(save_dtype).replace("torch.", ""),
        "versions": VERSIONS,
        "seed": SEED,
        "num_virtual_tokens": P,
        "n_layers": L,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "batch": B,
        "seq": T,
        "pad_id": 0,
        "tokens": ids.tolist(),
        "attention_mask": mask.tolist(),
        "valid_len": lengths,
        "prompt_len": prompt_lens,
        "hf_labels": hf_labels.tolist(),
        "labels": our_labels(hf_labels),
        "label_convention": "labels[b][t] (ours) = hf_labels[b][t+1]; null = no target",
        "positions": {
            "hf_peft_default": "after_prefix",
            "note": "transformers 5.24 + PEFT 0.21 with right padding: position_ids = "
            "arange(T) + P for every row (cache length), independent of the attention mask; "
            "verified: explicit position_ids P..P+T-1 reproduce the default logits exactly, "
            "0..T-1 differ by max |d logit| = %.3g" % d_zero,
        },
        "n_targets": n_tgt.tolist(),
        "prefix": {
            "loss_sum": tensor_list(pre_sum),
            "mean_loss": float(mean_loss),
            "mean_loss_definition": "sum over examples of loss_sum / sum of n_targets (HF's token mean)",
            "logits_samples": sample_logits(gen, logits.detach(), lengths, 24),
            "grad_mean_loss": tensor_list(grad_mean),
            "grad_loss_sum_per_example": [tensor_list(g) for g in grads_sum],
            "grad_layout": "[P, 2*L*kv_heads*head_dim] = PEFT prompt_embeddings: view [P, 2L, kv_heads, "
            "head_dim]; slot 2l = layer l key, 2l+1 = layer l value",
        },
        "prefix_positions_from_zero": {
            "loss_sum": tensor_list(zero_sum),
            "mean_loss": float(zero_sum.sum() / total),
        },
        "base": {
            "loss_sum": tensor_list(base_sum),
            "mean_loss": float(base_sum.sum() / total),
            "logits_samples": sample_logits(gen, base_logits, lengths, 24),
        },
        "prompt_embeddings": tensor_list(pe_saved),
    }
    path = FIX / f"oracle_{family}.json"
    path.write_text(json.dumps(fixture, indent=1))
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    print(
        f"{name}: {size/1024:.0f} KiB, mean loss base {float(base_sum.sum()/total):.6f} "
        f"prefix {float(mean_loss):.6f} (rel change {rel_change:.3f}), |d logits| from-zero "
        f"positions {d_zero:.3g}, |grad| {float(grad_mean.norm()):.4g} -> {path.name}"
    )


# ---------------------------------------------------------------------------------------------
# SmolLM2
# ---------------------------------------------------------------------------------------------

SMOL_PROMPTS = [
    "The capital of France is",
    "In 1969, 3 astronauts flew 384,400 km to the",
    "Grüße aus Zürich — naïve café, 2+2=4 ✓ and the answer to 7×6 is",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
]


def build_smollm2(gen: torch.Generator) -> None:
    gguf_path = cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf_path.exists():
        print(f"skip SmolLM2: {gguf_path} not found")
        return
    d, f = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=f, dtype=torch.float32, attn_implementation="eager"
    )
    model = model.double().eval()
    prompts = []
    for text in SMOL_PROMPTS:
        enc = tok(text, add_special_tokens=True)["input_ids"]
        raw = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lg = model(input_ids=torch.tensor([enc])).logits[0, -1]
        top = torch.topk(lg, 20)
        V = lg.shape[0]
        sample_ids = sorted(set(int(i) for i in torch.randint(0, V, (50,), generator=gen)))
        prompts.append(
            {
                "text": text,
                "ids": enc,
                "ids_without_special_tokens": raw,
                "argmax": int(torch.argmax(lg)),
                "top20": [[int(i), float(v)] for i, v in zip(top.indices, top.values)],
                "sampled": [[i, float(lg[i])] for i in sample_ids],
                "logits_norm": float(lg.norm()),
                "logits_mean": float(lg.mean()),
            }
        )
    text = SMOL_PROMPTS[0]
    enc = tok(text, return_tensors="pt", add_special_tokens=True)
    with torch.no_grad():
        gen_ids = model.generate(
            **enc, max_new_tokens=8, do_sample=False, num_beams=1, pad_token_id=tok.eos_token_id
        )[0]
    new_ids = gen_ids[enc["input_ids"].shape[1] :].tolist()
    cfg = model.config
    fixture = {
        "description": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantised by transformers (gguf_file=...) and "
        "run in float64: next-token logits at the last position of each prompt, and greedy decoding. "
        "See tools/oracle/make_fixtures.py.",
        "gguf": f,
        "gguf_size": gguf_path.stat().st_size,
        "versions": VERSIONS,
        "vocab_size": int(cfg.vocab_size),
        "config": {
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "rope_theta": float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]),
            "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        },
        "prompts": prompts,
        "greedy": {
            "prompt": text,
            "prompt_ids": enc["input_ids"][0].tolist(),
            "new_ids": new_ids,
            "new_text": tok.decode(new_ids),
            "full_text": tok.decode(gen_ids.tolist()),
        },
    }
    (FIX / "smollm2_logits.json").write_text(json.dumps(fixture, indent=1, ensure_ascii=False))
    print(f"smollm2: greedy {text!r} -> {tok.decode(new_ids)!r} ids {new_ids}")
    for p in prompts:
        print(f"  {p['text']!r}: {len(p['ids'])} ids, argmax {p['argmax']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--only-smollm2", action="store_true")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    exact_float64_llama()
    gen = torch.Generator().manual_seed(SEED)
    FIX.mkdir(parents=True, exist_ok=True)
    if not args.only_smollm2:
        build_family("gpt2_tiny", "gpt2", gen)
        build_family("llama_tiny", "llama", gen)
    if not args.skip_smollm2:
        build_smollm2(torch.Generator().manual_seed(SEED + 1))


if __name__ == "__main__":
    main()
