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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from exo.inference.shard import Shard


@dataclass(frozen=True)
class LlamaArgs:
    """Llama hyper-parameters, read from the checkpoint's own config.

    ``head_dim`` is derived: ``hidden_size // n_heads``.
    """

    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "LlamaArgs":
        """Build from GGUF metadata keys ``llama.*`` (raises KeyError naming a missing key)."""
        arch = meta["general.architecture"]
        vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
        return cls(
            hidden_size=int(meta[f"{arch}.embedding_length"]),
            intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
            n_layers=int(meta[f"{arch}.block_count"]),
            n_heads=int(meta[f"{arch}.attention.head_count"]),
            n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", meta[f"{arch}.attention.head_count"])),
            vocab_size=int(vocab),
            rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            max_seq_len=int(meta.get(f"{arch}.context_length", 8192)),
        )


class KVCache:
    """Keys and values of one request for one layer, in buffers grown by doubling.

    Buffers: (B, n_kv_heads, capacity, head_dim); ``offset`` tokens are filled.
    """

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, capacity: int = 256):
        self.k = torch.zeros(batch, n_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.offset = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``, ``v`` (B, n_kv_heads, T, head_dim); return all keys and values so far
        (B, n_kv_heads, offset + T, head_dim)."""
        t = k.shape[2]
        end = self.offset + t
        if end > self.k.shape[2]:
            cap = max(end, 2 * self.k.shape[2])
            grow = lambda buf: torch.cat([buf, buf.new_zeros(*buf.shape[:2], cap - buf.shape[2], buf.shape[3])], dim=2)
            self.k, self.v = grow(self.k), grow(self.v)
        self.k[:, :, self.offset:end] = k
        self.v[:, :, self.offset:end] = v
        self.offset = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


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

    Plain tensors, not module buffers: a model built on the meta device never holds
    uninitialised tables.
    """

    def __init__(self, head_dim: int, theta: float):
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
        self._cos = self._sin = None

    def __call__(self, position: int, length: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (length, head_dim) for positions [position, position + length)."""
        end = position + length
        if self._cos is None or self._cos.shape[0] < end or self._cos.dtype != dtype or self._cos.device != device:
            n = max(end, 2 * (self._cos.shape[0] if self._cos is not None else 256))
            t = torch.arange(n, dtype=torch.float64, device="cpu")
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            self._cos, self._sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
        return self._cos[position:end], self._sin[position:end]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE and a KV cache."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, hidden)
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
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


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class ShardedLlama(nn.Module):
    """Layers ``[shard.start_layer, shard.end_layer]`` of a Llama model.

    ``forward(x, caches, position)``:
        x: token ids (B, T) int64 on the first shard, else hidden states (B, T, hidden).
        caches: one ``KVCache`` per layer of the shard.
        position: tokens already in the caches.
    Returns hidden states (B, T, hidden), or on the last shard the logits of the last position
    (B, vocab) in float32.
    """

    def __init__(self, args: LlamaArgs, shard: Shard):
        super().__init__()
        if shard.n_layers != args.n_layers:
            raise ValueError(f"shard has n_layers={shard.n_layers} but the model has {args.n_layers}")
        self.args, self.shard = args, shard
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size) if shard.is_first_layer else None
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(shard.n_shard_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps) if shard.is_last_layer else None
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False) if shard.is_last_layer else None
        self.rotary = RotaryEmbedding(args.head_dim, args.rope_theta)

    def new_caches(self, batch: int = 1, capacity: int = 256) -> list[KVCache]:
        p = next(self.parameters())
        return [KVCache(batch, self.args.n_kv_heads, self.args.head_dim, p.dtype, p.device, capacity) for _ in self.layers]

    def forward(self, x: torch.Tensor, caches: list[KVCache], position: int) -> torch.Tensor:
        if self.embed_tokens is not None:
            h = self.embed_tokens(x)  # (B, T, hidden)
        else:
            h = x.to(self.layers[0].input_layernorm.weight.dtype)
        cos, sin = self.rotary(position, h.shape[1], h.dtype, h.device)  # (T, head_dim)
        for layer, cache in zip(self.layers, caches):
            h = layer(h, cos, sin, cache)
        if self.lm_head is None:
            return h
        return self.lm_head(self.norm(h[:, -1, :])).float()  # (B, vocab)

    def load_tensors(self, tensors: dict[str, "Any"]) -> None:
        """Load HF-named float32 arrays (layer names global, e.g. ``layers.17.mlp.up_proj.weight``).

        Raises:
            KeyError: a parameter of the shard has no tensor (named in the message).
            ValueError: a tensor's shape differs from the parameter's (both named).
        """
        params = dict(self.named_parameters())
        tied = None
        for name, param in params.items():
            src = name
            if name.startswith("layers."):
                _, idx, rest = name.split(".", 2)
                src = f"layers.{int(idx) + self.shard.start_layer}.{rest}"
            if src not in tensors:
                raise KeyError(f"no weights for {src!r}")
            arr = tensors[src]
            if tuple(arr.shape) != tuple(param.shape):
                raise ValueError(f"tensor {src!r} has shape {tuple(arr.shape)}, expected {tuple(param.shape)}")
            with torch.no_grad():
                param.data = torch.from_numpy(np.require(arr, requirements="W")).to(dtype=param.dtype, device=param.device)
            if src == "lm_head.weight" and self.embed_tokens is not None and tensors[src] is tensors.get("embed_tokens.weight"):
                tied = True
        if tied:
            self.lm_head.weight = self.embed_tokens.weight  # tied embeddings: one copy in memory
