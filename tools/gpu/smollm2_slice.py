#!/usr/bin/env python3
"""Write the first N transformer blocks of a llama-family GGUF (SmolLM2-135M-Instruct) as a GGUF.

The slice is small enough to travel to the GPU machine with the one-call GPU check
(scripts/gpu-check), so that tests/gpu_engine.rs runs the GPU engine on real weights there:
  - every key/value field of the input is copied (tokenizer, chat template, hyper-parameters),
    except `<arch>.block_count`, which becomes N;
  - token_embd, output_norm (and output, if present) and the tensors of blocks 0..N-1 are copied
    byte for byte: same names, shapes, quantization types and raw data; later blocks are dropped.
The output is written to a temporary name beside it, read back and compared with the input
(fields and raw tensor bytes), then renamed into place.

Needs the `gguf` package (the oracle venv has it: /root/.cache/prefix-tune/oracle-venv).

Usage: python3 smollm2_slice.py OUT.gguf [--layers 6] [--input IN.gguf]
  IN defaults to the cached model: $PREFIX_TUNE_CACHE, else ${XDG_CACHE_HOME:-$HOME/.cache}/prefix-tune,
  then models/SmolLM2-135M-Instruct.Q4_1.gguf.
"""
import argparse
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np

try:
    import gguf
except ImportError:
    sys.exit("smollm2_slice.py: the `gguf` Python package is missing "
             "(use /root/.cache/prefix-tune/oracle-venv/bin/python or `pip install gguf`)")

BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


def default_input() -> Path:
    cache = os.environ.get("PREFIX_TUNE_CACHE")
    if not cache:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.environ.get("HOME") or ".", ".cache")
        cache = os.path.join(base, "prefix-tune")
    return Path(cache) / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def field_value(reader: "gguf.GGUFReader", key: str):
    f = reader.get_field(key)
    return f.contents() if f is not None else None


def kept(name: str, n_layers: int) -> bool:
    m = BLOCK_RE.match(name)
    return m is None or int(m.group(1)) < n_layers


def write_slice(reader: "gguf.GGUFReader", out: Path, n_layers: int, block_key: str) -> None:
    arch = field_value(reader, gguf.Keys.General.ARCHITECTURE)
    writer = gguf.GGUFWriter(out, arch=arch, endianess=reader.endianess)
    alignment = field_value(reader, gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment
    for field in reader.fields.values():
        # GGUF.* are the header's counts (the writer writes its own); the writer adds the
        # architecture itself, first, as in the input.
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = n_layers if field.name == block_key else field.contents()
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
    tensors = [t for t in reader.tensors if kept(t.name, n_layers)]
    for t in tensors:
        # The reader's data is the raw bytes (uint8 rows) for quantized types: the writer turns
        # that byte shape back into the element shape for the given type.
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()


def check_slice(src: "gguf.GGUFReader", path: Path, n_layers: int, block_key: str) -> int:
    """Read the written file back; raise if anything differs from the input. Returns the tensor count."""
    got = gguf.GGUFReader(path, "r")
    want_fields = {k: f for k, f in src.fields.items() if not k.startswith("GGUF.")}
    got_fields = {k: f for k, f in got.fields.items() if not k.startswith("GGUF.")}
    if list(want_fields) != list(got_fields):
        raise RuntimeError(f"{path}: key/value fields differ: {sorted(set(want_fields) ^ set(got_fields))}")
    for k, f in want_fields.items():
        g = got_fields[k]
        if g.types != f.types:
            raise RuntimeError(f"{path}: field {k} has types {g.types}, the input {f.types}")
        want = n_layers if k == block_key else f.contents()
        if g.contents() != want:
            raise RuntimeError(f"{path}: field {k} differs from the input")
    want_tensors = [t for t in src.tensors if kept(t.name, n_layers)]
    if [t.name for t in got.tensors] != [t.name for t in want_tensors]:
        raise RuntimeError(f"{path}: tensor list differs from the kept tensors of the input")
    for w, g in zip(want_tensors, got.tensors):
        if g.tensor_type != w.tensor_type or list(g.shape) != list(w.shape):
            raise RuntimeError(f"{path}: tensor {w.name}: type/shape {g.tensor_type.name} {list(g.shape)}, "
                               f"the input {w.tensor_type.name} {list(w.shape)}")
        if g.n_bytes != w.n_bytes or not np.array_equal(
                np.asarray(g.data).view(np.uint8).reshape(-1), np.asarray(w.data).view(np.uint8).reshape(-1)):
            raise RuntimeError(f"{path}: tensor {w.name}: the bytes differ from the input's")
    return len(want_tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", type=Path, help="the GGUF to write (replaced if present)")
    ap.add_argument("--layers", type=int, default=6, help="blocks to keep, from the first (default 6)")
    ap.add_argument("--input", type=Path, default=None, help="the full GGUF (default: the cached SmolLM2)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    src_path = args.input or default_input()
    if not src_path.is_file():
        sys.exit(f"smollm2_slice.py: {src_path}: no such file (fetch the model first, see README)")
    try:
        reader = gguf.GGUFReader(src_path, "r")
    except Exception as e:  # the reader raises ValueError/OSError/struct errors on a bad file
        sys.exit(f"smollm2_slice.py: {src_path}: not a readable GGUF file: {e}")
    arch = field_value(reader, gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        sys.exit(f"smollm2_slice.py: {src_path}: no general.architecture field")
    block_key = f"{arch}.block_count"
    n_blocks = field_value(reader, block_key)
    if not isinstance(n_blocks, int):
        sys.exit(f"smollm2_slice.py: {src_path}: no {block_key} field")
    if not 1 <= args.layers <= n_blocks:
        sys.exit(f"smollm2_slice.py: --layers {args.layers}: the model has {n_blocks} blocks (1..{n_blocks} allowed)")
    for t in reader.tensors:
        m = BLOCK_RE.match(t.name)
        if m and int(m.group(1)) >= n_blocks:
            sys.exit(f"smollm2_slice.py: {src_path}: tensor {t.name} is past {block_key} = {n_blocks}")

    out = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        write_slice(reader, tmp, args.layers, block_key)
        n_tensors = check_slice(reader, tmp, args.layers, block_key)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    print(f"{out}: {args.layers} of {n_blocks} blocks, {n_tensors} of {len(reader.tensors)} tensors, "
          f"{out.stat().st_size / 2**20:.1f} MiB (from {src_path})")


if __name__ == "__main__":
    main()
