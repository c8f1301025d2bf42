"""Weight-only quantization of a ShardedLlama for fast CPU decode (opt-in: ``weights="int4"``).

Decode reads every weight once per token, so its speed is the bytes of weights over memory
bandwidth. The GGUF ships the transformer layers as Q4_1 (llama.cpp's 4-bit blocks of 32 with a
scale and a minimum); dequantized to float32 they are 4.5x larger than in the file.
``Int4Linear`` keeps them at 4 bits in torch's packed int4 format (groups of 32 along the input,
``_weight_int4pack_mm_for_cpu``), requantized with llama.cpp's own Q4_1 rule, so a Q4_1 tensor
lands on its own grid again (only the scales and offsets are rounded, to bfloat16). The output
head (Q8_0 in the GGUF) becomes ``Int8Linear``, 8 bits per weight with one scale per row.
Both kernels take bfloat16 activations: logits differ from the float32 model by ~1e-1, so this
is not the engine's default (see ``TorchInferenceEngine``).
"""

from __future__ import annotations

import torch
from torch import nn

#: Input features per int4 group (Q4_1's block size).
INT4_GROUP = 32
#: Rows quantized at a time (bounds the float32 temporaries).
_ROWS = 4096


class Int4Linear(nn.Module):
    """``y = x @ W.T`` with ``W`` (out, in) held as 4-bit integers in groups of ``INT4_GROUP``.

    ``W[o, k] = (q[o, k] - 8) * scale[o, g] + zero[o, g]`` for ``g = k // INT4_GROUP``, ``q`` in
    [0, 15], from ``scale = (max - min) / 15`` and ``q = round((w - min) / scale)`` per group
    (llama.cpp's ``quantize_row_q4_1``). Buffers: ``packed`` (torch's int4 packing),
    ``scales_zeros`` (in / INT4_GROUP, out, 2) bfloat16. Input (..., in) bfloat16 -> (..., out).

    Raises:
        ValueError: ``in`` is not a multiple of ``INT4_GROUP`` or ``out`` of 16 (torch's packing).
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        out_features, in_features = weight.shape
        if in_features % INT4_GROUP or out_features % 16:
            raise ValueError(f"int4 weights need in_features a multiple of {INT4_GROUP} and out_features of 16, "
                             f"got {in_features} and {out_features}")
        self.in_features, self.out_features = in_features, out_features
        q = torch.empty(out_features, in_features, dtype=torch.int32)
        scales_zeros = torch.empty(in_features // INT4_GROUP, out_features, 2, dtype=torch.bfloat16)
        for r in range(0, out_features, _ROWS):  # float32 temporaries of a block of rows only
            w = weight[r:r + _ROWS].detach().float().reshape(-1, in_features // INT4_GROUP, INT4_GROUP)
            lo, hi = w.amin(-1), w.amax(-1)  # (rows, groups)
            scale = (hi - lo) / 15
            qr = torch.where(scale[..., None] > 0, (w - lo[..., None]) / scale[..., None].clamp(min=1e-30), 0.0)
            q[r:r + _ROWS] = qr.round().clamp(0, 15).to(torch.int32).reshape(-1, in_features)
            scales_zeros[:, r:r + _ROWS] = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).to(torch.bfloat16)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_zeros", scales_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed,
                                                      INT4_GROUP, self.scales_zeros)
        return y.reshape(*shape[:-1], self.out_features)


class Int8Linear(nn.Module):
    """``y = x @ W.T`` with ``W`` (out, in) as int8 with one bfloat16 scale per row
    (``scale = max|w| / 127``). Input (..., in) bfloat16 -> (..., out)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        w8 = torch.empty(self.out_features, self.in_features, dtype=torch.int8)
        scales = torch.empty(self.out_features, dtype=torch.bfloat16)
        for r in range(0, self.out_features, _ROWS):  # float32 temporaries of a block of rows only
            w = weight[r:r + _ROWS].detach().float()
            scale = (w.abs().amax(-1) / 127).clamp(min=1e-30)
            w8[r:r + _ROWS] = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            scales[r:r + _ROWS] = scale.to(torch.bfloat16)
        self.register_buffer("weight_int8", w8)
        self.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.weight_int8, self.scales)
        return y.reshape(*shape[:-1], self.out_features)


def quantize_weights(model: nn.Module) -> None:
    """Replace, in place, the projections of every transformer block by ``Int4Linear`` and the
    output head by ``Int8Linear`` (CPU only; the embedding stays as it is)."""
    for layer in getattr(model, "layers", []):
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int4Linear(child.weight))
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        model.lm_head = Int8Linear(head.weight)
