"""Reading GGUF files: the header (metadata and tensor table), and tensor data by byte range.

GGUF spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md. The header is parsed here
rather than by ``gguf.GGUFReader``, which builds several numpy views per metadata element and
takes ~7 s for SmolLM2's 49k-token vocabulary and ~28 s for Gemma 3's 262k; this parser reads
the same header in well under a second, and works on a file's first bytes alone, which is what
the downloader fetches (by HTTP ``Range``) to learn where a shard's tensors lie. Dequantization
stays with the ``gguf`` package (``gguf.quants``).

A model may be one file or split into ``NAME-00001-of-0000N.gguf`` files (llama.cpp's
``gguf-split``): the first holds the metadata, every split its own tensors.
"""

from __future__ import annotations

import functools
import logging
import mmap
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MAGIC = b"GGUF"
#: Bytes of a file read first for its header (Gemma 3's 262k-token vocabulary: ~5 MB).
HEADER_READ = 8 << 20
DEFAULT_ALIGNMENT = 32

#: GGML tensor types by id: (name, weights per block, bytes per block), from ggml.h /
#: ``gguf.constants.GGML_QUANT_SIZES``.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
F32, F16, BF16 = 0, 1, 30
#: Types whose weights the ``gguf`` package dequantizes (every weight type models on the hub use).
DEQUANTIZABLE = frozenset({0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23, 28, 29, 30, 34, 35, 39})


def type_name(qtype: int) -> str:
    """``12`` -> ``"Q4_K"`` (``"type 99"`` for an unknown id)."""
    return GGML_TYPES[qtype][0] if qtype in GGML_TYPES else f"type {qtype}"


def row_bytes(qtype: int, cols: int) -> int:
    """Bytes of one row of ``cols`` weights in GGML type ``qtype``.

    Raises:
        GGUFError: an unknown type, or ``cols`` not a whole number of its blocks.
    """
    if qtype not in GGML_TYPES:
        raise GGUFError(f"unknown GGML tensor type {qtype}")
    _, block, size = GGML_TYPES[qtype]
    if cols % block:
        raise GGUFError(f"{cols} columns are not a whole number of {type_name(qtype)} blocks of {block}")
    return cols // block * size


class GGUFError(ValueError):
    """The file is not a readable GGUF model (the message names the file and what is wrong)."""


class GGUFTruncated(GGUFError):
    """The header continues past the bytes given; ``needed`` is a lower bound on the bytes it needs."""

    def __init__(self, message: str, needed: int):
        super().__init__(message)
        self.needed = needed


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF model.

    Attributes:
        name: GGUF name (``"blk.3.attn_q.weight"``).
        shape: row-major, slowest dimension first (GGUF lists them fastest first): a matrix is
            (rows, columns) = (out_features, in_features).
        qtype: GGML type id (``GGML_TYPES``).
        offset: absolute byte offset of its data in its file.
        nbytes: bytes of its data.
        file: index of the split file holding it (0 for a single file).
    """

    name: str
    shape: tuple[int, ...]
    qtype: int
    offset: int
    nbytes: int
    file: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass
class GGUFHeader:
    """What a GGUF file's header says: ``metadata`` (key -> value; strings decoded, arrays as
    lists), ``tensors`` (in file order, offsets absolute), ``data_offset`` (where tensor data
    starts, bytes) and ``header_bytes`` (bytes parsed before the alignment padding)."""

    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    data_offset: int
    header_bytes: int


_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads little-endian values from ``buf`` at ``pos``; raises GGUFTruncated past its end."""

    def __init__(self, buf: memoryview, source: str):
        self.buf, self.pos, self.source = buf, 0, source

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise GGUFTruncated(f"{self.source}: the GGUF header continues past byte {len(self.buf)}",
                                needed=max(self.pos + n, 2 * len(self.buf)))

    def scalar(self, fmt: str, size: int):
        self.need(size)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self) -> int:
        return self.scalar("<I", 4)

    def u64(self) -> int:
        return self.scalar("<Q", 8)

    def string(self) -> str:
        n = self.u64()
        self.need(n)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.u32(), self.u64()
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype not in _ARRAY_DTYPES:
                raise GGUFError(f"{self.source}: unknown metadata array element type {etype}")
            dtype = np.dtype(_ARRAY_DTYPES[etype])
            self.need(count * dtype.itemsize)
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return arr.astype(bool).tolist() if etype == 7 else arr.tolist()
        if vtype not in _SCALARS:
            raise GGUFError(f"{self.source}: unknown metadata value type {vtype}")
        return self.scalar(*_SCALARS[vtype])


def parse_header(buf: bytes | bytearray | memoryview | mmap.mmap, source: str = "GGUF", file: int = 0) -> GGUFHeader:
    """Parse a GGUF header from ``buf``, a whole file or only its first bytes.

    Args:
        buf: the file's bytes from offset 0.
        source: how to name the file in errors.
        file: split index stored in each ``GGUFTensor.file``.

    Raises:
        GGUFTruncated: ``buf`` ends inside the header (``needed`` says how far to read next).
        GGUFError: not a GGUF file, an unsupported version, or a malformed header.
    """
    c = _Cursor(memoryview(buf).cast("B"), source)
    c.need(4)
    if bytes(c.buf[:4]) != MAGIC:
        raise GGUFError(f"{source} is not a GGUF file (it does not start with 'GGUF')")
    c.pos = 4
    version = c.u32()
    if version not in (2, 3):
        raise GGUFError(f"{source}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = c.u64(), c.u64()
    if n_tensors > 10_000_000 or n_kv > 1_000_000:
        raise GGUFError(f"{source}: implausible header ({n_tensors} tensors, {n_kv} metadata keys)")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string()
        metadata[key] = c.value(c.u32())
    raw: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.u32()
        if n_dims > 8:
            raise GGUFError(f"{source}: tensor {name!r} has {n_dims} dimensions")
        dims = tuple(c.u64() for _ in range(n_dims))
        qtype, offset = c.u32(), c.u64()
        raw.append((name, tuple(reversed(dims)), qtype, offset))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
    header_bytes = c.pos
    data_offset = -(-c.pos // alignment) * alignment
    tensors = []
    for name, shape, qtype, offset in raw:
        if qtype not in GGML_TYPES:
            raise GGUFError(f"{source}: tensor {name!r} has unknown GGML type {qtype}")
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        _, block, size = GGML_TYPES[qtype]
        if n % block:
            raise GGUFError(f"{source}: tensor {name!r} of shape {shape} is not a whole number of {type_name(qtype)} blocks")
        tensors.append(GGUFTensor(name, shape, qtype, data_offset + offset, n // block * size, file))
    return GGUFHeader(version, metadata, tensors, data_offset, header_bytes)


SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_paths(path: str | Path) -> list[Path]:
    """The files of the model at ``path``: ``[path]``, or for a split model
    (``NAME-0000K-of-0000N.gguf``, any split named) all N splits in order.

    Raises:
        FileNotFoundError: ``path`` or a split of it is missing (named).
    """
    path = Path(path)
    m = SPLIT_NAME.match(path.name)
    if m is None:
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return [path]
    count = int(m["count"])
    paths = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"split GGUF model {path.name} is missing {len(missing)} of {count} files: {', '.join(missing)}")
    return paths


@dataclass
class GGUFModel:
    """An opened GGUF model (one file or its splits), its data memory-mapped.

    Attributes:
        paths: its files, in split order.
        metadata: the first file's metadata.
        tensors: every tensor by GGUF name.
    """

    paths: list[Path]
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    _maps: list[np.ndarray | None] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _map(self, file: int) -> np.ndarray:
        with self._lock:
            if not self._maps:
                self._maps = [None] * len(self.paths)
            if self._maps[file] is None:
                self._maps[file] = np.memmap(self.paths[file], dtype=np.uint8, mode="r")
            return self._maps[file]

    def raw(self, name: str, first_row: int = 0, n_rows: int | None = None) -> np.ndarray:
        """Rows ``[first_row, first_row + n_rows)`` of tensor ``name`` as the file stores them:
        a uint8 view (rows, bytes per row) of the memory map (a 1-D tensor is one row).

        Raises:
            KeyError: no such tensor. GGUFError: the file ends before the tensor's data.
        """
        t = self.tensors[name]
        cols = t.shape[-1] if t.shape else 1
        rows = t.nbytes // row_bytes(t.qtype, cols)
        n_rows = rows - first_row if n_rows is None else n_rows
        rb = row_bytes(t.qtype, cols)
        m = self._map(t.file)
        start, end = t.offset + first_row * rb, t.offset + (first_row + n_rows) * rb
        if end > m.shape[0]:
            raise GGUFError(f"{self.paths[t.file]} is truncated: tensor {name!r} ends at byte {t.end}, "
                            f"but the file has {m.shape[0]} bytes")
        return m[start:end].reshape(n_rows, rb)

    def drop_pages(self, view: np.ndarray) -> None:
        """Drop the file pages under ``view`` (from ``raw``) from this process's resident memory
        once read; they stay in the OS page cache. Best effort."""
        base = getattr(view, "base", None)
        while base is not None and not isinstance(base, mmap.mmap):
            base = getattr(base, "base", None)
        if base is None or not view.nbytes:
            return
        try:
            start = view.__array_interface__["data"][0] - np.frombuffer(base, dtype=np.uint8, count=1).__array_interface__["data"][0]
            page = mmap.PAGESIZE
            begin = start // page * page
            base.madvise(mmap.MADV_DONTNEED, begin, start + view.nbytes - begin)
        except (ValueError, OSError, AttributeError, BufferError):
            pass


def read_model(path: str | Path) -> GGUFModel:
    """Open the GGUF model at ``path`` (a single file, or any split of a split model) and parse
    its header(s); the data is mapped lazily. Uncached: see ``open_gguf``.

    Raises:
        FileNotFoundError: the file or a split is missing.
        GGUFError: not a GGUF file, a malformed or truncated header, two splits holding one tensor.
    """
    paths = split_paths(path)
    metadata: dict[str, Any] = {}
    tensors: dict[str, GGUFTensor] = {}
    for i, p in enumerate(paths):
        size = p.stat().st_size
        if size == 0:
            raise GGUFError(f"{p} is empty, not a GGUF file")
        want = min(size, HEADER_READ)
        with open(p, "rb") as f:
            while True:  # the header's size is not known before parsing it: read more until it fits
                f.seek(0)
                try:
                    header = parse_header(f.read(want), str(p), file=i)
                    break
                except GGUFTruncated as e:
                    if want >= size:
                        raise GGUFError(f"{p} is truncated: {e}") from None
                    want = min(size, max(e.needed, 2 * want))
        if i == 0:
            metadata = header.metadata
        last = max(header.tensors, key=lambda t: t.end, default=None)
        if last is not None and last.end > size:
            raise GGUFError(f"{p} is truncated: tensor {last.name!r} ends at byte {last.end}, but the file has {size} bytes")
        for t in header.tensors:
            if t.name in tensors:
                raise GGUFError(f"tensor {t.name!r} appears twice in {[str(x.name) for x in paths]}")
            tensors[t.name] = t
    count = int(metadata.get("split.count", 1) or 1)
    if count != len(paths):
        raise GGUFError(f"{paths[0]} says it is split into {count} files, found {len(paths)}")
    return GGUFModel(paths, metadata, tensors)


_open_lock = threading.Lock()


@functools.lru_cache(maxsize=8)
def _open_cached(path: str, stamp: tuple) -> GGUFModel:
    return read_model(path)


def open_gguf(path: str | Path) -> GGUFModel:
    """The process-wide ``GGUFModel`` of ``path``, parsed once (again when the file changes).

    Raises:
        as ``read_model``.
    """
    path = Path(path).resolve()
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"GGUF file not found: {path}") from None
    with _open_lock:
        return _open_cached(str(path), (st.st_size, st.st_mtime_ns))


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every metadata key of the model at ``path`` with its value (strings decoded, arrays as lists)."""
    return open_gguf(path).metadata


def dequantize(data: np.ndarray, qtype: int, cols: int) -> np.ndarray:
    """Rows of file blocks ``data`` (uint8 (rows, bytes per row)) as float32 (rows, cols).

    Raises:
        GGUFError: a type the ``gguf`` package cannot dequantize (named).
    """
    if qtype == F32:
        return np.frombuffer(np.ascontiguousarray(data), dtype="<f4").reshape(data.shape[0], cols).copy()
    if qtype not in DEQUANTIZABLE:
        raise GGUFError(f"tensors of GGML type {type_name(qtype)} cannot be read")
    from gguf.quants import dequantize as gguf_dequantize

    out = gguf_dequantize(np.ascontiguousarray(data), qtype)
    return np.asarray(out, dtype=np.float32).reshape(data.shape[0], cols)
