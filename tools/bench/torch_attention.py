#!/usr/bin/env python3
"""Baseline for benches/attention.rs: torch SDPA on the concatenated [prefix ++ sequence] input.

For each shape of the grid (B=8, Hq=Hkv=16, T in {512, 1024, 2048, 4096}, P in {16, 128},
D in {64, 128}; fp16, two prefixes alternating over the batch) it times, with CUDA events
(median of repeated runs after a warm-up):
  fwd: gather the prefix of each sequence from the bank + torch.cat with the sequence K/V + SDPA
  bwd: the backward of all of that (dQ, dK, dV, and the bank gradient, i.e. the prefix gradients
       summed over the batch by the gather's backward)
for two ways of saying "prefix visible, sequence causal":
  lower_right: attn_mask = torch.nn.attention.bias.causal_lower_right(T, P + T)
  bool_mask:   an explicit [T, P+T] boolean mask
and each backend torch accepts for it (flash, cuDNN, memory-efficient); a backend that refuses
the inputs is reported as such. FLOPs as in the bench: 4*B*H*D*T*(P + T/2), backward 2.5x.

Usage: python3 torch_attention.py [--json out.json] [--quick] [--device cuda]
"""
import argparse
import json
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
import torch.nn.functional as F

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def flops_fwd(b, h, t, p, d):
    return 4.0 * b * h * d * t * (p + t / 2.0)


def median_ms(fn, device, warmup=3, reps=10, calls=5):
    """prefix-tune's GPU_PROTOCOL (src/bench.rs), so both sides are timed alike: warm-up calls,
    then `reps` runs of `calls` back-to-back calls between two CUDA events (no synchronisation
    inside a run), the L2 cache flushed (a memset of twice its size) before each run, outside the
    events; the median run's time per call."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        l2 = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
        flush = torch.empty(2 * l2, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            flush.zero_()
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(calls):
                fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / calls)
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def run_shape(b, h, t, p, d, device, dtype):
    g = torch.Generator(device=device).manual_seed(1234)

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    q = rnd(b, h, t, d).requires_grad_()
    k = rnd(b, h, t, d).requires_grad_()
    v = rnd(b, h, t, d).requires_grad_()
    bank_k = rnd(2, h, p, d).requires_grad_()
    bank_v = rnd(2, h, p, d).requires_grad_()
    prefix_index = torch.arange(b, device=device) % 2
    d_o = rnd(b, h, t, d)
    lower_right = causal_lower_right(t, p + t)
    # query i sees every prefix key and sequence keys j <= i
    bool_mask = torch.ones(t, p + t, dtype=torch.bool, device=device).tril(diagonal=p)
    masks = {"lower_right": lower_right, "bool_mask": bool_mask}

    def forward(mask):
        kk = torch.cat([bank_k[prefix_index], k], dim=2)
        vv = torch.cat([bank_v[prefix_index], v], dim=2)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)

    rows = []
    fl = flops_fwd(b, h, t, p, d)
    for mname, mask in masks.items():
        for bname, backend in BACKENDS.items():
            row = {"batch": b, "q_heads": h, "seq": t, "prefix": p, "head_dim": d,
                   "mask": mname, "backend": bname}
            try:
                with sdpa_kernel([backend]):
                    with torch.no_grad():
                        fwd_ms = median_ms(lambda: forward(mask), device)
                    out = forward(mask)

                    def bwd():
                        for x in (q, k, v, bank_k, bank_v):
                            x.grad = None
                        out.backward(d_o, retain_graph=True)

                    bwd_ms = median_ms(bwd, device)
                row.update(fwd_ms=fwd_ms, bwd_ms=bwd_ms,
                           fwd_tflops=fl / (fwd_ms * 1e-3) / 1e12,
                           bwd_tflops=2.5 * fl / (bwd_ms * 1e-3) / 1e12)
            except Exception as e:  # the backend refused these inputs
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            del row
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="write all rows to this file")
    ap.add_argument("--quick", action="store_true", help="T in {512, 2048} only")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="one tiny shape (smoke test)")
    args = ap.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("SKIPPED torch baseline: torch sees no CUDA device", file=sys.stderr)
        sys.exit(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    if device == "cuda":
        print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}", flush=True)
    if args.tiny:
        grid = [(2, 2, 64, 16, 64)]
    else:
        seqs = [512, 2048] if args.quick else [512, 1024, 2048, 4096]
        grid = [(8, 16, t, p, d) for d in (64, 128) for t in seqs for p in (16, 128)]
    rows = []
    for (b, h, t, p, d) in grid:
        got = run_shape(b, h, t, p, d, device, dtype)
        rows.extend(got)
        for r in got:
            if "error" in r:
                print(f"T{t}_P{p}_D{d} {r['mask']:<11} {r['backend']:<9} refused: {r['error']}", flush=True)
            else:
                print(f"T{t}_P{p}_D{d} {r['mask']:<11} {r['backend']:<9} "
                      f"fwd {r['fwd_ms']:8.3f} ms {r['fwd_tflops']:6.1f} TFLOP/s  "
                      f"bwd {r['bwd_ms']:8.3f} ms {r['bwd_tflops']:6.1f} TFLOP/s", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
        import os
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
