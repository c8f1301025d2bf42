"""Weight readers: a model's tensors by canonical name (``exo.models.architectures``), read one
shard at a time, whatever the checkpoint: a GGUF file (or its splits), or a Hugging Face
directory of safetensors files (with or without ``model.safetensors.index.json``).

A reader maps canonical names onto the checkpoint's own tensors (splitting fused ones, undoing
llama.cpp's Q/K permutation, adding Gemma's norm offset), and yields a shard's tensors a block
of rows at a time: dequantized to float32, or, for the matrices the caller keeps as they are
(``raw``), as the file's own bytes (``QuantizedRows``). Only the bytes of the shard's own
tensors are ever read. Safetensors dtypes use GGML's ids: F32 = 0, F16 = 1, BF16 = 30.

Modules: ``base`` (``ModelWeights``, the interface), ``gguf_reader`` (``GGUFWeights``) and
``safetensors_reader`` (``SafetensorsWeights``); ``open_weights`` picks one.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from exo.models.architectures import UnsupportedModelError
from exo.models.gguf import GGUFError
from exo.models.weights.base import CHUNK_ROWS, ModelWeights, QuantizedRows, TensorInfo, WeightsError
from exo.models.weights.gguf_reader import GGUFWeights
from exo.models.weights.safetensors_reader import SafetensorsWeights, read_safetensors_header


def open_weights(path: str | Path) -> ModelWeights:
    """The reader of the checkpoint at ``path``: a ``.gguf`` file (or a split's first file), or a
    Hugging Face model directory. Opened once per process (again when the file changes).

    Raises:
        FileNotFoundError: nothing at ``path``.
        WeightsError, GGUFError, UnsupportedModelError: not a model exo can read (the message says why).
    """
    path = Path(path).resolve()
    if path.is_dir():
        # opened again when the config changes or safetensors files arrive (download by shard)
        stamp = ((path / "config.json").stat().st_mtime_ns if (path / "config.json").is_file() else 0,
                 tuple(sorted((p.name, p.stat().st_size) for p in path.glob("*.safetensors") if p.is_file())))
        return _open_cached(str(path), stamp)
    if path.is_file():
        st = path.stat()
        return _open_cached(str(path), (st.st_size, st.st_mtime_ns))
    raise FileNotFoundError(f"no model at {path}")


@functools.lru_cache(maxsize=16)
def _open_cached(path: str, stamp: Any) -> ModelWeights:
    p = Path(path)
    if p.is_dir():
        return SafetensorsWeights(p)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFWeights(p)
    raise WeightsError(f"{p} is neither a GGUF file nor a Hugging Face model directory")


__all__ = ["ModelWeights", "GGUFWeights", "SafetensorsWeights", "QuantizedRows", "TensorInfo", "WeightsError",
           "UnsupportedModelError", "GGUFError", "open_weights", "read_safetensors_header", "CHUNK_ROWS"]
