"""PEFT interop oracle for the prefix layout (tests/prefix.rs).

Run by hand (CI never runs Python):
    /root/.cache/prefix-tune/oracle-venv/bin/python tools/oracle/peft_prefix_fixture.py
        writes tests/fixtures/peft_prefix/{adapter_config.json, adapter_model.safetensors,
        expected_kv.json}: a PEFT-saved prefix-tuning adapter of a tiny GQA Llama and the per-layer
        keys/values PEFT's get_prompt() hands the model ([kv_heads, P, head_dim] per layer).
    ... peft_prefix_fixture.py --check DIR
        loads an adapter exported by prefix-tune into PEFT and prints its get_prompt() keys/values
        next to the safetensors tensor, checking PEFT accepts the directory.
Versions: peft 0.21.2, transformers 5.24.0, torch 2.15.0.
"""
import json
import os
import sys

import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

CFG = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2)


def kv_of(pm):
    cache = pm.get_prompt(batch_size=1)
    return [(layer.keys[0].flatten().tolist(), layer.values[0].flatten().tolist()) for layer in cache.layers]


def make(out_dir):
    torch.manual_seed(7)
    base = LlamaForCausalLM(LlamaConfig(**CFG))
    pm = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with torch.no_grad():
        w = pm.prompt_encoder["default"].embedding.weight
        w.copy_(torch.randn(w.shape))
    pm.peft_config["default"].base_model_name_or_path = "tiny-llama-fixture"
    pm.save_pretrained(out_dir)
    os.remove(os.path.join(out_dir, "README.md"))
    pm.peft_config["default"].inference_mode = True
    kv = kv_of(pm)
    doc = dict(n_layers=2, kv_heads=2, head_dim=4, prefix_len=3,
               k=[k for k, _ in kv], v=[v for _, v in kv])
    with open(os.path.join(out_dir, "expected_kv.json"), "w") as f:
        json.dump(doc, f)
    print("wrote", out_dir)


def check(adapter_dir):
    base = LlamaForCausalLM(LlamaConfig(**CFG))
    pm = PeftModel.from_pretrained(base, adapter_dir)
    kv = kv_of(pm)
    from safetensors.torch import load_file
    t = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))["prompt_embeddings"]
    print(json.dumps(dict(k=[k for k, _ in kv], v=[v for _, v in kv], prompt_embeddings=t.flatten().tolist())))
    # The tokens should run with the prefix attached.
    out = pm(input_ids=torch.tensor([[1, 2, 3]]))
    print("logits", tuple(out.logits.shape), "finite", bool(torch.isfinite(out.logits).all()))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        check(sys.argv[2])
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        make(os.path.normpath(os.path.join(here, "..", "..", "tests", "fixtures", "peft_prefix")))
