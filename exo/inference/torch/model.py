"""A sharded Llama transformer in plain PyTorch.

Architecture: Llama (Touvron et al. 2023, arXiv:2302.13971): pre-norm RMSNorm (Zhang & Sennrich
2019, arXiv:1910.07467), rotary position embeddings (Su et al. 2021, RoFormer,
arXiv:2104.09864) in the HF "rotate half" layout, grouped-query attention (Ainslie et al. 2023,
arXiv:2305.13245) and a SwiGLU feed-forward (Shazeer 2020, arXiv:2002.05202).

A ``ShardedLlama`` holds only layers ``[shard.start_layer, shard.end_layer]``; the token
embedding only on the first shard, the final norm and output head only on the last.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from exo.inference.shard import Shard
from exo.inference.torch.gguf_weights import TILE_BYTES, GGUFEmbedding, GGUFLinear
from exo.models.gguf import QuantizedRows
from exo.models.llama import LlamaArgs  # noqa: F401  (the config of every engine's Llama; re-exported)


#: KV cache capacity is allocated in multiples of this many tokens.
KV_BLOCK = 256


class KVCache:
    """Keys and values of one request for one layer, in preallocated buffers.

    Buffers: (B, n_kv_heads, capacity, head_dim); ``offset`` tokens are filled. Capacity is a
    multiple of ``KV_BLOCK`` tokens and at least doubles when exceeded, so appending a decode
    step never allocates (amortised O(1) per token); ``reserve`` sizes it ahead of a prefill.
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
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight, computed in float32."""

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
    """cos/sin tables of RoPE with base ``theta``, grown on demand.

    The sin table is stored with the first half of each row negated, so that
    ``x * cos + swap_halves(x) * sin`` equals HF's ``x * cos + rotate_half(x) * sin`` exactly
    (negating a factor commutes with rounding). Plain tensors, not module buffers: a model built
    on the meta device never holds uninitialised tables.
    """

    def __init__(self, head_dim: int, theta: float):
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
        self._cos = self._sin = None

    def _tables(self, end: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos is None or self._cos.shape[0] < end or self._cos.dtype != dtype or self._cos.device != device:
            n = max(end, 2 * (self._cos.shape[0] if self._cos is not None else 256))
            t = torch.arange(n, dtype=torch.float64, device="cpu")
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            half = emb.shape[-1] // 2
            sin = emb.sin()
            sin[:, :half] = -sin[:, :half]
            self._cos, self._sin = emb.cos().to(device, dtype), sin.to(device, dtype)
        return self._cos, self._sin

    def __call__(self, position: int, length: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin of shape (length, 1, head_dim) for positions [position, position + length)."""
        cos, sin = self._tables(position + length, dtype, device)
        return cos[position:position + length, None], sin[position:position + length, None]

    def at(self, positions: list[int], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin of shape (B, 1, 1, head_dim) for one position per row of a batch."""
        cos, sin = self._tables(max(positions) + 1, dtype, device)
        if len(positions) == 1:
            p = positions[0]
            return cos[p:p + 1, None, None], sin[p:p + 1, None, None]
        idx = torch.tensor(positions, device=device)
        return cos[idx][:, None, None], sin[idx][:, None, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (RoFormer eq. 34, HF "rotate half" layout).

    x: (B, T, heads, head_dim); cos, sin (signed, see ``RotaryEmbedding``): broadcastable to x.
    """
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x * cos + swapped * sin


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE and a KV cache.

    Q, K and V come from one fused projection ``qkv_proj`` (rows: n_heads * head_dim of Q, then
    n_kv_heads * head_dim of K, then of V), one matrix multiply instead of three.
    """

    def __init__(self, args: LlamaArgs, gguf_types: Mapping[str, int] | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.qkv_proj = _linear(args.hidden_size, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, gguf_types, "qkv")
        self.o_proj = _linear(args.n_heads * args.head_dim, args.hidden_size, gguf_types, "o")

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape  # (B, T, hidden)
        nh, nkv = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).view(b, t, nh + 2 * nkv, self.head_dim)
        qk = apply_rope(qkv[:, :, :nh + nkv], cos, sin)  # (B, T, n_heads + n_kv, head_dim)
        q = qk[:, :, :nh].transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = qk[:, :, nh:].transpose(1, 2)  # (B, n_kv, T, head_dim)
        v = qkv[:, :, nh + nkv:].transpose(1, 2)  # (B, n_kv, T, head_dim)
        return q, k, v

    @property
    def _native_decode(self) -> bool:
        """Decode attention by the native kernel (``torch.ops.exo_gguf.decode_attention``):
        with GGUF block weights (the kernels are loaded then), float32 on the CPU."""
        return isinstance(self.qkv_proj, GGUFLinear)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Prefill (or any chunk) of one sequence: x (B, T, hidden), cos/sin (T, 1, head_dim)."""
        b, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        past = cache.offset
        k, v = cache.update(k, v)  # (B, n_kv, past + T, head_dim)
        if t == 1:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        elif past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # chunk appended to a non-empty cache: query i sees keys [0, past + i]
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(out)

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One decode step of B independent requests: x (B, 1, hidden), cos/sin (B, 1, 1, head_dim),
        ``caches[i]`` the KV cache of row i (each at its own length). Projections run batched;
        attention runs per row over that row's own keys, so no padding or mask is needed."""
        b = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)  # q (B, n_heads, 1, head_dim), k/v (B, n_kv, 1, head_dim)
        if self._native_decode:  # one call for the whole batch: appends to each cache, attends
            for cache in caches:
                cache.reserve(cache.offset + 1)
            out = torch.ops.exo_gguf.decode_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], [c.k for c in caches],
                                                      [c.v for c in caches], [c.offset for c in caches])
            for cache in caches:
                cache.offset += 1
            return self.o_proj(out.reshape(b, 1, self.n_heads * self.head_dim))
        outs = []
        for i, cache in enumerate(caches):
            ki, vi = cache.update(k[i:i + 1], v[i:i + 1])  # (1, n_kv, len_i, head_dim)
            outs.append(F.scaled_dot_product_attention(q[i:i + 1], ki, vi, enable_gqa=True))
        out = outs[0] if b == 1 else torch.cat(outs)  # (B, n_heads, 1, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(b, 1, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused into one ``gate_up_proj``
    (rows: intermediate_size of gate, then of up)."""

    def __init__(self, args: LlamaArgs, gguf_types: Mapping[str, int] | None = None):
        super().__init__()
        self.gate_up_proj = _linear(args.hidden_size, 2 * args.intermediate_size, gguf_types, "gate_up")
        self.down_proj = _linear(args.intermediate_size, args.hidden_size, gguf_types, "down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: LlamaArgs, gguf_types: Mapping[str, int] | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, gguf_types)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = FeedForward(args, gguf_types)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        h = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, caches)
        return h + self.mlp(self.post_attention_layernorm(h))


#: The GGUF tensors behind each kind of weight matrix of ``ShardedLlama`` ({i}: a layer
#: index); the tensors of one fused kind share one GGML type. The output head ("head") is
#: ``output.weight``, or the embedding when the file ties them.
GGUF_KIND_TENSORS = {
    "qkv": ("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight"),
    "o": ("blk.{i}.attn_output.weight",),
    "gate_up": ("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"),
    "down": ("blk.{i}.ffn_down.weight",),
    "embed": ("token_embd.weight",),
}
#: Keys of ``ShardedLlama``'s ``gguf_types``: the GGML type of each (fused) projection's
#: weights, of the token embedding and of the output head.
GGUF_WEIGHT_KINDS = (*GGUF_KIND_TENSORS, "head")


def gguf_kind_types(tensor_types: Mapping[str, int], n_layers: int) -> tuple[dict[str, int] | None, str | None]:
    """``(gguf_types, None)`` for ``ShardedLlama`` when the block kernels can hold every weight
    matrix of a file whose tensors have GGML types ``tensor_types`` (by GGUF name, as
    ``exo.models.gguf.gguf_tensor_types``), else ``(None, why not)``."""
    types: dict[str, int] = {}
    for kind, names in GGUF_KIND_TENSORS.items():
        found = {tensor_types.get(n.format(i=i)) for n in names for i in range(n_layers)}
        if len(found) != 1 or next(iter(found)) not in TILE_BYTES:
            return None, f"its {kind} matrices are in GGML types {sorted(map(str, found))}, not all one of Q4_1 (3) / Q8_0 (8)"
        types[kind] = found.pop()
    head = tensor_types.get("output.weight", types["embed"])
    if head not in TILE_BYTES:
        return None, f"its output head is in GGML type {head}, not Q4_1 (3) / Q8_0 (8)"
    types["head"] = head
    return types, None


def _linear(in_features: int, out_features: int, gguf_types: Mapping[str, int] | None, kind: str) -> nn.Module:
    """A bias-free projection: dense ``nn.Linear``, or ``GGUFLinear`` in ``gguf_types[kind]``."""
    if gguf_types is None:
        return nn.Linear(in_features, out_features, bias=False)
    return GGUFLinear(in_features, out_features, gguf_types[kind])


def _weight_targets(args: LlamaArgs, shard: Shard) -> dict[str, tuple[str, int, int]]:
    """Checkpoint tensor name (HF-style, global layer index) -> (parameter name, first row, rows).

    The explicit mapping of checkpoint tensors onto this model's parameters, fused projections
    included. Output head excluded (see ``ShardedLlama.load_weights``).
    """
    q_rows, kv_rows, ffn = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.intermediate_size
    per_layer = {
        "input_layernorm.weight": ("input_layernorm.weight", 0, args.hidden_size),
        "self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", 0, q_rows),
        "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", q_rows, kv_rows),
        "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", q_rows + kv_rows, kv_rows),
        "self_attn.o_proj.weight": ("self_attn.o_proj.weight", 0, args.hidden_size),
        "post_attention_layernorm.weight": ("post_attention_layernorm.weight", 0, args.hidden_size),
        "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 0, ffn),
        "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", ffn, ffn),
        "mlp.down_proj.weight": ("mlp.down_proj.weight", 0, args.hidden_size),
    }
    out = {}
    if shard.is_first_layer:
        out["embed_tokens.weight"] = ("embed_tokens.weight", 0, args.vocab_size)
    for local, layer in enumerate(range(shard.start_layer, shard.end_layer + 1)):
        for src, (param, row, rows) in per_layer.items():
            out[f"layers.{layer}.{src}"] = (f"layers.{local}.{param}", row, rows)
    if shard.is_last_layer:
        out["norm.weight"] = ("norm.weight", 0, args.hidden_size)
    return out


class ShardedLlama(nn.Module):
    """Layers ``[shard.start_layer, shard.end_layer]`` of a Llama model.

    ``forward(x, caches, position)`` (prefill, or one step of one request):
        x: token ids (B, T) int64 on the first shard, else hidden states (B, T, hidden).
        caches: one ``KVCache`` per layer of the shard.
        position: tokens already in the caches.
    ``decode(x, caches, positions)`` (one decode step of B independent requests):
        x: (B, 1) token ids or (B, 1, hidden) hidden states, one row per request;
        caches[i]: the per-layer caches of request i; positions[i]: its tokens so far.
    Both return hidden states (B, T, hidden), or on the last shard the logits of the last
    position (B, vocab) in float32.

    ``tie_word_embeddings``: the output head shares the embedding's weights (SmolLM2); a shard
    holding both keeps one copy.

    ``gguf_types``: None for dense weights (``nn.Linear``, ``nn.Embedding``), or the GGML type
    of each kind of weight matrix (keys ``GGUF_WEIGHT_KINDS``) to keep the projections, the
    embedding and the output head in the GGUF's own blocks (``gguf_weights.py``; float32 only).
    ``load_weights`` then takes those matrices as the file's raw blocks.

    Raises:
        ValueError: ``shard`` is of a model with another number of layers; a GGML type or a
            matrix shape the block kernels do not support.
    """

    def __init__(self, args: LlamaArgs, shard: Shard, tie_word_embeddings: bool = True, gguf_types: Mapping[str, int] | None = None):
        super().__init__()
        if shard.n_layers != args.n_layers:
            raise ValueError(f"shard has n_layers={shard.n_layers} but the model has {args.n_layers}")
        self.args, self.shard, self.tie_word_embeddings = args, shard, tie_word_embeddings
        self.gguf_types = dict(gguf_types) if gguf_types is not None else None
        if not shard.is_first_layer:
            self.embed_tokens = None
        elif gguf_types is None:
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        else:
            self.embed_tokens = GGUFEmbedding(args.vocab_size, args.hidden_size, gguf_types["embed"])
        self.layers = nn.ModuleList(TransformerBlock(args, gguf_types) for _ in range(shard.n_shard_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps) if shard.is_last_layer else None
        self.lm_head = _linear(args.hidden_size, args.vocab_size, gguf_types, "head") if shard.is_last_layer else None
        self.rotary = RotaryEmbedding(args.head_dim, args.rope_theta)
        self._native_cache: list[torch.Tensor] | None = None
        self._native_qtypes = [gguf_types[k] for k in ("qkv", "o", "gate_up", "down")] if gguf_types is not None else None
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head when tied and both are here (call again
        after ``to_empty``, which allocates each parameter separately)."""
        self._native_cache = None
        if not self.tie_word_embeddings or self.embed_tokens is None or self.lm_head is None:
            return
        if isinstance(self.lm_head, nn.Linear) and isinstance(self.embed_tokens, nn.Embedding):
            self.lm_head.weight = self.embed_tokens.weight
        elif isinstance(self.lm_head, GGUFLinear) and isinstance(self.embed_tokens, GGUFEmbedding):
            self.lm_head.tiles = self.embed_tokens.tiles

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].input_layernorm.weight.dtype

    def new_caches(self, batch: int = 1, capacity: int = KV_BLOCK) -> list[KVCache]:
        p = self.layers[0].input_layernorm.weight
        return [KVCache(batch, self.args.n_kv_heads, self.args.head_dim, p.dtype, p.device, capacity) for _ in self.layers]

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            return self.embed_tokens(x)  # (B, T, hidden)
        return x.to(self.dtype)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return h
        return self.lm_head(self.norm(h[:, -1, :])).float()  # (B, vocab)

    def forward(self, x: torch.Tensor, caches: list[KVCache], position: int) -> torch.Tensor:
        if self.gguf_types is not None and x.shape[:2] == (1, 1):  # one token: the native decode step
            return self.decode(x, [caches], [position])
        h = self._embed(x)
        cos, sin = self.rotary(position, h.shape[1], h.dtype, h.device)  # (T, 1, head_dim)
        for layer, cache in zip(self.layers, caches):
            h = layer(h, cos, sin, cache)
        return self._head(h)

    def decode(self, x: torch.Tensor, caches: list[list[KVCache]], positions: list[int]) -> torch.Tensor:
        if not len(caches) == len(positions) == x.shape[0] or x.shape[1] != 1:
            raise ValueError(f"decode takes one token per request: x {tuple(x.shape)}, {len(caches)} caches, {len(positions)} positions")
        h = self._embed(x)  # (B, 1, hidden)
        cos, sin = self.rotary.at(positions, h.dtype, h.device)  # (B, 1, 1, head_dim)
        if self.gguf_types is not None and len(self.layers):
            return self._head(self._decode_layers(h, cos, sin, caches))
        for layer, layer_caches in zip(self.layers, zip(*caches)):
            h = layer.decode(h, cos, sin, layer_caches)
        return self._head(h)

    def _decode_layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[list[KVCache]]) -> torch.Tensor:
        """Every layer's decode step in one native call (``torch.ops.exo_gguf.decode_layers``,
        the arithmetic of ``TransformerBlock.decode``): h (B, 1, hidden) float32, cos/sin
        (B, 1, 1, head_dim), ``caches[i]`` request i's per-layer caches. Appends to the caches."""
        b = h.shape[0]
        layer_caches = [c for per_layer in zip(*caches) for c in per_layer]  # layer-major
        for c in layer_caches:
            c.reserve(c.offset + 1)
        out = torch.ops.exo_gguf.decode_layers(h, self._native_weights(), self._native_qtypes, cos.reshape(b, -1), sin.reshape(b, -1),
                                               [c.k for c in layer_caches], [c.v for c in layer_caches],
                                               [c.offset for c in layer_caches], self.args.n_heads, self.args.n_kv_heads,
                                               self.args.rms_norm_eps)
        for c in layer_caches:
            c.offset += 1
        return out

    def _native_weights(self) -> list[torch.Tensor]:
        """The layers' weights in ``decode_layers``' order, 6 per layer (cached; ``_apply``, which
        ``to``/``to_empty`` go through, and ``tie_weights`` drop the cache)."""
        if self._native_cache is None:
            self._native_cache = [t for layer in self.layers for t in (
                layer.input_layernorm.weight, layer.self_attn.qkv_proj.tiles, layer.self_attn.o_proj.tiles,
                layer.post_attention_layernorm.weight, layer.mlp.gate_up_proj.tiles, layer.mlp.down_proj.tiles)]
        return self._native_cache

    def _apply(self, fn, recurse=True):
        self._native_cache = None
        return super()._apply(fn, recurse)

    def load_weights(self, chunks: Iterable[tuple[str, tuple[int, ...], int, "np.ndarray | QuantizedRows"]]) -> None:
        """Copy checkpoint tensors, a block of rows at a time, into the parameters (converting to
        their dtype and device), so no second full copy of the weights is ever held.

        ``chunks`` yields ``(name, shape, row, block)`` as ``exo.models.gguf.iter_llama_shard_chunks``:
        HF-style name with the global layer index, the tensor's full shape, the first row of
        ``block`` (float32, ``(rows,) + shape[1:]``; for a matrix this model keeps in GGUF blocks,
        a ``QuantizedRows`` of the same rows in the model's GGML type). Tensors this shard does
        not hold are skipped.

        Raises:
            KeyError: a parameter of the shard got no (or partial) weights (named in the message).
            ValueError: a tensor's shape or GGML type differs from the parameter's (both named).
        """
        targets = _weight_targets(self.args, self.shard)
        if self.lm_head is not None and not self._head_shares_embedding():
            targets["lm_head.weight"] = ("lm_head.weight", 0, self.args.vocab_size)
        params = dict(self.named_parameters())
        filled = dict.fromkeys(targets, 0)
        with torch.no_grad():
            for name, shape, row, block in chunks:
                if name not in targets:
                    continue
                pname, base, rows = targets[name]
                n = block.shape[0]
                module = self.get_submodule(pname.rsplit(".", 1)[0])
                if isinstance(module, (GGUFLinear, GGUFEmbedding)):
                    if tuple(shape) != (rows, module.cols):
                        raise ValueError(f"tensor {name!r} has shape {tuple(shape)}, expected {(rows, module.cols)} for {pname!r}")
                    if not isinstance(block, QuantizedRows) or block.qtype != module.qtype:
                        got = f"GGML type {block.qtype}" if isinstance(block, QuantizedRows) else "float32 rows"
                        raise ValueError(f"tensor {name!r} is {got}, but {pname!r} holds GGML type {module.qtype}")
                    module.load_rows(base + row, block.data)
                else:
                    param = params[pname]
                    if tuple(shape) != (rows, *param.shape[1:]):
                        raise ValueError(f"tensor {name!r} has shape {tuple(shape)}, expected {(rows, *param.shape[1:])} for {pname!r}")
                    if isinstance(block, QuantizedRows):
                        raise ValueError(f"tensor {name!r} came as GGML type {block.qtype} blocks, but {pname!r} is dense")
                    param[base + row:base + row + n].copy_(torch.from_numpy(block))
                filled[name] += n
        for name, (pname, _, rows) in targets.items():
            if filled[name] != rows:
                raise KeyError(f"no weights for {name!r}" if not filled[name] else f"only {filled[name]} of {rows} rows of {name!r}")

    def _head_shares_embedding(self) -> bool:
        if self.embed_tokens is None or self.lm_head is None:
            return False
        if isinstance(self.lm_head, GGUFLinear):
            return isinstance(self.embed_tokens, GGUFEmbedding) and self.lm_head.tiles is self.embed_tokens.tiles
        return self.lm_head.weight is getattr(self.embed_tokens, "weight", None)

    def load_tensors(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Load whole HF-named float32 arrays (``layers.17.mlp.up_proj.weight``); see ``load_weights``."""
        self.load_weights((name, arr.shape, 0, arr) for name, arr in tensors.items())
