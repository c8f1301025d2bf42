"""Reading GGUF files: metadata, and the dequantized tensors of one shard's layers.

GGUF spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md. Parsing goes through the
``gguf`` package; a file is opened once per process (opening maps every metadata array).
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_open_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _open_reader(path: str):
    import gguf

    logger.info("opening GGUF %s", path)
    return gguf.GGUFReader(path, "r")


def open_gguf(path: str | Path):
    """The process-wide ``gguf.GGUFReader`` of ``path`` (memory-mapped, opened once).

    Raises:
        FileNotFoundError: no file at ``path``.
    """
    path = str(Path(path).resolve())
    if not Path(path).is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with _open_lock:
        return _open_reader(path)


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every metadata key of the file with its value (strings decoded, arrays as lists)."""
    return dict(_metadata(str(Path(path).resolve())))


@functools.lru_cache(maxsize=4)
def _metadata(path: str) -> tuple:
    reader = open_gguf(path)
    out = []
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out.append((key, f.contents()))
    return tuple(out)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of Q/K rows.

    llama.cpp reorders each head's rows from the HF rotary layout (first half / second half of
    the head dimension) to interleaved pairs; this restores the HF layout.
    ``w``: (n_heads * head_dim, hidden) -> same shape.
    """
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# GGUF tensor name -> our (HF-style) parameter name; {i} is the layer index.
LLAMA_LAYER_TENSORS = {
    "blk.{i}.attn_norm.weight": "layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
}


def load_llama_shard_tensors(
    path: str | Path, start_layer: int, end_layer: int, n_layers: int, n_heads: int, n_kv_heads: int
) -> dict[str, np.ndarray]:
    """Dequantize only the tensors a shard of layers ``[start_layer, end_layer]`` needs.

    Returns float32 arrays keyed by HF-style names (``embed_tokens.weight`` (vocab, hidden) on
    the first shard; ``norm.weight`` (hidden,) and ``lm_head.weight`` (vocab, hidden) on the last,
    tied to the embedding when the file has no ``output.weight``), Q/K rows restored to the HF
    rotary layout.

    Raises:
        KeyError: a tensor the shard needs is missing from the file (named in the message).
    """
    from gguf.quants import dequantize

    reader = open_gguf(path)
    by_name = {t.name: t for t in reader.tensors}

    def get(name: str) -> np.ndarray:
        if name not in by_name:
            raise KeyError(f"tensor {name!r} not found in {path}")
        t = by_name[name]
        arr = dequantize(t.data, t.tensor_type)
        return np.ascontiguousarray(arr, dtype=np.float32)

    out: dict[str, np.ndarray] = {}
    is_first, is_last = start_layer == 0, end_layer == n_layers - 1
    if is_first or (is_last and "output.weight" not in by_name):
        emb = get("token_embd.weight")
        if is_first:
            out["embed_tokens.weight"] = emb
        if is_last and "output.weight" not in by_name:
            out["lm_head.weight"] = emb
    if is_last:
        out["norm.weight"] = get("output_norm.weight")
        if "output.weight" in by_name:
            out["lm_head.weight"] = get("output.weight")
    for i in range(start_layer, end_layer + 1):
        for gguf_name, name in LLAMA_LAYER_TENSORS.items():
            w = get(gguf_name.format(i=i))
            if gguf_name.endswith("attn_q.weight"):
                w = _unpermute(w, n_heads)
            elif gguf_name.endswith("attn_k.weight"):
                w = _unpermute(w, n_kv_heads)
            out[name.format(i=i)] = w
    return out
