"""Layers whose weights stay in the GGUF's own quantized blocks, computed in float32 (CPU).

Decode reads every weight once per token, so on a CPU its speed is the bytes of weights over
memory bandwidth. SmolLM2's GGUF ships the transformer layers as Q4_1 and the embedding (tied
to the output head) as Q8_0: 0.625 and 1.0625 bytes per weight, against 4 once dequantized to
float32. ``GGUFLinear`` and ``GGUFEmbedding`` keep those exact weights, repacked 16 rows at a
time for SIMD (``kernels/gguf_blocks.cpp``), and multiply them by float32 activations with
float32 accumulation. Unlike llama.cpp, which rounds activations to 8 bits, the result equals a
float32 matmul on the dequantized weights up to summation order, so the logits stay within the
1e-3 check against the float32 reference (test/inference/test_gguf_weights.py).

Decode steps and short prompts use the block kernel; prefill chunks of more than
``KERNEL_MAX_ROWS`` rows dequantize the matrix to float32 for the duration of the call and use
torch's matmul, which is faster there.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

#: GGML types the kernels take (``gguf.GGMLQuantizationType``).
Q4_1, Q8_0 = 3, 8
#: Weights per block, rows per tile, and bytes per tile (16 blocks) of each type.
BLOCK_WEIGHTS, TILE_ROWS = 32, 16
FILE_BLOCK_BYTES = {Q4_1: 20, Q8_0: 34}
TILE_BYTES = {Q4_1: 320, Q8_0: 544}
#: Largest number of activation rows multiplied by the block kernel; more rows (prefill) go
#: through a float32 copy of the weights and torch's matmul (faster from about 100 rows on 2
#: cores: ``python -m bench.gguf_kernels``).
KERNEL_MAX_ROWS = 96


def kernel_supports(qtype: int, rows: int, cols: int) -> bool:
    """Whether the kernels can hold a (rows, cols) matrix of GGML type ``qtype``."""
    return qtype in TILE_BYTES and rows % TILE_ROWS == 0 and cols % BLOCK_WEIGHTS == 0


def _check_shape(qtype: int, out_features: int, in_features: int) -> None:
    if qtype not in TILE_BYTES:
        raise ValueError(f"GGML type {qtype} is not supported (Q4_1 = {Q4_1}, Q8_0 = {Q8_0})")
    if out_features % TILE_ROWS or in_features % BLOCK_WEIGHTS:
        raise ValueError(f"GGUF block weights need rows a multiple of {TILE_ROWS} and columns of {BLOCK_WEIGHTS}, "
                         f"got ({out_features}, {in_features})")


class _GGUFBlocks(nn.Module):
    """A (rows, cols) matrix held as a buffer ``tiles`` (rows / 16, cols / 32 * tile bytes) uint8."""

    def __init__(self, rows: int, cols: int, qtype: int):
        super().__init__()
        _check_shape(qtype, rows, cols)
        self.rows, self.cols, self.qtype = rows, cols, qtype
        self.register_buffer("tiles", torch.empty(rows // TILE_ROWS, cols // BLOCK_WEIGHTS * TILE_BYTES[qtype], dtype=torch.uint8))

    def load_rows(self, row: int, blocks: np.ndarray) -> None:
        """Copy rows ``[row, row + len(blocks))`` from the file's blocks: ``blocks`` uint8
        (n, cols / 32 * file block bytes), ``row`` and ``n`` multiples of 16.

        Raises:
            ValueError: the rows do not fit this matrix or are not whole tiles.
        """
        n = blocks.shape[0]
        if row % TILE_ROWS or n % TILE_ROWS or row + n > self.rows or blocks.shape[1] != self.cols // BLOCK_WEIGHTS * FILE_BLOCK_BYTES[self.qtype]:
            raise ValueError(f"cannot load rows {row}..{row + n} of {blocks.shape[1]} bytes into a ({self.rows}, {self.cols}) "
                             f"GGML type {self.qtype} matrix")
        packed = torch.ops.exo_gguf.pack(torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.uint8)), self.qtype)
        self.tiles[row // TILE_ROWS:(row + n) // TILE_ROWS].copy_(packed)

    def dequantize(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (int64, any shape S) of the matrix as float32, shape (*S, cols)."""
        return torch.ops.exo_gguf.dequantize_rows(self.tiles, self.qtype, self.cols, rows)

    def extra_repr(self) -> str:
        return f"rows={self.rows}, cols={self.cols}, qtype={self.qtype}"


class GGUFLinear(_GGUFBlocks):
    """``y = x @ W.T`` without bias, ``W`` (out_features, in_features) in GGUF blocks.

    Input (..., in_features) of any float dtype, computed in float32; output (..., out_features)
    float32. ``out_features`` must be a multiple of 16 and ``in_features`` of 32.

    Raises:
        ValueError: an unsupported ``qtype`` or shape.
    """

    def __init__(self, in_features: int, out_features: int, qtype: int):
        super().__init__(out_features, in_features, qtype)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if x2.shape[0] <= KERNEL_MAX_ROWS:
            y = torch.ops.exo_gguf.linear(x2, self.tiles, self.qtype)
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
