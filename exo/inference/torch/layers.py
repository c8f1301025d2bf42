"""The building blocks of ``ShardedTransformer`` (``exo.inference.torch.model``): the per-layer
KV cache, RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467), rotary position embeddings (Su et
al. 2021, RoFormer, arXiv:2104.09864) in the HF "rotate half" layout, grouped-query attention
(Ainslie et al. 2023, arXiv:2305.13245), causal or sliding-window (Beltagy et al. 2020,
Longformer, arXiv:2004.05150), the gated feed-forward (SwiGLU or GeGLU, Shazeer 2020,
arXiv:2002.05202) and the transformer block with the switches of ``BlockVariant``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from exo.inference.torch.gguf_weights import GGUFLinear
from exo.models.architectures import ModelArgs, Rope

#: KV cache capacity is allocated in multiples of this many tokens.
KV_BLOCK = 256
#: ``decode_layers``' activation codes.
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}


class KVCache:
    """Keys and values of one request for one layer, in preallocated buffers.

    Buffers: (B, n_kv_heads, capacity, head_dim); ``offset`` tokens are filled. Capacity is a
    multiple of ``KV_BLOCK`` tokens and at least doubles when exceeded, so appending a decode
    step never allocates (amortised O(1) per token); ``reserve`` sizes it ahead of a prefill.
    Sliding-window layers keep every key too; attention reads only the window.
    """

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, capacity: int = KV_BLOCK):
        capacity = _round_up(max(capacity, 1), KV_BLOCK)
        self.k = torch.empty(batch, n_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.offset = 0

    @property
    def capacity(self) -> int:
        """Tokens the buffers hold before they must grow."""
        return self.k.shape[2]

    def reserve(self, n_tokens: int) -> None:
        """Make room for ``n_tokens`` tokens in total, keeping the ``offset`` tokens held."""
        if n_tokens <= self.capacity:
            return
        cap = _round_up(max(n_tokens, 2 * self.capacity), KV_BLOCK)
        k = self.k.new_empty(*self.k.shape[:2], cap, self.k.shape[3])
        v = torch.empty_like(k)
        k[:, :, :self.offset] = self.k[:, :, :self.offset]
        v[:, :, :self.offset] = self.v[:, :, :self.offset]
        self.k, self.v = k, v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``, ``v`` (B, n_kv_heads, T, head_dim); return all keys and values so far
        (B, n_kv_heads, offset + T, head_dim), as views of the buffers."""
        end = self.offset + k.shape[2]
        if end > self.capacity:
            self.reserve(end)
        self.k[:, :, self.offset:end] = k
        self.v[:, :, self.offset:end] = v
        self.offset = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class RMSNorm(nn.Module):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight over the last dimension, computed in float32.
    ``weight`` is the factor applied (Gemma's 1 + w already added by the weight reader)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding:
    """cos/sin tables of one ``Rope`` over its first ``rope_dim`` dimensions, grown on demand.

    The sin table is stored with the first half of each row negated, so that
    ``x * cos + swap_halves(x) * sin`` equals HF's ``x * cos + rotate_half(x) * sin`` exactly
    (negating a factor commutes with rounding); LongRoPE's ``attention_factor`` is folded into
    both. A LongRoPE with distinct long factors uses them for a step whose last position is past
    ``original_max_position_embeddings`` (transformers' rule). Plain tensors, not module
    buffers: a model built on the meta device never holds uninitialised tables.
    """

    def __init__(self, rope: Rope, rope_dim: int):
        self.rope, self.rope_dim = rope, rope_dim
        self._inv = {False: rope.inv_freq(rope_dim), True: rope.inv_freq(rope_dim, long=True)}
        self._tables: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}

    def _long(self, end: int) -> bool:
        return self.rope.switches_to_long and end > self.rope.original_max_position_embeddings

    def _table(self, long: bool, end: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._tables.get(long)
        if t is None or t[0].shape[0] < end or t[0].dtype != dtype or t[0].device != device:
            n = max(end, 2 * (t[0].shape[0] if t is not None else 256))
            freqs = np.outer(np.arange(n, dtype=np.float64), self._inv[long])
            emb = np.concatenate([freqs, freqs], axis=-1)
            half = emb.shape[-1] // 2
            sin = np.sin(emb)
            sin[:, :half] = -sin[:, :half]
            a = self.rope.attention_factor
            t = self._tables[long] = (torch.from_numpy(np.cos(emb) * a).to(device, dtype), torch.from_numpy(sin * a).to(device, dtype))
        return t

    def __call__(self, position: int, length: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin of shape (length, 1, rope_dim) for positions [position, position + length)."""
        cos, sin = self._table(self._long(position + length), position + length, dtype, device)
        return cos[position:position + length, None], sin[position:position + length, None]

    def at(self, positions: list[int], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin of shape (B, 1, 1, rope_dim) for one position per row of a batch."""
        rows = [self(p, 1, dtype, device) for p in positions] if self.rope.switches_to_long else None
        if rows is not None:
            return torch.cat([c for c, _ in rows])[:, None], torch.cat([s for _, s in rows])[:, None]
        cos, sin = self._table(False, max(positions) + 1, dtype, device)
        if len(positions) == 1:
            p = positions[0]
            return cos[p:p + 1, None, None], sin[p:p + 1, None, None]
        idx = torch.tensor(positions, device=device)
        return cos[idx][:, None, None], sin[idx][:, None, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (RoFormer eq. 34, HF "rotate half" layout) of the first
    ``cos.shape[-1]`` dimensions of each head; the others pass unchanged (partial rotary).

    x: (B, T, heads, head_dim); cos, sin (signed, see ``RotaryEmbedding``): broadcastable to
    (B, T, heads, rope_dim).
    """
    rot = cos.shape[-1]
    xr = x[..., :rot]
    half = rot // 2
    swapped = torch.cat((xr[..., half:], xr[..., :half]), dim=-1)
    out = xr * cos + swapped * sin
    return out if rot == x.shape[-1] else torch.cat((out, x[..., rot:]), dim=-1)


def linear_layer(in_features: int, out_features: int, qtype: int | None) -> nn.Module:
    """A bias-free projection: dense ``nn.Linear`` (``qtype`` None), or ``GGUFLinear`` holding
    the weights in GGML type ``qtype``."""
    if qtype is None:
        return nn.Linear(in_features, out_features, bias=False)
    return GGUFLinear(in_features, out_features, qtype)


def _fuse(types: list[int | None]) -> bool:
    """Matrices of these types can be one fused projection: all dense, or all one GGML type."""
    return len(set(types)) == 1


class Attention(nn.Module):
    """Grouped-query causal (or sliding-window) self-attention with RoPE and a KV cache.

    Projections: ``qkv_proj`` (rows: Q, then K, then V) when q, k and v are held alike, else
    ``q_proj``, ``k_proj``, ``v_proj``; ``qkv_bias`` (Q, K, V rows) when the variant has biases;
    ``q_norm``, ``k_norm`` (RMSNorm over each head) when it has QK norm; ``o_proj``.
    """

    def __init__(self, args: ModelArgs, layer: int, types: Mapping[str, int | None]):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.scale, self.window, self.rope_index = args.attn_scale, args.layer_window[layer], args.layer_rope[layer]
        h, q, kv = args.hidden_size, args.q_rows, args.kv_rows
        self.fused = _fuse([types["q"], types["k"], types["v"]])
        if self.fused:
            self.qkv_proj = linear_layer(h, q + 2 * kv, types["q"])
        else:
            self.q_proj, self.k_proj, self.v_proj = linear_layer(h, q, types["q"]), linear_layer(h, kv, types["k"]), linear_layer(h, kv, types["v"])
        self.qkv_bias = nn.Parameter(torch.zeros(q + 2 * kv)) if args.block.qkv_bias else None
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.block.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.block.qk_norm else None
        self.o_proj = linear_layer(q, h, types["o"])

    def projections(self) -> list[nn.Module]:
        """The q/k/v projection modules in row order (one when fused)."""
        return [self.qkv_proj] if self.fused else [self.q_proj, self.k_proj, self.v_proj]

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape  # (B, T, hidden)
        nh, nkv = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x) if self.fused else torch.cat([p(x) for p in self.projections()], dim=-1)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        qkv = qkv.view(b, t, nh + 2 * nkv, self.head_dim)
        q, k, v = qkv[:, :, :nh], qkv[:, :, nh:nh + nkv], qkv[:, :, nh + nkv:]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)

    @property
    def native_decode(self) -> bool:
        """Decode attention by the native kernel (``torch.ops.exo_gguf.decode_attention``):
        projections in GGUF blocks (the kernels are loaded then), float32 on the CPU."""
        return all(isinstance(p, GGUFLinear) for p in self.projections())

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Prefill (or any chunk) of one sequence: x (B, T, hidden), cos/sin (T, 1, rope_dim)."""
        b, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        past = cache.offset
        k, v = cache.update(k, v)  # (B, n_kv, past + T, head_dim)
        w = self.window
        if w and past + t > w:  # query i (position past + i) sees keys (past + i - w, past + i]
            lo = max(0, past + 1 - w)  # keys before the first query's window are never read
            k, v = k[:, :, lo:], v[:, :, lo:]
            pos_q = torch.arange(past, past + t, device=x.device)[:, None]
            pos_k = torch.arange(lo, past + t, device=x.device)[None, :]
            mask = (pos_k <= pos_q) & (pos_k > pos_q - w)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        elif t == 1:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=True)
        elif past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
        else:  # chunk appended to a non-empty cache: query i sees keys [0, past + i]
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(out)

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One decode step of B independent requests: x (B, 1, hidden), cos/sin (B, 1, 1, rope_dim),
        ``caches[i]`` the KV cache of row i (each at its own length). Projections run batched;
        attention runs per row over that row's own keys, so no padding or mask is needed."""
        b = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)  # q (B, n_heads, 1, head_dim), k/v (B, n_kv, 1, head_dim)
        if self.native_decode and x.device.type == "cpu" and x.dtype == torch.float32:
            for cache in caches:  # one call for the whole batch: appends to each cache, attends
                cache.reserve(cache.offset + 1)
            out = torch.ops.exo_gguf.decode_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], [c.k for c in caches],
                                                      [c.v for c in caches], [c.offset for c in caches], self.scale, self.window)
            for cache in caches:
                cache.offset += 1
            return self.o_proj(out.reshape(b, 1, self.n_heads * self.head_dim))
        outs = []
        for i, cache in enumerate(caches):
            ki, vi = cache.update(k[i:i + 1], v[i:i + 1])  # (1, n_kv, len_i, head_dim)
            if self.window:
                ki, vi = ki[:, :, -self.window:], vi[:, :, -self.window:]
            outs.append(F.scaled_dot_product_attention(q[i:i + 1], ki, vi, scale=self.scale, enable_gqa=True))
        out = outs[0] if b == 1 else torch.cat(outs)  # (B, n_heads, 1, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(b, 1, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)), act SiLU (SwiGLU) or tanh-approximated
    GELU (GeGLU); gate and up fused into ``gate_up_proj`` (rows: gate, then up) when held alike."""

    def __init__(self, args: ModelArgs, types: Mapping[str, int | None]):
        super().__init__()
        h, i = args.hidden_size, args.intermediate_size
        self.activation = args.block.activation
        self.fused = _fuse([types["gate"], types["up"]])
        if self.fused:
            self.gate_up_proj = linear_layer(h, 2 * i, types["gate"])
        else:
            self.gate_proj, self.up_proj = linear_layer(h, i, types["gate"]), linear_layer(h, i, types["up"])
        self.down_proj = linear_layer(i, h, types["down"])

    def projections(self) -> list[nn.Module]:
        return [self.gate_up_proj] if self.fused else [self.gate_proj, self.up_proj]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        act = F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")
        return self.down_proj(act * up)


class TransformerBlock(nn.Module):
    """One layer: ``h = x + post_attn_norm?(attn(attn_norm(x)))``, then
    ``h + post_ffn_norm?(mlp(ffn_norm(h)))``."""

    def __init__(self, args: ModelArgs, layer: int, types: Mapping[str, int | None]):
        super().__init__()
        eps = args.rms_norm_eps
        self.attn_norm = RMSNorm(args.hidden_size, eps)
        self.self_attn = Attention(args, layer, types)
        self.attn_post_norm = RMSNorm(args.hidden_size, eps) if args.block.sandwich_norm else None
        self.ffn_norm = RMSNorm(args.hidden_size, eps)
        self.mlp = FeedForward(args, types)
        self.ffn_post_norm = RMSNorm(args.hidden_size, eps) if args.block.sandwich_norm else None

    def _residual(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        h = x + (self.attn_post_norm(a) if self.attn_post_norm is not None else a)
        f = self.mlp(self.ffn_norm(h))
        return h + (self.ffn_post_norm(f) if self.ffn_post_norm is not None else f)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self._residual(x, self.self_attn(self.attn_norm(x), cos, sin, cache))

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        return self._residual(x, self.self_attn.decode(self.attn_norm(x), cos, sin, caches))

    def matrices(self) -> list[nn.Module]:
        return [*self.self_attn.projections(), self.self_attn.o_proj, *self.mlp.projections(), self.mlp.down_proj]
