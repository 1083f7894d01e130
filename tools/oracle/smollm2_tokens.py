#!/usr/bin/env python3
"""Oracle for tests/smollm2.rs: HF transformers' tokenization of the SmolLM2 GGUF.

Run by hand with the oracle venv (CI never runs Python):
    ~/.cache/prefix-tune/oracle-venv/bin/python tools/oracle/smollm2_tokens.py
Writes tests/fixtures/smollm2_tokens.json.

For each sample text it records two id lists:
  - "hf_gguf": AutoTokenizer.from_pretrained(dir, gguf_file=...).encode(text, add_special_tokens=False),
    i.e. transformers loading the same GGUF;
  - "smollm_pretok": the same tokenizer with the pre-tokenizer the file's `tokenizer.ggml.pre = smollm`
    names (Digits(individual_digits=True) then ByteLevel, as SmolLM2's own tokenizer.json and
    llama.cpp do). transformers' GGUF loader has no entry for "smollm" and uses plain ByteLevel, which
    differs only where splitting off numerals changes what GPT-2's regex sees: non-ASCII numerals
    such as "½" or "①", and whitespace runs right before a numeral ("\r\n4", "  7").
"""
import json
import os
import random
import sys

from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoTokenizer

cache = os.environ.get("PREFIX_TUNE_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "prefix-tune")
models = os.path.join(cache, "models")
name = "SmolLM2-135M-Instruct.Q4_1.gguf"
out = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "smollm2_tokens.json")

SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "In 2024, π ≈ 3.14159 and 1,000,000 > 999999.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnew\n\nlines\r\n",
    "héllo wörld — naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 😀👍🏽 and symbols ©®™ €100",
    "x² + y² = z², ½ cup, ٣ and ① and Ⅻ",
    "<|im_start|>user\nWhat is 12+30?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x**2  # square\n",
    "It's, I'm, we'll, they've, she'd, don't",
    "a1b2c3 123abc456 007",
    "",
    " ",
    "\n",
]

# Seeded random strings over a mixed pool (ASCII, digits, whitespace, accents, CJK, emoji,
# non-ASCII numerals, special tokens).
rng = random.Random(20261126)
POOL = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") * 3 + list("0123456789") * 3
        + list(" \t\n.,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`") * 2 + list("éèàüößçñøå") + list("日本語中文한국어")
        + ["😀", "👍🏽", "🚀", "½", "²", "①", "٣", "Ⅻ", "\u00a0", "\u200b", "<|im_start|>", "<|im_end|>",
           "<|endoftext|>", "  ", "\r\n", "'s", "'ll", " the", " and", "ing"])
for _ in range(40):
    SAMPLES.append("".join(rng.choice(POOL) for _ in range(rng.randint(1, 40))))

tok = AutoTokenizer.from_pretrained(models, gguf_file=name)
backend = tok.backend_tokenizer
smollm = Tokenizer.from_str(backend.to_str())
smollm.pre_tokenizer = pre_tokenizers.Sequence(
    [pre_tokenizers.Digits(individual_digits=True),
     pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])

rows = []
for text in SAMPLES:
    rows.append({
        "text": text,
        "hf_gguf": tok.encode(text, add_special_tokens=False),
        "smollm_pretok": smollm.encode(text, add_special_tokens=False).ids,
    })
doc = {
    "source": f"transformers {__import__('transformers').__version__}, AutoTokenizer.from_pretrained(models, gguf_file='{name}')",
    "bos_token_id": tok.bos_token_id,
    "eos_token_id": tok.eos_token_id,
    "add_bos_token": bool(getattr(tok, "add_bos_token", False)),
    "vocab_size": len(tok),
    "samples": rows,
}
with open(out, "w", encoding="utf-8") as f:
    # one sample per line keeps diffs readable
    head = {k: v for k, v in doc.items() if k != "samples"}
    f.write(json.dumps(head, ensure_ascii=False)[:-1] + ', "samples": [\n')
    f.write(",\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    f.write("\n]}\n")
differ = sum(r["hf_gguf"] != r["smollm_pretok"] for r in rows)
print(f"wrote {out}: {len(rows)} samples, {differ} where the two pre-tokenizers differ", file=sys.stderr)
