"""The reader interface: ``ModelWeights`` (a checkpoint read by canonical tensor name, a shard
at a time), what it yields (``TensorInfo``, ``QuantizedRows``) and its errors; the formats
implement it in ``gguf_reader`` and ``safetensors_reader``."""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator

import numpy as np

from exo.models.architectures import ModelArgs, layer_name, parse_layer_name
from exo.models.gguf import BF16, DEQUANTIZABLE, F16, dequantize, row_bytes, type_name

logger = logging.getLogger(__name__)

#: Rows converted at a time: bounds the float32 temporaries of one tensor (a 262k-row
#: embedding would otherwise need several full-size intermediates).
CHUNK_ROWS = 4096


class WeightsError(ValueError):
    """A checkpoint exo cannot read: a missing tensor, a wrong shape, an unknown type (named)."""


@dataclass(frozen=True)
class TensorInfo:
    """A canonical tensor as the checkpoint stores it: ``shape`` (canonical, row-major),
    ``qtype`` (GGML type id) and ``nbytes`` (bytes in the file)."""

    shape: tuple[int, ...]
    qtype: int
    nbytes: int


@dataclass(frozen=True)
class QuantizedRows:
    """Rows of a matrix exactly as the file stores them: ``qtype`` (GGML type id) and ``data``,
    uint8 (rows, bytes per row), each row its blocks in order."""

    qtype: int
    data: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape


Chunk = tuple[str, tuple[int, ...], int, "np.ndarray | QuantizedRows"]


@dataclass(frozen=True)
class _Source:
    """Where a canonical tensor lives: rows ``[first_row, first_row + rows)`` of checkpoint
    tensor ``name`` (a fused tensor holds several), Q/K rows permuted by llama.cpp in groups of
    ``permute_heads`` heads (0: not permuted), ``offset`` added after conversion (norms)."""

    name: str
    first_row: int
    rows: int
    permute_heads: int = 0
    offset: float = 0.0


class ModelWeights(ABC):
    """A model's checkpoint, read by canonical tensor name.

    Attributes:
        args: the model's hyper-parameters.
        path: the file (first split) or directory it was opened from.
        format: "gguf" or "safetensors".
        pooling: how the model pools hidden states into an embedding ("mean", "last", "cls";
            ``exo.models.config_readers.embedding_config_from_gguf`` / ``_from_hf_dir``).
        matryoshka: its embeddings may be truncated to fewer dimensions (Matryoshka).
    """

    args: ModelArgs
    path: Path
    format: str
    pooling: str = "mean"
    matryoshka: bool = False

    def __init__(self) -> None:
        self._sources: dict[str, _Source] = {}
        self._info_cache: dict[str, TensorInfo] | None = None

    # -- implemented per format

    @abstractmethod
    def _info(self, name: str) -> tuple[tuple[int, ...], int]:
        """(shape, GGML type) of checkpoint tensor ``name``; KeyError when absent."""

    @abstractmethod
    def _raw_rows(self, name: str, first_row: int, n_rows: int) -> np.ndarray:
        """Rows of checkpoint tensor ``name`` as stored: uint8 (n_rows, bytes per row), a view."""

    def _release(self, view: np.ndarray) -> None:
        """Called once ``view`` (from ``_raw_rows``) has been copied: drop its pages."""

    # -- shared

    def _map(self, canonical: str, name: str, first_row: int = 0, rows: int | None = None, permute_heads: int = 0,
             offset: float = 0.0, required: bool = True) -> None:
        try:
            shape, _ = self._info(name)
        except KeyError:
            if required:
                raise WeightsError(f"{self.path}: tensor {name!r} ({canonical}) is missing") from None
            return
        n = shape[0] if len(shape) > 1 else 1
        self._sources[canonical] = _Source(name, first_row, n - first_row if rows is None else rows, permute_heads, offset)

    def check_types(self) -> None:
        """Every tensor the model needs is of a type exo can read.

        Raises:
            WeightsError: naming the first tensor of an unreadable type.
        """
        for canonical, src in self._sources.items():
            _, qtype = self._info(src.name)
            if qtype not in DEQUANTIZABLE:
                raise WeightsError(f"{self.path}: tensor {src.name!r} ({canonical}) is of GGML type {type_name(qtype)}, "
                                   f"which exo cannot read")

    def tensor_info(self) -> dict[str, TensorInfo]:
        """Every canonical tensor of the model with its stored shape, type and bytes."""
        if self._info_cache is None:
            out = {}
            for canonical, src in self._sources.items():
                shape, qtype = self._info(src.name)
                if len(shape) > 1:
                    out[canonical] = TensorInfo((src.rows, *shape[1:]), qtype, src.rows * row_bytes(qtype, math.prod(shape[1:])))
                else:
                    out[canonical] = TensorInfo(tuple(shape), qtype, row_bytes(qtype, math.prod(shape)))
            self._info_cache = out
        return self._info_cache

    def checkpoint_names(self, canonical: list[str] | set[str]) -> set[str]:
        """The checkpoint tensors behind ``canonical`` names (download planning)."""
        return {self._sources[c].name for c in canonical if c in self._sources}

    def shard_tensor_names(self, start_layer: int, end_layer: int) -> list[str]:
        """Canonical names of the tensors a shard of layers ``[start_layer, end_layer]`` holds:
        the embedding on the first shard, the final norm and (untied) head on the last."""
        args = self.args
        names = ["embed"] if start_layer == 0 else []
        for i in range(start_layer, end_layer + 1):
            names += [layer_name(i, k) for k in args.block.layer_keys()]
        if end_layer == args.n_layers - 1:
            names.append("output_norm")
            if not args.tie_word_embeddings:
                names.append("output")
        return names

    def shard_bytes(self, start_layer: int, end_layer: int) -> int:
        """Bytes of the checkpoint a shard reads (tied head: the embedding, counted once)."""
        info = self.tensor_info()
        names = set(self.shard_tensor_names(start_layer, end_layer))
        if end_layer == self.args.n_layers - 1 and self.args.tie_word_embeddings:
            names.add("embed")
        return sum(info[n].nbytes for n in names if n in info)

    def layer_bytes(self) -> list[int]:
        """Bytes of each layer's tensors in the checkpoint."""
        info = self.tensor_info()
        out = [0] * self.args.n_layers
        for name, t in info.items():
            parsed = parse_layer_name(name)
            if parsed is not None and parsed[0] < len(out):
                out[parsed[0]] += t.nbytes
        return out

    def _chunks(self, canonical: str, raw: bool, rows_per_chunk: int = CHUNK_ROWS) -> Iterator[Chunk]:
        src = self._sources.get(canonical)
        if src is None:
            raise WeightsError(f"{self.path}: the checkpoint has no tensor for {canonical!r}")
        shape, qtype = self._info(src.name)
        if len(shape) == 1:
            data = self._raw_rows(src.name, 0, 1)
            vec = self._convert(data, qtype, shape[0]).reshape(shape) + np.float32(src.offset)
            self._release(data)
            yield canonical, shape, 0, vec.astype(np.float32, copy=False)
            return
        cols = shape[-1]
        out_shape = (src.rows, cols)
        if src.permute_heads:  # whole heads at a time
            head = src.rows // src.permute_heads
            rows_per_chunk = max(head, rows_per_chunk // head * head)
        for r in range(0, src.rows, rows_per_chunk):
            n = min(rows_per_chunk, src.rows - r)
            data = self._raw_rows(src.name, src.first_row + r, n)
            block = np.array(data, dtype=np.uint8) if raw else self._convert(data, qtype, cols)
            self._release(data)
            if src.permute_heads:
                block = _unpermute(block, n // (src.rows // src.permute_heads))
            if src.offset:
                block = block + np.float32(src.offset)
            yield canonical, out_shape, r, QuantizedRows(qtype, block) if raw else block

    @staticmethod
    def _convert(data: np.ndarray, qtype: int, cols: int) -> np.ndarray:
        """Stored rows -> float32 (rows, cols)."""
        if qtype == F16:
            return np.frombuffer(np.ascontiguousarray(data), dtype="<f2").reshape(data.shape[0], cols).astype(np.float32)
        if qtype == BF16:
            bits = np.frombuffer(np.ascontiguousarray(data), dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(data.shape[0], cols)
        return dequantize(data, qtype, cols)

    def iter_shard(self, start_layer: int, end_layer: int, raw: Collection[str] = (),
                   rows_per_chunk: int = CHUNK_ROWS) -> Iterator[Chunk]:
        """The tensors of a shard of layers ``[start_layer, end_layer]``, a block of rows at a
        time, so a loader can copy each block into its final storage and drop it.

        Yields ``(name, shape, row, block)``: the canonical name, the tensor's full shape, the
        index of the block's first row, and the block: float32 ``(rows,) + shape[1:]``, or for
        a matrix named in ``raw`` a ``QuantizedRows`` of the file's bytes. A tied head comes as
        ``output`` (the embedding's data; raw when ``output`` is in ``raw``) on a last shard
        without layer 0.

        Raises:
            WeightsError: a tensor is missing or has the wrong shape (named).
            GGUFError: the file is truncated or a tensor's type cannot be read.
        """
        expected = self.args.layer_shapes()
        infos = self.tensor_info()
        for name in self.shard_tensor_names(start_layer, end_layer):
            parsed = parse_layer_name(name)
            want = expected[parsed[1]] if parsed else None
            info = infos.get(name)
            if want is not None and info is not None and tuple(info.shape) != tuple(want):
                raise WeightsError(f"{self.path}: {name} has shape {info.shape}, the config says {want}")
            yield from self._chunks(name, name in raw, rows_per_chunk)
        if end_layer == self.args.n_layers - 1 and self.args.tie_word_embeddings and start_layer != 0:
            for _, shape, row, block in self._chunks("embed", "output" in raw, rows_per_chunk):
                yield "output", shape, row, block

    def load_shard(self, start_layer: int, end_layer: int) -> dict[str, np.ndarray]:
        """A shard's tensors whole, as float32 arrays by canonical name (``output`` is the
        embedding's array when tied and both are held). For engines that need no
        streaming; loaders that care about peak memory use ``iter_shard``."""
        out: dict[str, np.ndarray] = {}
        for name, shape, row, block in self.iter_shard(start_layer, end_layer):
            if name not in out:
                out[name] = np.empty(shape, dtype=np.float32)
            out[name][row:row + block.shape[0]] = block
        if end_layer == self.args.n_layers - 1 and self.args.tie_word_embeddings and "embed" in out:
            out["output"] = out["embed"]
        return out


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of Q/K rows: each head's rows go from
    interleaved pairs back to the HF rotary layout (first half / second half of the head).
    ``w``: (n_heads * head_dim, ...) -> same shape."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
