#!/usr/bin/env python3
"""Generation oracle for prefix-tune, from HF transformers + PEFT (run by hand, never by CI).

Writes tests/fixtures/generate_hf.json: for the tiny fixture models (tests/fixtures/{gpt2,llama}_tiny,
made by make_fixtures.py) and a few prompts (token ids from the fixtures' tokenizer.json), what
HF transformers generates in float64:

- `base`: `model.generate` without a prefix: greedy, and beam search with several `num_beams` /
  `length_penalty` settings (early_stopping=False, HF's default), each with the model's own EOS and
  with an EOS id chosen to occur often (so finished hypotheses compete);
- `peft_greedy`: greedy continuation with the fixture's PEFT prefix-tuning adapter, computed by a
  full forward pass per step (PeftModel.forward). PeftModel.generate is not used: with peft 0.21.2 and
  transformers 5.24 it ignores the prefix (Llama) or drops it after the first step (GPT-2) on these
  models, whereas the forward is the reference the losses are checked against (oracle_*.json).

Usage:  /root/.cache/prefix-tune/oracle-venv/bin/python tools/oracle/generate_oracle.py
"""

import json
from pathlib import Path

import peft
import tokenizers
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
PROMPTS = ["the cat sat on", "hello world", "a"]
MAX_NEW = 10
BEAMS = [(2, 1.0), (4, 1.0), (3, 0.6), (5, 2.0)]


def model_for(family):
    d = FIX / f"{family}_tiny"
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval()
    return d, m


def generate(m, ids, eos, **kw):
    x = torch.tensor([ids])
    with torch.no_grad():
        out = m.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=MAX_NEW,
            eos_token_id=eos,
            pad_token_id=eos,
            **kw,
        )
    return out[0, len(ids):].tolist()


def strip_pad(tokens, eos):
    # HF pads finished sequences with pad_token_id (= eos here): keep up to the first eos.
    if eos in tokens:
        return tokens[: tokens.index(eos) + 1]
    return tokens


def main():
    out = {
        "description": __doc__.split("\n\n")[1],
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "max_new_tokens": MAX_NEW,
        "families": {},
    }
    for family in ["gpt2", "llama"]:
        d, m = model_for(family)
        tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        model_eos = m.generation_config.eos_token_id
        fam = {"model_dir": f"{family}_tiny", "model_eos": model_eos, "cases": []}
        for text in PROMPTS:
            ids = tok.encode(text, add_special_tokens=False).ids
            greedy = generate(m, ids, model_eos, do_sample=False)
            # A frequent token of the greedy continuation as EOS, so hypotheses end early.
            common_eos = max(set(greedy), key=greedy.count)
            for eos in [model_eos, common_eos]:
                case = {
                    "prompt": text,
                    "prompt_ids": ids,
                    "eos": eos,
                    "greedy": strip_pad(generate(m, ids, eos, do_sample=False), eos),
                    "beams": [],
                }
                for nb, lp in BEAMS:
                    toks = generate(
                        m, ids, eos, do_sample=False, num_beams=nb, length_penalty=lp,
                        early_stopping=False,
                    )
                    case["beams"].append(
                        {"num_beams": nb, "length_penalty": lp, "tokens": strip_pad(toks, eos)}
                    )
                fam["cases"].append(case)
        # PEFT prefix: greedy by full forward per step.
        pm = PeftModel.from_pretrained(m, d / "peft_adapter").eval()
        fam["peft_greedy"] = []
        for text in PROMPTS:
            ids = tok.encode(text, add_special_tokens=False).ids
            seq = torch.tensor([ids])
            new = []
            for _ in range(MAX_NEW):
                with torch.no_grad():
                    lg = pm(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1]
                t = int(lg.argmax())
                new.append(t)
                seq = torch.cat([seq, torch.tensor([[t]])], 1)
                if t == model_eos:
                    break
            fam["peft_greedy"].append({"prompt": text, "prompt_ids": ids, "tokens": new})
        out["families"][family] = fam
    path = FIX / "generate_hf.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
