#!/usr/bin/env python3
"""Writes ir/tests/fixtures/tl/*.json: ternary matrices tiled into bitnet.cpp's TL1 and TL2 file layouts.

The tiling follows the published converter (bitnet.cpp's utils/convert-hf-to-gguf-bitnet.py) step by step as
numpy reshapes and transposes, independently of kiln's index arithmetic in `kiln_ir::tl`, which is tested against
these files. Each fixture: the weights (-1, 0, +1, row-major), the tiling [BM, BK, bm], and the tiled bytes
(without the scale trailer) in hex.
"""
import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "ir" / "tests" / "fixtures" / "tl"


def pair_indices(w):
    m, k = w.shape
    pairs = w.reshape(m * k // 2, 2)
    return (pairs[:, 0] * 3 + pairs[:, 1] + 4).reshape(m, k // 2).astype(np.uint8)


def blocks(idx, M, K, BM, BY, bm, by, n):
    """The converter's first four reshapes, shared by every part: (M, K/n) indices of n weights each to
    (M/BM, K/BY, BM/bm, BY/by, bm, by/n)."""
    w = idx.reshape(M // BM, BM, K // n).transpose(0, 2, 1)
    w = w.reshape(M // BM, K // BY, BY // n, BM).transpose(0, 1, 3, 2)
    w = w.reshape(M // BM, K // BY, BM // bm, bm, BY // n).transpose(0, 1, 2, 4, 3)
    return w.reshape(M // BM, K // BY, BM // bm, BY // by, by // n, bm).transpose(0, 1, 2, 3, 5, 4)


def tile_pairs(idx, M, K, BM, BY, bm, by):
    """The converter's TL1 reshapes: (M, K/2) indices to 16-byte units of two nibbles."""
    w = blocks(idx, M, K, BM, BY, bm, by, 2)
    w = w.reshape(M // BM, K // BY, BM // bm, BY // by, bm // 16, 16, by // 2).transpose(0, 1, 2, 3, 4, 6, 5)
    w = w.reshape(M // BM, K // BY, BM // bm, BY // by, bm // 16, by // 4, 2, 16).transpose(0, 1, 2, 3, 4, 5, 7, 6)
    w = w.reshape(M * K // 64, 16, 2)
    return ((w[:, :, 0] << 4) + w[:, :, 1]).astype(np.uint8).reshape(-1)


def tl1(w, BM, BK, bm):
    M, K = w.shape
    return tile_pairs(pair_indices(w), M, K, BM, BK, bm, 256 // bm)


def swap_groups(w, bm):
    """bitnet.cpp's TL2 row-group order 0, 2, 1, 3 within each 32-row byte row."""
    w = w.reshape(-1, bm // 8, 8)
    w[:, [0, 1, 2, 3], :] = w[:, [0, 2, 1, 3], :]
    return w.reshape(-1, bm)


def tl2_two(w, BM, BY, bm, by):
    M, K = w.shape
    t = blocks(pair_indices(w), M, K, BM, BY, bm, by, 2)
    t = (t[..., 0] << 4) + t[..., 1]
    return swap_groups(t.reshape(M * K // bm // by, bm).astype(np.uint8), bm).reshape(-1)


def tl2_three(w, BM, BY, bm, by):
    M, K = w.shape
    triples = w.reshape(M * K // 3, 3).astype(np.int32)
    v = triples[:, 0] * 9 + triples[:, 1] * 3 + triples[:, 2]
    sign = np.where(np.sign(v) + 2 > 1, 0, np.sign(v) + 2).reshape(M, K // 3).astype(np.uint8)
    mag = np.abs(v).reshape(M, K // 3).astype(np.uint8)

    t = blocks(mag, M, K, BM, BY, bm, by, 3)
    t = (t[..., 0] << 4) + t[..., 1]
    weights = swap_groups(t.reshape(M * K // bm // by, bm).astype(np.uint8), bm).reshape(-1)

    s = sign.reshape(M // BM, BM, K // 3).transpose(0, 2, 1)
    s = s.reshape(M // BM, K // BY, BY // 3, BM).transpose(0, 1, 3, 2)
    s = s.reshape(M // BM, K // BY, BM // bm, bm, BY // 3).transpose(0, 1, 2, 4, 3)
    s = s.reshape(M // BM, K // BY, BM // bm, BY // (by * 4), by // 3 * 4, bm).transpose(0, 1, 2, 3, 5, 4)
    s = s.reshape(M // BM, K // BY, BM // bm, BY // (by * 4), by // 3 * 8, bm // 2).astype(np.uint16)
    words = np.zeros((M // BM, K // BY, BM // bm, BY // (by * 4), bm // 2), dtype=np.uint16)
    for i in range(16):
        words += s[:, :, :, :, i, :] << (15 - i)
    signs = words.astype("<u2").view(np.uint8).reshape(-1)
    return np.concatenate([weights, signs])


def tl2(w, BM, BK, bm):
    M, K = w.shape
    three_k = K - K % BK
    parts = [tl2_three(w[:, :three_k], BM, BK, bm, 192 // bm)]
    if K % BK:
        parts.append(tl2_two(w[:, three_k:], BM, 32, 32, 4))
    data = np.concatenate(parts)
    size = (K - 256) * M // 3 * 5 // 8 + 256 * M // 2 * 4 // 8
    return np.pad(data, (0, size - data.shape[0]))


def main():
    rng = np.random.default_rng(158)
    OUT.mkdir(parents=True, exist_ok=True)
    cases = [
        ("tl1", (48, 256), (48, 64, 16), tl1),
        ("tl1", (64, 384), (64, 128, 32), tl1),
        ("tl2", (64, 640), (64, 192, 32), tl2),
        ("tl2", (32, 768), (32, 96, 32), tl2),
    ]
    for name, (m, k), (BM, BK, bm), fn in cases:
        w = rng.integers(-1, 2, size=(m, k)).astype(np.int8)
        data = fn(w.copy(), BM, BK, bm)
        fixture = {
            "format": name,
            "m": m,
            "k": k,
            "tiling": [BM, BK, bm],
            "weights": "".join("-0+"[v + 1] for v in w.reshape(-1)),
            "bytes": bytes(data.astype(np.uint8)).hex(),
        }
        path = OUT / f"{name}_{m}x{k}.json"
        path.write_text(json.dumps(fixture) + "\n")
        print(f"{path}: {len(data)} bytes")


if __name__ == "__main__":
    main()
