#!/usr/bin/env python3
"""Oracle for tests/smollm2.rs: samples of the SmolLM2 GGUF weights as HF transformers loads them.

Run by hand with the oracle venv (CI never runs Python):
    ~/.cache/prefix-tune/oracle-venv/bin/python tools/oracle/smollm2_weights.py
Writes tests/fixtures/smollm2_weights.json: for a few tensors, selected rows (the first `cols`
columns of each). transformers dequantizes the GGUF and undoes llama.cpp's Q/K row permutation, so
the rows chosen across head halves (0, 1, 31, 32, ...) check that our loader's un-permutation gives
HF's rotate-half layout.
"""
import json
import os

import torch
from transformers import AutoModelForCausalLM

cache = os.environ.get("PREFIX_TUNE_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "prefix-tune")
models = os.path.join(cache, "models")
name = "SmolLM2-135M-Instruct.Q4_1.gguf"
out = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "smollm2_weights.json")

model = AutoModelForCausalLM.from_pretrained(models, gguf_file=name, dtype=torch.float32)
sd = model.state_dict()
cols = 48
rows_qk = [0, 1, 2, 31, 32, 33, 63, 64, 65, 95, 96, 127, 191]
picks = [("model.embed_tokens.weight", [0, 1, 2, 17, 1000, 49151])]
for layer in (0, 29):
    p = f"model.layers.{layer}."
    picks += [
        (p + "input_layernorm.weight", None),
        (p + "self_attn.q_proj.weight", rows_qk + [575]),
        (p + "self_attn.k_proj.weight", rows_qk),
        (p + "self_attn.v_proj.weight", [0, 1, 32, 191]),
        (p + "self_attn.o_proj.weight", [0, 1, 575]),
        (p + "post_attention_layernorm.weight", None),
        (p + "mlp.gate_proj.weight", [0, 1, 1535]),
        (p + "mlp.up_proj.weight", [0, 1, 1535]),
        (p + "mlp.down_proj.weight", [0, 1, 575]),
    ]
picks.append(("model.norm.weight", None))
tensors = []
for key, rows in picks:
    t = sd[key].float()
    if rows is None:
        tensors.append({"name": key, "shape": list(t.shape), "rows": None, "values": [t[:cols].tolist()]})
    else:
        tensors.append({"name": key, "shape": list(t.shape), "rows": rows,
                        "values": [t[r, :cols].tolist() for r in rows]})
doc = {"source": f"transformers {__import__('transformers').__version__}, "
                 f"AutoModelForCausalLM.from_pretrained(models, gguf_file='{name}', dtype=float32)",
       "cols": cols, "tied": "lm_head.weight" not in sd or model.config.tie_word_embeddings,
       "tensors": tensors}
with open(out, "w") as f:
    f.write(json.dumps({k: v for k, v in doc.items() if k != "tensors"})[:-1] + ', "tensors": [\n')
    f.write(",\n".join(json.dumps(t) for t in tensors))
    f.write("\n]}\n")
print("wrote", out)
