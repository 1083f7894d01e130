#!/usr/bin/env python3
"""Baseline for `prefix-tune bench train`: HF transformers + PEFT PrefixTuning training steps.

Same configurations as the Rust bench: a SmolLM2-135M-shaped Llama and a GPT-2-medium-shaped
model (24 layers, d=1024, 16 heads) with random weights, B=8, T=512, P=10 by default. The frozen
base is fp16 (like ours; --base-dtype fp32 for AMP with fp32 weights), the prefix parameters are
fp32, the forward runs under fp16 autocast with SDPA attention, and a step is what a training
loop does: forward with labels, GradScaler-scaled backward, AdamW step, zero_grad.

Timing: 2 warm-up steps, then the mean over --steps steps between two cuda synchronizations.
Memory: torch.cuda.max_memory_allocated over the timed steps (the counterpart of the Rust
bench's "alloc" column) and the device's used memory (mem_get_info, like its "peak" column).

Usage: python3 peft_train.py [--model smollm2 gpt2-medium] [--batch-size 8] [--seq-len 512]
                             [--prefix-len 10] [--steps 10] [--json out.jsonl] [--device cuda]
       (--device cpu --tiny: a quick smoke test of the script on a CPU)
"""
import argparse
import json
import sys
import time

try:
    import torch
    import transformers
    import peft
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
except ImportError as e:  # the device may lack one of them: say which, do not crash
    print(f"peft_train.py: cannot import {e.name}: needs torch, transformers and peft", file=sys.stderr)
    sys.exit(3)


def make_model(name, tiny):
    if name == "smollm2":
        cfg = LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
            rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        )
        if tiny:
            cfg.vocab_size, cfg.num_hidden_layers, cfg.intermediate_size = 512, 2, 128
        cfg._attn_implementation = "sdpa"
        return LlamaForCausalLM(cfg)
    if name == "gpt2-medium":
        # Dropout off (GPT2Config defaults to 0.1 three times), as in our engine and Llama's config.
        cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        if tiny:
            cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.n_head = 512, 2, 128, 2
        cfg._attn_implementation = "sdpa"
        return GPT2LMHeadModel(cfg)
    raise ValueError(name)


def bench(name, args):
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = make_model(name, args.tiny)
    base_dtype = torch.float16 if args.base_dtype == "fp16" else torch.float32
    base.to(device=device, dtype=base_dtype)
    model = get_peft_model(
        base, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.prefix_len)
    )
    model.eval()  # no dropout anywhere; the prefix still requires grad and trains
    # The prefix parameters train in fp32 whatever the base's dtype.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), device=device)

    def step():
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    step_s = (time.perf_counter() - t0) / args.steps
    row = {
        "bench": "peft_train",
        "model": name,
        "batch": args.batch_size,
        "seq": args.seq_len,
        "prefix": args.prefix_len,
        "base_dtype": args.base_dtype,
        "step_ms": step_s * 1e3,
        "tokens_per_s": args.batch_size * args.seq_len / step_s,
        "loss": float(loss),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    if cuda:
        free, total = torch.cuda.mem_get_info()
        row["allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row["device_used_mib"] = (total - free) / 2**20
        row["device"] = torch.cuda.get_device_name()
    del model, base, opt
    if cuda:
        torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["smollm2", "gpt2-medium"],
                    choices=["smollm2", "gpt2-medium"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--prefix-len", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--base-dtype", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models (smoke test)")
    ap.add_argument("--json", help="append one JSON line per model to this file")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("peft_train.py: no CUDA device visible to torch", file=sys.stderr)
        sys.exit(3)
    print(f"{'model':<12} {'B':>3} {'T':>5} {'P':>3} {'step ms':>9} {'tokens/s':>10} {'alloc MiB':>9} {'used MiB':>9}")
    for name in args.model:
        try:
            r = bench(name, args)
        except Exception as e:  # report and go on with the next model
            r = {"bench": "peft_train", "model": name, "error": f"{type(e).__name__}: {e}"}
            print(f"{name:<12} error: {r['error']}")
        else:
            print(f"{name:<12} {r['batch']:>3} {r['seq']:>5} {r['prefix']:>3} {r['step_ms']:>9.2f} "
                  f"{r['tokens_per_s']:>10.0f} {r.get('allocated_mib', 0):>9.0f} {r.get('device_used_mib', 0):>9.0f}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
