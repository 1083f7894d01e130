#!/usr/bin/env python3
"""PyTorch CPU baseline for one prefix-tuning step (benchmark, not a test).

SmolLM2-135M-Instruct from the Q4_1 GGUF dequantised to float32 by transformers, PEFT
PrefixTuning (P virtual tokens), a batch of B x T random tokens, every position a target;
forward + backward with only the prefix requiring grad (the model is frozen). Times the forward
alone (the loss, no grad) and then the step, several of each after warm-up, on all cores
(torch.get_num_threads()), and prints one JSON line. tools/bench/cpu_vs_torch runs it interleaved
with ours.

Usage:
  /root/.cache/prefix-tune/oracle-venv/bin/python tools/bench/torch_cpu_step.py [--batch 4 --seq 128 --prefix 10]
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import transformers
from peft import PrefixTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM


def cache_dir() -> Path:
    c = os.environ.get("PREFIX_TUNE_CACHE")
    if c:
        return Path(c)
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "prefix-tune"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--prefix", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa or eager)")
    ap.add_argument("--gguf", default=str(cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    args = ap.parse_args()

    torch.manual_seed(0)
    g = Path(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(
        str(g.parent), gguf_file=g.name, dtype=torch.float32, attn_implementation=args.attn
    )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pm = get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=args.prefix, task_type="CAUSAL_LM"))
    pm.eval()  # no dropout; the prefix embedding still requires grad
    emb = pm.prompt_encoder["default"].embedding.weight
    assert emb.requires_grad
    V = model.config.vocab_size
    ids = torch.randint(0, V, (args.batch, args.seq))
    mask = torch.ones_like(ids)

    def step() -> float:
        t0 = time.perf_counter()
        loss = pm(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        t1 = time.perf_counter()
        emb.grad = None
        return t1 - t0

    def forward() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            pm(input_ids=ids, attention_mask=mask, labels=ids).loss.item()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        forward()
    fwd = [forward() for _ in range(args.steps)]
    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    print(
        json.dumps(
            {
                "impl": "pytorch+peft",
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "threads": torch.get_num_threads(),
                "attn": args.attn,
                "batch": args.batch,
                "seq": args.seq,
                "prefix": args.prefix,
                "steps": args.steps,
                "forward_median_s": statistics.median(fwd),
                "forward_min_s": min(fwd),
                "median_s": statistics.median(times),
                "min_s": min(times),
                "mean_s": statistics.mean(times),
                "tokens_per_s": args.batch * args.seq / statistics.median(times),
            }
        )
    )


if __name__ == "__main__":
    main()
