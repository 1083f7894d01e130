"""Records a few torch.optim.AdamW / SGD steps for tests/optim.rs to replay.

Run by hand (CI never runs Python):
    /root/.cache/prefix-tune/oracle-venv/bin/python tools/oracle/optim_fixture.py
Writes tests/fixtures/optim_torch.json.
Recorded with torch 2.15.0 and transformers 5.24.0 (CPU, float32, single-tensor code paths).

Each case: two parameter tensors (so clipping is global over several tensors), per-step random
gradients, the learning rate torch's scheduler gave each step, the pre-clip gradient norm, and
the parameters after each step.
"""
import json
import os

import torch
import transformers
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

CASES = [
    dict(name="adamw_linear_clip", opt="adamw", lr=3e-2, betas=(0.9, 0.999), eps=1e-8,
         weight_decay=0.01, momentum=0.0, schedule="linear", warmup=2, total=8, max_norm=1.0, steps=7),
    dict(name="adamw_cosine_noclip", opt="adamw", lr=5e-2, betas=(0.8, 0.99), eps=1e-6,
         weight_decay=0.1, momentum=0.0, schedule="cosine", warmup=1, total=6, max_norm=0.0, steps=6),
    dict(name="adamw_constant_nodecay", opt="adamw", lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
         weight_decay=0.0, momentum=0.0, schedule="constant", warmup=0, total=5, max_norm=0.0, steps=5),
    dict(name="sgd_constant_clip", opt="sgd", lr=0.1, betas=None, eps=None,
         weight_decay=0.01, momentum=0.0, schedule="constant", warmup=2, total=6, max_norm=0.5, steps=5),
    dict(name="sgd_momentum_linear", opt="sgd", lr=0.05, betas=None, eps=None,
         weight_decay=0.0, momentum=0.9, schedule="linear", warmup=0, total=6, max_norm=2.0, steps=5),
]

SIZES = (20, 17)


def run(case, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in SIZES]
    init = [p.detach().clone() for p in params]
    if case["opt"] == "adamw":
        opt = torch.optim.AdamW(params, lr=case["lr"], betas=case["betas"], eps=case["eps"],
                                weight_decay=case["weight_decay"], foreach=False)
    else:
        opt = torch.optim.SGD(params, lr=case["lr"], momentum=case["momentum"],
                              weight_decay=case["weight_decay"], foreach=False)
    if case["schedule"] == "linear":
        sched = get_linear_schedule_with_warmup(opt, case["warmup"], case["total"])
    elif case["schedule"] == "cosine":
        sched = get_cosine_schedule_with_warmup(opt, case["warmup"], case["total"])
    else:
        sched = get_constant_schedule_with_warmup(opt, case["warmup"])
    steps = []
    for _ in range(case["steps"]):
        grads = [torch.randn(n, generator=g) * 1.5 for n in SIZES]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        if case["max_norm"] > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, case["max_norm"]))
        else:
            norm = float(torch.linalg.vector_norm(torch.cat(grads)))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        steps.append(dict(
            grads=[x.tolist() for x in grads],
            lr=lr,
            norm=norm,
            clipped=[p.grad.tolist() for p in params],
            params=[p.detach().tolist() for p in params],
        ))
    out = dict(case)
    out["init"] = [x.tolist() for x in init]
    out["steps"] = steps
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "..", "tests", "fixtures", "optim_torch.json")
    cases = [run(c, 1000 + i) for i, c in enumerate(CASES)]
    doc = dict(torch=torch.__version__, transformers=transformers.__version__, sizes=SIZES, cases=cases)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)
    print("wrote", os.path.normpath(path), os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
