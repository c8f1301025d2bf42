"""Weight readers: a model's tensors by canonical name (``exo.models.architectures``), read one
shard at a time, whatever the checkpoint: a GGUF file (or its splits), or a Hugging Face
directory of safetensors files (with or without ``model.safetensors.index.json``).

A reader maps canonical names onto the checkpoint's own tensors (splitting fused ones, undoing
llama.cpp's Q/K permutation, adding Gemma's norm offset), and yields a shard's tensors a block
of rows at a time: dequantized to float32, or, for the matrices the caller keeps as they are
(``raw``), as the file's own bytes (``QuantizedRows``). Only the bytes of the shard's own
tensors are ever read. Safetensors dtypes use GGML's ids: F32 = 0, F16 = 1, BF16 = 30.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterator

import numpy as np

from exo.models.architectures import (
    GGUF_GLOBAL, GGUF_LAYER, HF_GLOBAL, ModelArgs, UnsupportedModelError, architecture, args_from_gguf,
    args_from_hf_config, layer_name, parse_layer_name,
)
from exo.models.gguf import BF16, DEQUANTIZABLE, F16, F32, GGUFError, GGUFModel, dequantize, open_gguf, row_bytes, type_name

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
    """

    args: ModelArgs
    path: Path
    format: str

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


class GGUFWeights(ModelWeights):
    """A GGUF model (a file or its splits), read through ``exo.models.gguf``.

    Raises (constructor):
        FileNotFoundError, GGUFError: as ``open_gguf``. UnsupportedModelError: an architecture
        exo does not implement. WeightsError: a tensor the architecture needs is missing.
    """

    format = "gguf"

    def __init__(self, path: str | Path):
        super().__init__()
        self.gguf: GGUFModel = open_gguf(path)
        self.path = self.gguf.paths[0]
        self.metadata = self.gguf.metadata
        names = set(self.gguf.tensors)
        small = {n: self._small(n) for n in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
                 if n in names}
        self.args = args_from_gguf(self.metadata, names, small)
        arch = architecture(self.args.architecture)
        a = self.args
        for i in range(a.n_layers):
            fused_keys = {k for keys in arch.gguf_fused.values() for k in keys}
            for key in a.block.layer_keys():
                if key in fused_keys:
                    continue
                permute = 0
                if arch.gguf_permuted_qk and key in ("q", "k"):
                    permute = a.n_heads if key == "q" else a.n_kv_heads
                self._map(layer_name(i, key), f"blk.{i}.{GGUF_LAYER[key]}", permute_heads=permute)
            for fused, keys in arch.gguf_fused.items():
                self._map_fused(i, f"blk.{i}.{fused}", keys)
        self._map("embed", GGUF_GLOBAL["embed"])
        self._map("output_norm", GGUF_GLOBAL["output_norm"])
        if not a.tie_word_embeddings:
            self._map("output", GGUF_GLOBAL["output"])
        self.check_types()

    def _map_fused(self, i: int, name: str, keys: tuple[str, ...]) -> None:
        rows = {"q": self.args.q_rows, "k": self.args.kv_rows, "v": self.args.kv_rows,
                "gate": self.args.intermediate_size, "up": self.args.intermediate_size}
        if name not in self.gguf.tensors:  # phi3 GGUFs name an unfused up projection ffn_up too
            raise WeightsError(f"{self.path}: tensor {name!r} is missing")
        total = self.gguf.tensors[name].shape[0]
        if total != sum(rows[k] for k in keys):  # not fused after all: each key by its own name
            for k in keys:
                self._map(layer_name(i, k), f"blk.{i}.{GGUF_LAYER[k]}")
            return
        first = 0
        for k in keys:
            self._map(layer_name(i, k), name, first, rows[k])
            first += rows[k]

    def _small(self, name: str) -> np.ndarray:
        t = self.gguf.tensors[name]
        return dequantize(self.gguf.raw(name), t.qtype, t.shape[-1]).reshape(-1)

    def _info(self, name: str) -> tuple[tuple[int, ...], int]:
        t = self.gguf.tensors[name]
        return t.shape, t.qtype

    def _raw_rows(self, name: str, first_row: int, n_rows: int) -> np.ndarray:
        return self.gguf.raw(name, first_row, n_rows)

    def _release(self, view: np.ndarray) -> None:
        self.gguf.drop_pages(view)

    def byte_ranges(self, canonical: list[str] | set[str]) -> list[tuple[int, int, int]]:
        """``(file index, start, end)`` byte ranges of the checkpoint tensors behind
        ``canonical`` names, merged where adjacent (what a shard needs of a remote file)."""
        spans = sorted({(t.file, t.offset, t.end) for n in self.checkpoint_names(canonical) for t in [self.gguf.tensors[n]]})
        merged: list[list[int]] = []
        for f, s, e in spans:
            if merged and merged[-1][0] == f and s <= merged[-1][2]:
                merged[-1][2] = max(merged[-1][2], e)
            else:
                merged.append([f, s, e])
        return [tuple(m) for m in merged]  # type: ignore[misc]


_ST_DTYPES = {"F32": F32, "F16": F16, "BF16": BF16}
_ST_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")


def read_safetensors_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset its data starts at.

    Format: an 8-byte little-endian header length, the JSON header (tensor name ->
    ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the data), the data.

    Raises:
        WeightsError: not a safetensors file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path} is not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if n > 100 << 20:
            raise WeightsError(f"{path} is not a safetensors file (header of {n} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError:
        raise WeightsError(f"{path} is not a safetensors file (its header is not JSON)") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsWeights(ModelWeights):
    """A Hugging Face model directory: ``config.json`` and ``*.safetensors`` (one file, or
    several named by ``model.safetensors.index.json``). Files a shard does not need may be
    absent (download by shard): a missing one fails only when a tensor in it is read.

    Raises (constructor):
        FileNotFoundError: no ``config.json``, or no safetensors file and no index.
        UnsupportedModelError: a model type exo does not implement.
        WeightsError: a tensor the architecture needs is missing from every file.
    """

    format = "safetensors"

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{self.path} has no config.json")
        try:
            self.config = json.loads(config_path.read_text())
        except ValueError as e:
            raise WeightsError(f"{config_path} is not valid JSON: {e}") from None
        self.args = args_from_hf_config(self.config)
        self._files: dict[str, Path] = {}  # tensor -> file
        self._headers: dict[Path, tuple[dict[str, Any], int]] = {}
        self._maps: dict[Path, np.ndarray] = {}
        self._lock = threading.Lock()
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            self._files = {name: self.path / file for name, file in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.path} has no *.safetensors file")
            for f in files:
                for name in self._header(f)[0]:
                    self._files[name] = f
        prefix = next((p for p in _ST_PREFIXES if f"{p}layers.0.{_first_hf_key(self.args)}" in self._files), None)
        if prefix is None:
            raise WeightsError(f"{self.path}: no layer 0 tensors found (looked for "
                               f"{[p + 'layers.0.' + _first_hf_key(self.args) for p in _ST_PREFIXES]})")
        self.prefix = prefix
        arch = architecture(self.args.architecture)
        fused_keys = {k for keys in arch.hf_fused.values() for k in keys}
        for i in range(self.args.n_layers):
            for key in self.args.block.layer_keys():
                if key in fused_keys and f"{prefix}layers.{i}.{arch.hf_layer[key]}" not in self._files:
                    continue
                offset = arch.hf_norm_offset if key.endswith("norm") else 0.0
                self._map(layer_name(i, key), f"{prefix}layers.{i}.{arch.hf_layer[key]}", offset=offset)
            for fused, keys in arch.hf_fused.items():
                name = f"{prefix}layers.{i}.{fused}"
                if name in self._files:
                    first = 0
                    for k in keys:
                        n = self.args.q_rows if k == "q" else self.args.kv_rows if k in ("k", "v") else self.args.intermediate_size
                        self._map(layer_name(i, k), name, first, n)
                        first += n
        self._map("embed", f"{prefix}{HF_GLOBAL['embed']}")
        self._map("output_norm", f"{prefix}{HF_GLOBAL['output_norm']}", offset=arch.hf_norm_offset)
        if not self.args.tie_word_embeddings:
            head = HF_GLOBAL["output"]
            name = next((n for n in (head, f"{prefix}{head}", f"language_model.{head}") if n in self._files), head)
            self._map("output", name)

    def files_for(self, canonical: list[str] | set[str]) -> set[str]:
        """Names (relative to the directory) of the safetensors files holding ``canonical``."""
        return {self._files[n].name for n in self.checkpoint_names(canonical)}

    def _header(self, file: Path) -> tuple[dict[str, Any], int]:
        with self._lock:
            if file not in self._headers:
                if not file.is_file():
                    raise FileNotFoundError(f"{file} is missing (the shard's tensors are in it)")
                self._headers[file] = read_safetensors_header(file)
            return self._headers[file]

    def _entry(self, name: str) -> tuple[Path, dict[str, Any], int]:
        file = self._files[name]  # KeyError: absent
        header, data_start = self._header(file)
        if name not in header:
            raise WeightsError(f"{file} does not hold {name!r}, though the index says it does")
        return file, header[name], data_start

    def _info(self, name: str) -> tuple[tuple[int, ...], int]:
        if name not in self._files:
            raise KeyError(name)
        try:
            _, entry, _ = self._entry(name)
        except FileNotFoundError:
            return self._shape_from_config(name)
        dtype = entry["dtype"]
        if dtype not in _ST_DTYPES:
            raise WeightsError(f"{self.path}: tensor {name!r} is {dtype}; only F32, F16 and BF16 safetensors are supported")
        return tuple(int(d) for d in entry["shape"]), _ST_DTYPES[dtype]

    def _shape_from_config(self, name: str, canonical: str | None = None) -> tuple[tuple[int, ...], int]:
        """Shape and (assumed from the config's dtype, else BF16) type of a tensor whose file is
        not here (not downloaded): from the config, for byte counts only. ``canonical``: the
        canonical tensor it holds, when it is not mapped yet."""
        dtype = {"float32": F32, "float16": F16}.get(str(self.config.get("torch_dtype") or self.config.get("dtype")), BF16)
        a = self.args
        if canonical is None:
            canonical = next((c for c, src in self._sources.items() if src.name == name), None)
        if canonical is None:
            return (a.hidden_size,), dtype
        parsed = parse_layer_name(canonical)
        if parsed is None:
            return ((a.vocab_size, a.hidden_size) if canonical != "output_norm" else (a.hidden_size,)), dtype
        return a.layer_shapes()[parsed[1]], dtype

    def _raw_rows(self, name: str, first_row: int, n_rows: int) -> np.ndarray:
        file, entry, data_start = self._entry(name)
        shape = [int(d) for d in entry["shape"]]
        cols = shape[-1] if len(shape) > 1 else (shape[0] if shape else 1)
        rb = cols * {"F32": 4, "F16": 2, "BF16": 2}[entry["dtype"]]
        begin, end = entry["data_offsets"]
        with self._lock:
            if file not in self._maps:
                self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
            m = self._maps[file]
        start = data_start + begin + first_row * rb
        if data_start + end > m.shape[0]:
            raise WeightsError(f"{file} is truncated: {name!r} ends at byte {data_start + end}, the file has {m.shape[0]}")
        return m[start:start + n_rows * rb].reshape(n_rows, rb)

    def _map(self, canonical: str, name: str, first_row: int = 0, rows: int | None = None, permute_heads: int = 0,
             offset: float = 0.0, required: bool = True) -> None:
        if name not in self._files:
            if required:
                raise WeightsError(f"{self.path}: tensor {name!r} ({canonical}) is missing")
            return
        # a file not downloaded (yet): the shape the config implies for ``canonical``
        shape = self._info(name)[0] if self._files[name].is_file() else self._shape_from_config(name, canonical)[0]
        n = shape[0] if len(shape) > 1 else 1
        self._sources[canonical] = _Source(name, first_row, n - first_row if rows is None else rows, permute_heads, offset)


def _first_hf_key(args: ModelArgs) -> str:
    return architecture(args.architecture).hf_layer["attn_norm"]


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
