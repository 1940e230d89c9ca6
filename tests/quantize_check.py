"""Checks a `kiln quantize` output with the `gguf` package (llama.cpp's own Python reader): usage
`quantize_check.py SOURCE.gguf OUT.gguf FORMAT`.

Every tensor kiln kept must be byte-identical to the source. Every tensor it quantized must be in FORMAT and
dequantize (with gguf's dequantizers) to what the format promises: Q8_0 within half a step of the source (and the f16 rounding of its scale), the ternary
formats to exactly {-d, 0, +d} per 256-value block with d the block's mean magnitude and the digits those of
round(clamp(x / d, -1, 1)).
"""
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

source, out, fmt = GGUFReader(sys.argv[1]), GGUFReader(sys.argv[2]), sys.argv[3].upper()
src = {t.name: t for t in source.tensors}
quantized = kept = 0
for t in out.tensors:
    s = src[t.name]
    if t.tensor_type == s.tensor_type:
        assert bytes(t.data.tobytes()) == bytes(s.data.tobytes()), f"{t.name}: kept tensor changed"
        kept += 1
        continue
    assert t.tensor_type.name == fmt, f"{t.name}: {t.tensor_type.name}, expected {fmt}"
    x = dequantize(s.data, s.tensor_type).astype(np.float32).reshape(-1)
    y = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
    assert x.shape == y.shape, f"{t.name}: {x.shape} vs {y.shape}"
    if fmt == "Q8_0":
        bx, by = x.reshape(-1, 32), y.reshape(-1, 32)
        # Half a step, plus the f16 rounding of the scale times the largest code.
        step = np.abs(bx).max(axis=1, keepdims=True) / 127
        assert (np.abs(bx - by) <= step * 0.57 + 1e-7).all(), f"{t.name}: off by more than half a step"
    else:
        bx, by = x.reshape(-1, 256), y.reshape(-1, 256)
        d = np.abs(bx).mean(axis=1, keepdims=True, dtype=np.float32)
        d16 = d.astype(np.float16).astype(np.float32)
        digits = np.clip(np.round(bx / np.where(d == 0, 1, d)), -1, 1)
        assert np.array_equal(by, digits * d16) or np.mean(by != digits * d16) < 1e-3, f"{t.name}: digits differ"
        levels = np.unique(np.round(by / np.where(d16 == 0, 1, d16)))
        assert set(levels.tolist()) <= {-1.0, 0.0, 1.0}, f"{t.name}: levels {levels}"
    quantized += 1
assert quantized > 0, "nothing was quantized"
print(f"{sys.argv[2]}: {quantized} tensors in {fmt} checked with gguf's dequantizers, {kept} kept byte for byte")
