#!/usr/bin/env python3
"""Writes ir/tests/fixtures/quants/<format>.json: quantized blocks and the f32 values `gguf.quants` dequantizes
them to, so kiln's reference dequantizers can be checked bit for bit against the `gguf` package.

Run from the repo root:  pip install gguf==0.19.0 && python3 scripts/gen_quant_fixtures.py
Blocks come from two sources: `gguf.quants.quantize` of random data where the package can quantize the format,
and random bytes (every bit pattern; a block is redrawn while it dequantizes to a non-finite value).
Q8_K is absent: `gguf.quants` has no dequantizer for it (kiln tests it against ggml's definition instead).
"""
import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType as T, GGML_QUANT_SIZES, quants

FORMATS = ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0"]
CAN_QUANTIZE = {"BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0"}
OUT = pathlib.Path("ir/tests/fixtures/quants")


def random_blocks(qtype, n_blocks, rng):
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = []
    while len(blocks) < n_blocks:
        raw = rng.integers(0, 256, size=block_bytes, dtype=np.uint8)
        if np.all(np.isfinite(quants.dequantize(raw, qtype))):
            blocks.append(raw)
    return np.concatenate(blocks)


def main():
    rng = np.random.default_rng(20261122)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in FORMATS:
        qtype = T[name]
        block_elems, _ = GGML_QUANT_SIZES[qtype]
        n_blocks = 8 if block_elems == 256 else 16
        parts = [random_blocks(qtype, n_blocks, rng)]
        if name in CAN_QUANTIZE:
            data = rng.standard_normal(n_blocks * block_elems).astype(np.float32)
            parts.append(quants.quantize(data, qtype).reshape(-1))
        elif name == "F16":
            parts.append(rng.standard_normal(n_blocks).astype(np.float16).view(np.uint8))
        raw = np.concatenate(parts).astype(np.uint8)
        expected = quants.dequantize(raw, qtype).astype(np.float32).reshape(-1)
        fixture = {
            "format": name.lower(),
            "generator": "scripts/gen_quant_fixtures.py (gguf.quants)",
            "blocks_hex": raw.tobytes().hex(),
            "expected_f32_le_hex": expected.tobytes().hex(),
        }
        (OUT / f"{name.lower()}.json").write_text(json.dumps(fixture, indent=1) + "\n")
        print(f"{name}: {raw.size} bytes -> {expected.size} values")


if __name__ == "__main__":
    main()
