"""Reading GGUF files: metadata, and the dequantized tensors of one shard's layers.

GGUF spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md. Parsing goes through the
``gguf`` package; a file is opened once per process (opening maps every metadata array).
"""

from __future__ import annotations

import functools
import logging
import mmap
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

logger = logging.getLogger(__name__)

_open_lock = threading.Lock()

#: Metadata arrays longer than this (the vocabulary, its token types and the BPE merges) are
#: dropped from the reader once their values are cached: ``GGUFReader`` keeps several numpy
#: views per element, ~85 MB for a 49k-token vocabulary.
_TRIM_ARRAY_PARTS = 1000


@functools.lru_cache(maxsize=4)
def _open(path: str) -> tuple[Any, tuple]:
    import gguf

    logger.info("opening GGUF %s", path)
    reader = gguf.GGUFReader(path, "r")
    meta = tuple((key, f.contents()) for key, f in reader.fields.items() if not key.startswith("GGUF."))
    for key in [k for k, f in reader.fields.items() if len(f.parts) > _TRIM_ARRAY_PARTS]:
        del reader.fields[key]
    return reader, meta


def open_gguf(path: str | Path):
    """The process-wide ``gguf.GGUFReader`` of ``path`` (memory-mapped, opened once).

    Its ``tensors`` are complete; metadata arrays of more than ``_TRIM_ARRAY_PARTS`` parts are
    removed from its ``fields`` to save memory: read metadata through ``gguf_metadata``.

    Raises:
        FileNotFoundError: no file at ``path``.
    """
    return _open_checked(path)[0]


def _open_checked(path: str | Path) -> tuple[Any, tuple]:
    path = str(Path(path).resolve())
    if not Path(path).is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with _open_lock:
        return _open(path)


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every metadata key of the file with its value (strings decoded, arrays as lists)."""
    return dict(_open_checked(path)[1])


def _drop_pages(reader: Any, array: np.ndarray) -> None:
    """Drop the file pages under ``array`` (a view of the reader's memory map) from this process's
    resident memory once they have been read; they stay in the OS page cache. Best effort."""
    mm = getattr(reader.data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not array.nbytes:
        return
    try:
        start = array.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]
        page = mmap.PAGESIZE
        begin = start // page * page
        mm.madvise(mmap.MADV_DONTNEED, begin, start + array.nbytes - begin)
    except (ValueError, OSError, AttributeError):
        pass


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


#: Rows dequantized at a time: bounds the float32 temporaries of one tensor (the 49152-row
#: embedding would otherwise need several full-size intermediates).
DEQUANT_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class QuantizedRows:
    """Rows of a quantized tensor exactly as the file stores them.

    ``qtype``: the GGML type (``gguf.GGMLQuantizationType``, e.g. 3 = Q4_1, 8 = Q8_0);
    ``data``: uint8 (rows, bytes per row), each row its blocks in order.
    """

    qtype: int
    data: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape


def gguf_tensor_types(path: str | Path) -> dict[str, int]:
    """GGML type of every tensor in the GGUF file at ``path``, by GGUF tensor name
    (``"blk.0.attn_q.weight"`` -> 3 for Q4_1)."""
    return {t.name: int(t.tensor_type) for t in open_gguf(path).tensors}


def gguf_tensor_names(path: str | Path) -> set[str]:
    """Names of the tensors in the GGUF file at ``path`` (e.g. ``"output.weight"``)."""
    return {t.name for t in open_gguf(path).tensors}


def iter_llama_shard_chunks(
    path: str | Path, start_layer: int, end_layer: int, n_layers: int, n_heads: int, n_kv_heads: int,
    raw_types: frozenset[int] | set[int] = frozenset(),
) -> Iterator[tuple[str, tuple[int, ...], int, np.ndarray | QuantizedRows]]:
    """Dequantize the tensors a shard of layers ``[start_layer, end_layer]`` needs, a block of
    rows at a time, so a loader can copy each block into its final storage and drop it.

    Yields ``(name, shape, row, block)``: the HF-style name (see ``load_llama_shard_tensors``),
    the tensor's full shape, the index of the block's first row, and the block itself
    (float32, shape ``(rows,) + shape[1:]``, at most ``DEQUANT_CHUNK_ROWS`` rows). Tied output
    heads are yielded under ``lm_head.weight`` only when the shard does not also hold the
    embedding (``embed_tokens.weight``), since then both are the same tensor.

    Matrices stored in a GGML type listed in ``raw_types`` are not dequantized: their blocks
    come as ``QuantizedRows`` (a copy of the file's bytes, Q/K rows restored likewise).

    Raises:
        KeyError: a tensor the shard needs is missing from the file (named in the message).
    """
    from gguf.quants import dequantize

    reader = open_gguf(path)
    by_name = {t.name: t for t in reader.tensors}

    def tensor(name: str):
        if name not in by_name:
            raise KeyError(f"tensor {name!r} not found in {path}")
        return by_name[name]

    def is_raw(t) -> bool:
        return int(t.tensor_type) in raw_types and len(t.shape) == 2

    def read(t, data: np.ndarray) -> np.ndarray:
        """Rows ``data`` of ``t`` dequantized, or as the file's bytes for a raw type (a copy:
        never a view of the map)."""
        out = np.array(data, dtype=np.uint8) if is_raw(t) else np.array(dequantize(data, t.tensor_type), dtype=np.float32)
        _drop_pages(reader, data)
        return out

    def whole(name: str) -> np.ndarray:
        t = tensor(name)
        return read(t, t.data)

    def chunks(gguf_name: str, name: str):
        t = tensor(gguf_name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dimensions fastest first
        if len(shape) == 1:
            yield name, shape, 0, whole(gguf_name)
            return
        for row in range(0, shape[0], DEQUANT_CHUNK_ROWS):
            block = read(t, t.data[row:row + DEQUANT_CHUNK_ROWS])
            if is_raw(t):
                yield name, shape, row, QuantizedRows(int(t.tensor_type), block)
            else:
                yield name, shape, row, block.reshape(-1, *shape[1:])

    is_first, is_last = start_layer == 0, end_layer == n_layers - 1
    tied = "output.weight" not in by_name
    if is_first:
        yield from chunks("token_embd.weight", "embed_tokens.weight")
    for i in range(start_layer, end_layer + 1):
        for gguf_name, name in LLAMA_LAYER_TENSORS.items():
            gguf_name, name = gguf_name.format(i=i), name.format(i=i)
            if gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
                t = tensor(gguf_name)
                w = _unpermute(whole(gguf_name), n_heads if gguf_name.endswith("attn_q.weight") else n_kv_heads)
                if is_raw(t):
                    yield name, tuple(int(d) for d in reversed(t.shape.tolist())), 0, QuantizedRows(int(t.tensor_type), w)
                else:
                    yield name, w.shape, 0, w
            else:
                yield from chunks(gguf_name, name)
    if is_last:
        yield from chunks("output_norm.weight", "norm.weight")
        if not tied:
            yield from chunks("output.weight", "lm_head.weight")
        elif not is_first:
            yield from chunks("token_embd.weight", "lm_head.weight")


def load_llama_shard_tensors(
    path: str | Path, start_layer: int, end_layer: int, n_layers: int, n_heads: int, n_kv_heads: int
) -> dict[str, np.ndarray]:
    """Dequantize only the tensors a shard of layers ``[start_layer, end_layer]`` needs.

    Returns float32 arrays keyed by HF-style names (``embed_tokens.weight`` (vocab, hidden) on
    the first shard; ``norm.weight`` (hidden,) and ``lm_head.weight`` (vocab, hidden) on the last,
    the same array as the embedding when the file has no ``output.weight``), Q/K rows restored
    to the HF rotary layout. Loaders that care about peak memory use ``iter_llama_shard_chunks``.

    Raises:
        KeyError: a tensor the shard needs is missing from the file (named in the message).
    """
    out: dict[str, np.ndarray] = {}
    for name, shape, row, block in iter_llama_shard_chunks(path, start_layer, end_layer, n_layers, n_heads, n_kv_heads):
        if name not in out:
            out[name] = np.empty(shape, dtype=np.float32)
        out[name][row:row + block.shape[0]] = block
    if end_layer == n_layers - 1 and "lm_head.weight" not in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]  # tied: the same array
    return out
