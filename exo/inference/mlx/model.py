"""A sharded Llama transformer in MLX, the same math as ``exo.inference.torch.model``.

Architecture: Llama (Touvron et al. 2023, arXiv:2302.13971): pre-norm RMSNorm (Zhang & Sennrich
2019, arXiv:1910.07467), rotary position embeddings (Su et al. 2021, RoFormer, arXiv:2104.09864)
in the HF "rotate half" layout, grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245)
and a SwiGLU feed-forward (Shazeer 2020, arXiv:2002.05202).

A ``ShardedLlama`` holds only layers ``[shard.start_layer, shard.end_layer]``; the token
embedding only on the first shard, the final norm and output head only on the last. MLX is
lazy: a step builds the graph of the whole shard and ``mx.eval`` runs it once.

No ``mx.compile``: on the Linux CPU build, compiling the feed-forward (the part of a decode
step with no KV cache state) measured within noise (~160 vs ~155 ms per token, 30 layers), and
the cache update is Python-side state that a compiled function cannot hold. On Metal, fusing the
element-wise ops may pay; measure there before adding it.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import numpy as np

from exo.inference.shard import Shard
from exo.models.llama import LlamaArgs

CACHE_STEP = 256  # tokens; a request's KV cache grows by whole steps (as mlx-lm's KVCache)

# HF names of one layer's weights.
LAYER_WEIGHTS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


class KVCache:
    """Keys and values of one request for one layer.

    Buffers (1, n_kv_heads, capacity, head_dim) float32, grown by ``CACHE_STEP`` tokens;
    ``offset`` tokens are filled.
    """

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append ``k``, ``v`` (1, n_kv, T, head_dim); return every key and value so far
        (1, n_kv, offset + T, head_dim)."""
        t = k.shape[2]
        end = self.offset + t
        if self.keys is None or end > self.keys.shape[2]:
            grow = ((end + CACHE_STEP - 1) // CACHE_STEP) * CACHE_STEP - (0 if self.keys is None else self.keys.shape[2])
            shape = (k.shape[0], k.shape[1], grow, k.shape[3])
            new_k, new_v = mx.zeros(shape, k.dtype), mx.zeros(shape, v.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :self.offset, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :self.offset, :], new_v], axis=2)
        self.keys[..., self.offset:end, :] = k
        self.values[..., self.offset:end, :] = v
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes * 2


class ShardCache:
    """One ``KVCache`` per layer of the shard; ``offset``: tokens held."""

    def __init__(self, n_layers: int):
        self.layers = [KVCache() for _ in range(n_layers)]
        self.offset = 0


def rope_tables(head_dim: int, theta: float, length: int) -> tuple[mx.array, mx.array]:
    """RoPE cos, sin tables (length, head_dim) float32, computed in float64 like the torch engine."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = np.outer(np.arange(length, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return mx.array(np.cos(emb).astype(np.float32)), mx.array(np.sin(emb).astype(np.float32))


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight."""
    return x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps) * weight


def _rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class TransformerBlock:
    """One Llama layer over a dict of its weights (HF names, see ``LAYER_WEIGHTS``)."""

    def __init__(self, args: LlamaArgs, weights: dict[str, mx.array]):
        self.args, self.w = args, weights
        self.scale = 1.0 / math.sqrt(args.head_dim)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, cache: KVCache) -> mx.array:
        a, w = self.args, self.w
        b, t, _ = x.shape  # (B, T, hidden)
        h = rms_norm(x, w["input_layernorm.weight"], a.rms_norm_eps)
        q = (h @ w["self_attn.q_proj.weight"].T).reshape(b, t, a.n_heads, a.head_dim).transpose(0, 2, 1, 3)  # (B, n_heads, T, hd)
        k = (h @ w["self_attn.k_proj.weight"].T).reshape(b, t, a.n_kv_heads, a.head_dim).transpose(0, 2, 1, 3)  # (B, n_kv, T, hd)
        v = (h @ w["self_attn.v_proj.weight"].T).reshape(b, t, a.n_kv_heads, a.head_dim).transpose(0, 2, 1, 3)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = cache.update_and_fetch(k, v)  # (B, n_kv, past + T, hd)
        # "causal" is aligned lower-right: query i sees keys [0, past + i]
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.scale, mask="causal" if t > 1 else None)
        x = x + out.transpose(0, 2, 1, 3).reshape(b, t, a.n_heads * a.head_dim) @ w["self_attn.o_proj.weight"].T
        h = rms_norm(x, w["post_attention_layernorm.weight"], a.rms_norm_eps)
        gate = h @ w["mlp.gate_proj.weight"].T
        return x + (nn_silu(gate) * (h @ w["mlp.up_proj.weight"].T)) @ w["mlp.down_proj.weight"].T


def nn_silu(x: mx.array) -> mx.array:
    """SiLU (Hendrycks & Gimpel 2016, arXiv:1606.08415): x * sigmoid(x)."""
    return x * mx.sigmoid(x)


class ShardedLlama:
    """Layers ``[shard.start_layer, shard.end_layer]`` of a Llama model in MLX.

    ``__call__(x, cache)``:
        x: token ids (1, T) int on the first shard, else hidden states (1, T, hidden) float32.
        cache: the request's ``ShardCache``; ``cache.offset`` tokens already in it.
    Returns numpy float32: hidden states (1, T, hidden), or on the last shard the logits of the
    last position (vocab,).
    """

    def __init__(self, args: LlamaArgs, shard: Shard):
        if shard.n_layers != args.n_layers:
            raise ValueError(f"shard has n_layers={shard.n_layers} but the model has {args.n_layers}")
        self.args, self.shard = args, shard
        self.embed_tokens: mx.array | None = None  # (vocab, hidden)
        self.layers: list[TransformerBlock] = []
        self.norm: mx.array | None = None
        self.lm_head: mx.array | None = None  # (vocab, hidden)
        self.cos, self.sin = rope_tables(args.head_dim, args.rope_theta, args.max_seq_len)

    def new_cache(self) -> ShardCache:
        return ShardCache(self.shard.n_shard_layers)

    def __call__(self, x: np.ndarray, cache: ShardCache) -> np.ndarray:
        position, t = cache.offset, x.shape[1]
        if self.embed_tokens is not None:
            h = self.embed_tokens[mx.array(np.asarray(x, dtype=np.int32))]  # (1, T, hidden)
        else:
            h = mx.array(np.asarray(x, dtype=np.float32))
        cos, sin = self.cos[position:position + t], self.sin[position:position + t]  # (T, head_dim)
        for layer, layer_cache in zip(self.layers, cache.layers):
            h = layer(h, cos, sin, layer_cache)
        if self.lm_head is not None:
            h = rms_norm(h[:, -1, :], self.norm, self.args.rms_norm_eps) @ self.lm_head.T  # (1, vocab)
        mx.eval(h, *[a for c in cache.layers for a in (c.keys, c.values)])
        cache.offset = position + t
        out = np.array(h)
        return out[0] if self.lm_head is not None else out

    def load_tensors(self, tensors: dict[str, Any]) -> None:
        """Load HF-named float32 arrays (layer names global, e.g. ``layers.17.mlp.up_proj.weight``).

        Raises:
            KeyError: a weight of the shard has no tensor (named in the message).
            ValueError: a tensor's shape differs from the weight's (both named).
        """
        a, shard = self.args, self.shard
        h, i, hd = a.hidden_size, a.intermediate_size, a.head_dim
        shapes = {
            "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (a.n_heads * hd, h), "self_attn.k_proj.weight": (a.n_kv_heads * hd, h),
            "self_attn.v_proj.weight": (a.n_kv_heads * hd, h), "self_attn.o_proj.weight": (h, a.n_heads * hd),
            "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
        }

        def get(name: str, shape: tuple[int, ...]) -> mx.array:
            if name not in tensors:
                raise KeyError(f"no weights for {name!r}")
            arr = tensors[name]
            if tuple(arr.shape) != tuple(shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
            return mx.array(np.asarray(arr, dtype=np.float32))

        layers = [TransformerBlock(a, {n: get(f"layers.{li}.{n}", shapes[n]) for n in LAYER_WEIGHTS})
                  for li in range(shard.start_layer, shard.end_layer + 1)]
        if shard.is_first_layer:
            self.embed_tokens = get("embed_tokens.weight", (a.vocab_size, h))
        if shard.is_last_layer:
            self.norm = get("norm.weight", (h,))
            if shard.is_first_layer and tensors.get("lm_head.weight") is tensors.get("embed_tokens.weight"):
                self.lm_head = self.embed_tokens  # tied embeddings: one copy in memory
            else:
                self.lm_head = get("lm_head.weight", (a.vocab_size, h))
        self.layers = layers
        mx.eval(*[w for layer in layers for w in layer.w.values()],
                *[w for w in (self.embed_tokens, self.norm, self.lm_head) if w is not None])

    def weight_bytes(self) -> int:
        """Bytes of weights held."""
        arrays = {id(w): w for layer in self.layers for w in layer.w.values()}
        arrays.update({id(w): w for w in (self.embed_tokens, self.norm, self.lm_head) if w is not None})
        return sum(w.nbytes for w in arrays.values())
