"""Layers whose weights stay in the GGUF's own quantized blocks, computed in float32 (CPU).

Decode reads every weight once per token, so on a CPU its speed is the bytes of weights over
memory bandwidth. A GGUF file keeps each matrix in one GGML type (a Q4_K_M file mixes Q4_K,
Q5_0, Q6_K and Q8_0, even per layer); ``GGUFLinear`` and ``GGUFEmbedding`` keep those exact
weights, repacked 16 rows at a time for SIMD (``kernels/gguf_blocks.cpp``) at about the file's
bytes per weight (``FORMATS``), and multiply them by float32 activations with float32
accumulation. Unquantized matrices (F32, F16, BF16: a safetensors checkpoint, or the tensors a
GGUF keeps unquantized) take the same path. Unlike llama.cpp, which rounds activations to 8
bits, the result equals a float32 matmul on the dequantized weights up to summation order
(test/inference/test_gguf_weights.py).

Decode steps and short prompts use the block kernel; prefill chunks of more than
``KERNEL_MAX_ROWS`` rows dequantize the matrix to float32 for the duration of the call and use
torch's matmul, which is faster there.

The model code asks ``kernel_supports(qtype, rows, cols)`` (or ``native_types()``) whether a
matrix can be held natively, and otherwise holds it dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


#: GGML type ids (``gguf.GGMLQuantizationType``) the kernels take.
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30


@dataclass(frozen=True)
class BlockFormat:
    """How the kernels hold one GGML type (the same facts as ``gguf_blocks.cpp``'s format
    structs; a test checks them against ``torch.ops.exo_gguf.block_format``).

    Attributes:
        name: GGML name ("Q4_K").
        block_weights: weights per block of a row; a matrix's columns must be a multiple.
        file_block_bytes: bytes of one such block in the file.
        tile_bytes: bytes of one tile: a block of each of 16 rows, as the kernels hold it.
        amx: whether products of 8 or more rows may take the AMX tile path (the weights, or
            their integers, are exact in bfloat16; F32 and F16 are not).
    """

    name: str
    block_weights: int
    file_block_bytes: int
    tile_bytes: int
    amx: bool

    @property
    def file_bytes_per_weight(self) -> float:
        return self.file_block_bytes / self.block_weights

    @property
    def bytes_per_weight(self) -> float:
        """Bytes per weight as the kernels hold the matrix."""
        return self.tile_bytes / (TILE_ROWS * self.block_weights)


#: Rows per tile: a matrix's rows must be a multiple.
TILE_ROWS = 16
#: Every type the kernels take, by GGML type id: the one table of per-type facts.
FORMATS: dict[int, BlockFormat] = {
    F32: BlockFormat("F32", 32, 128, 2048, False),
    F16: BlockFormat("F16", 32, 64, 1024, False),
    BF16: BlockFormat("BF16", 32, 64, 1024, True),
    Q4_0: BlockFormat("Q4_0", 32, 18, 288, True),
    Q4_1: BlockFormat("Q4_1", 32, 20, 320, True),
    Q5_0: BlockFormat("Q5_0", 32, 22, 352, True),
    Q5_1: BlockFormat("Q5_1", 32, 24, 384, True),
    Q8_0: BlockFormat("Q8_0", 32, 34, 544, True),
    Q4_K: BlockFormat("Q4_K", 256, 144, 2368, True),  # + 16 bytes of unpacked 6-bit scales per 256: 2.8 % over the file
    Q5_K: BlockFormat("Q5_K", 256, 176, 2880, True),  # likewise, 2.3 % over
    Q6_K: BlockFormat("Q6_K", 256, 210, 3360, True),
}
#: Views of FORMATS by field.
BLOCK_WEIGHTS = {q: f.block_weights for q, f in FORMATS.items()}
FILE_BLOCK_BYTES = {q: f.file_block_bytes for q, f in FORMATS.items()}
TILE_BYTES = {q: f.tile_bytes for q, f in FORMATS.items()}
#: Largest number of activation rows multiplied by the block kernel; more rows (prefill) go
#: through a float32 copy of the weights and torch's matmul (faster from about 100 rows on 2
#: cores: ``python -m bench.gguf_kernels``).
KERNEL_MAX_ROWS = 96
#: numpy / torch element types whose arrays ``load_rows`` takes as the file's bytes of a type.
_ELEMENT_TYPES = {F32: (np.float32, torch.float32), F16: (np.float16, torch.float16), BF16: (None, torch.bfloat16)}


#: Types held as a wider one with exactly the same weights, where the CPU's vector unit rather
#: than memory bounds a decode step (no AVX-512): Q4_0's ``d * (q - 8)`` and Q5_0's
#: ``d * (q - 16)`` are Q8_0's ``d * q`` with the same ``d``. On a 2-core AVX2 machine a Q5_0
#: product takes twice the time of the Q8_0 one (``python -m bench.gguf_kernels``), for 1.5x
#: the bytes; with AVX-512 the narrow type is the faster one (memory-bound).
WIDENED = {Q4_0: Q8_0, Q5_0: Q8_0}


def _has_avx512() -> bool:
    from exo.inference.torch.kernels import cpu_flags

    return "avx512f" in cpu_flags().split()


def held_type(qtype: int) -> int:
    """The type the kernels hold a matrix stored in ``qtype`` as: itself, or its ``WIDENED``
    type on a CPU without AVX-512."""
    if qtype in WIDENED and not _has_avx512():
        return WIDENED[qtype]
    return qtype


def widen_rows(qtype: int, to: int, blocks: np.ndarray) -> np.ndarray:
    """Rows of file blocks of ``qtype`` (uint8 (n, bytes per row)) rewritten as ``to`` =
    ``WIDENED[qtype]`` blocks of exactly the same weights (ggml-common.h's layouts: Q4_0 ``d``,
    16 bytes of nibbles; Q5_0 ``d``, 4 bytes of fifth bits, 16 bytes of nibbles; Q8_0 ``d``, 32
    int8).

    Raises:
        ValueError: not a pair of ``WIDENED``.
    """
    if WIDENED.get(qtype) != to:
        raise ValueError(f"{FORMATS[qtype].name} rows cannot be held as {FORMATS[to].name}")
    n = blocks.shape[0]
    b = np.ascontiguousarray(blocks).reshape(n, -1, FORMATS[qtype].file_block_bytes)
    qs = b[..., -16:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int16)  # weights 0-15 low nibbles, 16-31 high
    if qtype == Q5_0:
        qh = np.ascontiguousarray(b[..., 2:6]).view("<u4")[..., 0]
        q |= (((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int16)
        q -= 16
    else:
        q -= 8
    return np.concatenate([b[..., 0:2], q.astype(np.int8).view(np.uint8)], axis=-1).reshape(n, -1)


def native_types() -> frozenset[int]:
    """The GGML types the kernels hold natively (``FORMATS``' keys)."""
    return frozenset(FORMATS)


def shape_error(qtype: int, rows: int, cols: int) -> str | None:
    """Why a (rows, cols) matrix of GGML type ``qtype`` cannot be held natively, or None."""
    f = FORMATS.get(qtype)
    if f is None:
        names = ", ".join(f"{v.name} = {k}" for k, v in sorted(FORMATS.items()))
        return f"GGML type {qtype} is not supported by the block kernels ({names})"
    if rows <= 0 or cols <= 0 or rows % TILE_ROWS or cols % f.block_weights:
        return (f"{f.name} block weights need rows a multiple of {TILE_ROWS} and columns a multiple of "
                f"{f.block_weights}, got ({rows}, {cols})")
    return None


def kernel_supports(qtype: int, rows: int, cols: int) -> bool:
    """Whether a (rows, cols) matrix (out_features, in_features) of GGML type ``qtype`` can be
    held in the kernels' tiles (a supported type, rows a multiple of 16, columns of the type's
    block: 256 for K-quants, 32 otherwise)."""
    return shape_error(qtype, rows, cols) is None


def packed_bytes(qtype: int, rows: int, cols: int) -> int:
    """Bytes of a (rows, cols) matrix of type ``qtype`` as the kernels hold it.

    Raises:
        ValueError: as ``_check_shape``.
    """
    _check_shape(qtype, rows, cols)
    return rows // TILE_ROWS * cols // FORMATS[qtype].block_weights * FORMATS[qtype].tile_bytes


def _check_shape(qtype: int, rows: int, cols: int) -> None:
    """Raises ValueError naming the type and shape unless ``kernel_supports(qtype, rows, cols)``."""
    error = shape_error(qtype, rows, cols)
    if error:
        raise ValueError(error)


def _file_bytes(qtype: int, blocks: np.ndarray | torch.Tensor) -> np.ndarray:
    """``blocks`` as uint8 rows of file bytes: uint8 already, or (F32 / F16 / BF16) an array of
    that element type, whose bytes are the file's."""
    if isinstance(blocks, torch.Tensor):
        if blocks.dtype != torch.uint8:
            if qtype not in _ELEMENT_TYPES or blocks.dtype != _ELEMENT_TYPES[qtype][1]:
                raise ValueError(f"cannot load {blocks.dtype} rows into a {FORMATS[qtype].name} matrix")
            blocks = blocks.contiguous().view(torch.uint8)
        return blocks.contiguous().numpy()
    blocks = np.asarray(blocks)
    if blocks.dtype != np.uint8:
        if qtype not in _ELEMENT_TYPES or blocks.dtype != _ELEMENT_TYPES[qtype][0]:
            raise ValueError(f"cannot load {blocks.dtype} rows into a {FORMATS[qtype].name} matrix")
        blocks = np.ascontiguousarray(blocks).view(np.uint8)
    return np.ascontiguousarray(blocks)


class _GGUFBlocks(nn.Module):
    """A (rows, cols) matrix held as a buffer ``tiles`` (rows / 16, cols / block * tile bytes) uint8."""

    def __init__(self, rows: int, cols: int, qtype: int):
        super().__init__()
        _check_shape(qtype, rows, cols)
        self.rows, self.cols, self.qtype = rows, cols, qtype
        f = FORMATS[qtype]
        self.register_buffer("tiles", torch.empty(rows // TILE_ROWS, cols // f.block_weights * f.tile_bytes, dtype=torch.uint8))

    def load_rows(self, row: int, blocks: np.ndarray | torch.Tensor) -> None:
        """Copy rows ``[row, row + n)`` from the file's blocks: ``blocks`` uint8 (n, cols / block
        * file block bytes), or for F32 / F16 / BF16 an (n, cols) array of that element type;
        ``row`` and ``n`` multiples of 16.

        Raises:
            ValueError: the rows do not fit this matrix or are not whole tiles.
        """
        raw = _file_bytes(self.qtype, blocks)
        n = raw.shape[0]
        f = FORMATS[self.qtype]
        if (raw.ndim != 2 or row % TILE_ROWS or n % TILE_ROWS or row + n > self.rows
                or raw.shape[1] != self.cols // f.block_weights * f.file_block_bytes):
            raise ValueError(f"cannot load rows {row}..{row + n} of {raw.shape[1:]} bytes into a ({self.rows}, {self.cols}) "
                             f"{f.name} matrix")
        packed = torch.ops.exo_gguf.pack(torch.from_numpy(raw), self.qtype)
        self.tiles[row // TILE_ROWS:(row + n) // TILE_ROWS].copy_(packed)

    def dequantize(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (int64, any shape S) of the matrix as float32, shape (*S, cols)."""
        return torch.ops.exo_gguf.dequantize_rows(self.tiles, self.qtype, self.cols, rows)

    def extra_repr(self) -> str:
        return f"rows={self.rows}, cols={self.cols}, qtype={FORMATS[self.qtype].name}"


class GGUFLinear(_GGUFBlocks):
    """``y = x @ W.T`` without bias, ``W`` (out_features, in_features) in GGUF blocks.

    Input (..., in_features) of any float dtype, computed in float32; output (..., out_features)
    float32. ``out_features`` must be a multiple of 16 and ``in_features`` of the type's block
    (``kernel_supports``). ``forward(x, allow_amx=False)`` keeps a product of up to
    ``KERNEL_MAX_ROWS`` rows off the AMX path: each row is then computed exactly as it is alone
    (batch invariance; more rows take torch's matmul, whose blocking depends on the rows).

    Raises:
        ValueError: an unsupported ``qtype`` or shape.
    """

    def __init__(self, in_features: int, out_features: int, qtype: int):
        super().__init__(out_features, in_features, qtype)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor, allow_amx: bool = True) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if x2.shape[0] <= KERNEL_MAX_ROWS:
            y = torch.ops.exo_gguf.linear(x2, self.tiles, self.qtype, allow_amx)
        else:
            y = torch.mm(x2, torch.ops.exo_gguf.dequantize_t(self.tiles, self.qtype, self.in_features))
        return y.reshape(*shape[:-1], self.out_features)


class GGUFEmbedding(_GGUFBlocks):
    """Token embedding (num_embeddings, embedding_dim) in GGUF blocks: ids (B, T) int64 ->
    (B, T, embedding_dim) float32, only the rows asked for dequantized.

    Raises:
        ValueError: an unsupported ``qtype`` or shape; RuntimeError: an id out of range.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: int):
        super().__init__(num_embeddings, embedding_dim, qtype)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dequantize(ids.long())
