#!/usr/bin/env python3
"""PyTorch CPU baseline for greedy generation with a prefix (benchmark, not a test).

SmolLM2-135M-Instruct from the Q4_1 GGUF dequantised to float32 by transformers, PEFT
PrefixTuning (P virtual tokens, random), B random prompts of `prompt` tokens decoded together,
greedy, exactly `new` new tokens each (EOS ignored), KV cache on. Median of `reps` runs after one
warm-up on all cores; prints one JSON line.

`PeftModel.generate` with PEFT 0.21.2 + transformers 5.24.0 ignores the prefix (transformers warns
"Both `past_key_values` and `cache` are set ... ignoring past_key_values", and the greedy tokens
equal the base model's), so the default loop is HF's own decoding done by hand: the base model
with PEFT's prefix cache (`get_prompt`), one forward over the prompt, then one per token with the
KV cache, argmax each step; the script checks that the prefix changes the tokens. `--hf-generate`
times `PeftModel.generate` instead (what a PEFT user calls; here without the prefix). tools/bench/cpu_vs_torch runs it interleaved with
`examples/cpu_step_timing generate`.

Usage:
  /root/.cache/prefix-tune/oracle-venv/bin/python tools/bench/torch_cpu_generate.py [--batch 1 --prompt 32 --new 32 --prefix 10]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from peft import PrefixTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

from torch_cpu_step import cache_dir  # the script's directory is on sys.path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prefix", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hf-generate", action="store_true", help="time PeftModel.generate (ignores the prefix here)")
    ap.add_argument("--gguf", default=str(cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    args = ap.parse_args()

    torch.manual_seed(0)
    g = Path(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
    model.eval()
    pm = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=args.prefix, task_type="CAUSAL_LM"))
    pm.eval()
    with torch.no_grad():
        emb = pm.prompt_encoder["default"].embedding.weight
        emb.copy_(torch.randn_like(emb) * 0.5)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (args.batch, args.prompt))
    mask = torch.ones_like(ids)

    base = pm.get_base_model()

    def by_hand(prefix: bool) -> torch.Tensor:
        B, T = ids.shape
        past = pm.get_prompt(batch_size=B) if prefix else None
        p = args.prefix if prefix else 0
        out = base(input_ids=ids, attention_mask=torch.ones(B, p + T, dtype=torch.long),
                   past_key_values=past, use_cache=True)
        toks = []
        for i in range(args.new):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
            if i + 1 == args.new:
                break
            out = base(input_ids=nxt, attention_mask=torch.ones(B, p + T + i + 1, dtype=torch.long),
                       past_key_values=out.past_key_values, use_cache=True)
        return torch.cat(toks, 1)

    if not args.hf_generate:
        with torch.no_grad():
            assert not torch.equal(by_hand(True), by_hand(False)), "the prefix does not change the tokens"

    def once() -> float:
        t0 = time.perf_counter()
        if not args.hf_generate:
            with torch.no_grad():
                by_hand(True)
            return time.perf_counter() - t0
        with torch.no_grad():
            out = pm.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=args.new,
                min_new_tokens=args.new,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        dt = time.perf_counter() - t0
        assert out.shape[1] - args.prompt == args.new, out.shape
        return dt

    once()
    times = [once() for _ in range(args.reps)]
    med = statistics.median(times)
    print(
        json.dumps(
            {
                "impl": "pytorch+peft",
                "mode": "hf-generate" if args.hf_generate else "generate",
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "prompt": args.prompt,
                "new": args.new,
                "prefix": args.prefix,
                "reps": args.reps,
                "median_s": med,
                "min_s": min(times),
                "tokens_per_s": args.batch * args.new / med,
            }
        )
    )


if __name__ == "__main__":
    main()
