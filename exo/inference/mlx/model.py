"""A sharded decoder-only transformer in MLX, built from a ``ModelArgs``: the block of
``exo.models.architectures`` (Llama, Touvron et al. 2023, arXiv:2302.13971) with the switches
this engine implements: bias on q, k, v (Qwen2) and sliding-window attention per layer
(Mistral). Pre-norm RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467), rotary position
embeddings (Su et al. 2021, RoFormer, arXiv:2104.09864) in the HF "rotate half" layout with the
frequencies of ``Rope.inv_freq`` (Llama 3.1 scaling included), grouped-query attention (Ainslie
et al. 2023, arXiv:2305.13245), a SwiGLU feed-forward (Shazeer 2020, arXiv:2002.05202). Float32.

A ``ShardedModel`` holds only layers ``[shard.start_layer, shard.end_layer]``; the token
embedding only on the first shard, the final norm and output head (the embedding array itself
when tied) only on the last. MLX is lazy: a step builds the graph of the whole shard and
``mx.eval`` runs it once.

No ``mx.compile``: on the Linux CPU build, compiling the feed-forward (the part of a decode
step with no KV cache state) measured within noise (~160 vs ~155 ms per token, 30 layers), and
the cache update is Python-side state that a compiled function cannot hold. On Metal, fusing the
element-wise ops may pay; measure there before adding it.
"""

from __future__ import annotations

from typing import Any

import exo.inference.mlx as exo_mlx

exo_mlx.preload_blas()  # OpenBLAS before mlx.core on Linux (unless the launcher chose first)
import mlx.core as mx  # noqa: E402
import numpy as np

from exo.inference.shard import Shard
from exo.models.architectures import ModelArgs, Rope

CACHE_STEP = 256  # tokens; a request's KV cache grows by whole steps (as mlx-lm's KVCache)


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


def rope_tables(rope: Rope, head_dim: int, length: int) -> tuple[mx.array, mx.array]:
    """RoPE cos, sin tables (length, head_dim) float32 of ``rope`` over a whole head, computed
    in float64."""
    freqs = np.outer(np.arange(length, dtype=np.float64), rope.inv_freq(head_dim))
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb) * rope.attention_factor, np.sin(emb) * rope.attention_factor
    return mx.array(cos.astype(np.float32)), mx.array(sin.astype(np.float32))


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight."""
    return x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps) * weight


def silu(x: mx.array) -> mx.array:
    """SiLU (Hendrycks & Gimpel 2016, arXiv:1606.08415): x * sigmoid(x)."""
    return x * mx.sigmoid(x)


def _rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _linear(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    y = x @ weight.T
    return y if bias is None else y + bias


class Block:
    """One layer over a dict of its weights (canonical keys: ``ModelArgs.layer_shapes``).

    Args:
        window: the layer's sliding window (a query sees itself and the window - 1 keys
            before it), 0 for full causal attention.
        rope: the layer's RoPE (cos, sin) tables (max_len, head_dim).
    """

    def __init__(self, args: ModelArgs, weights: dict[str, mx.array], window: int, rope: tuple[mx.array, mx.array]):
        self.args, self.w, self.window = args, weights, window
        self.cos, self.sin = rope

    def __call__(self, x: mx.array, position: int, cache: KVCache) -> mx.array:
        a, w = self.args, self.w
        b, t, _ = x.shape  # (B, T, hidden)
        h = rms_norm(x, w["attn_norm"], a.rms_norm_eps)
        q = _linear(h, w["q"], w.get("q_bias")).reshape(b, t, a.n_heads, a.head_dim).transpose(0, 2, 1, 3)  # (B, n_heads, T, hd)
        k = _linear(h, w["k"], w.get("k_bias")).reshape(b, t, a.n_kv_heads, a.head_dim).transpose(0, 2, 1, 3)  # (B, n_kv, T, hd)
        v = _linear(h, w["v"], w.get("v_bias")).reshape(b, t, a.n_kv_heads, a.head_dim).transpose(0, 2, 1, 3)
        cos, sin = self.cos[position:position + t], self.sin[position:position + t]  # (T, hd)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = cache.update_and_fetch(k, v)  # (B, n_kv, position + T, hd)
        keys, values, mask = self._visible(keys, values, position, t)
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=a.attn_scale, mask=mask)
        x = x + out.transpose(0, 2, 1, 3).reshape(b, t, a.n_heads * a.head_dim) @ w["o"].T
        h = rms_norm(x, w["ffn_norm"], a.rms_norm_eps)
        return x + (silu(h @ w["gate"].T) * (h @ w["up"].T)) @ w["down"].T

    def _visible(self, keys: mx.array, values: mx.array, position: int, t: int) -> tuple[mx.array, mx.array, Any]:
        """The keys and values the queries at ``[position, position + t)`` may see, and the
        mask ``mx.fast.scaled_dot_product_attention`` takes for them."""
        if not self.window:
            # "causal" is aligned lower-right: query i sees keys [0, position + i]
            return keys, values, ("causal" if t > 1 else None)
        first = max(0, position - self.window + 1)  # no query sees a key before this
        keys, values = keys[..., first:, :], values[..., first:, :]
        if t == 1:
            return keys, values, None
        query = mx.arange(position, position + t)[:, None]  # (T, 1)
        key = mx.arange(first, position + t)[None, :]  # (1, position + T - first)
        return keys, values, (key <= query) & (key > query - self.window)


class ShardedModel:
    """Layers ``[shard.start_layer, shard.end_layer]`` of the model ``args`` describes, in MLX.

    ``__call__(x, cache)``:
        x: token ids (1, T) int on the first shard, else hidden states (1, T, hidden) float32.
        cache: the request's ``ShardCache``; ``cache.offset`` tokens already in it.
    Returns numpy float32: hidden states (1, T, hidden), or on the last shard the logits of the
    last position (vocab,).
    """

    def __init__(self, args: ModelArgs, shard: Shard):
        if shard.n_layers != args.n_layers:
            raise ValueError(f"shard has n_layers={shard.n_layers} but the model has {args.n_layers}")
        extra = set(args.block.layer_keys()) - _KEYS
        if extra:
            raise ValueError(f"layers with {sorted(extra)} are not implemented")
        self.args, self.shard = args, shard
        self.layer_ids = range(shard.start_layer, shard.end_layer + 1)
        self.embed: mx.array | None = None  # (vocab, hidden)
        self.layers: list[Block] = []
        self.output_norm: mx.array | None = None
        self.output: mx.array | None = None  # (vocab, hidden)
        used = sorted({args.layer_rope[i] for i in self.layer_ids})
        self.ropes = {r: rope_tables(args.ropes[r], args.head_dim, args.max_seq_len) for r in used}

    def new_cache(self) -> ShardCache:
        return ShardCache(self.shard.n_shard_layers)

    def __call__(self, x: np.ndarray, cache: ShardCache, final_hidden: bool = False) -> np.ndarray:
        """Hidden states (1, T, hidden), or on the last shard the logits (vocab,) of the last
        position; ``final_hidden`` (embeddings): there, the final-normed hidden states (1, T, hidden)."""
        position, t = cache.offset, x.shape[1]
        if self.embed is not None:
            h = self.embed[mx.array(np.asarray(x, dtype=np.int32))]  # (1, T, hidden)
        else:
            h = mx.array(np.asarray(x, dtype=np.float32))
        for layer, layer_cache in zip(self.layers, cache.layers):
            h = layer(h, position, layer_cache)
        if self.output is not None and final_hidden:
            h = rms_norm(h, self.output_norm, self.args.rms_norm_eps)  # (1, T, hidden)
        elif self.output is not None:
            h = rms_norm(h[:, -1, :], self.output_norm, self.args.rms_norm_eps) @ self.output.T  # (1, vocab)
        mx.eval(h, *[a for c in cache.layers for a in (c.keys, c.values)])
        cache.offset = position + t
        out = np.array(h)
        return out[0] if self.output is not None and not final_hidden else out

    def load_tensors(self, tensors: dict[str, Any]) -> None:
        """Load the shard's float32 arrays by canonical name (``layers.{i}.{key}`` with ``i``
        global, ``embed``, ``output_norm``, ``output``: ``ModelWeights.load_shard``).

        Raises:
            KeyError: a weight of the shard has no tensor (named in the message).
            ValueError: a tensor's shape differs from the weight's (both named).
        """
        a, shard = self.args, self.shard

        def get(name: str, shape: tuple[int, ...]) -> mx.array:
            if name not in tensors:
                raise KeyError(f"no weights for {name!r}")
            arr = tensors[name]
            if tuple(arr.shape) != tuple(shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
            return mx.array(np.asarray(arr, dtype=np.float32))

        shapes = a.layer_shapes()
        layers = [Block(a, {k: get(f"layers.{i}.{k}", s) for k, s in shapes.items()}, a.layer_window[i],
                        self.ropes[a.layer_rope[i]]) for i in self.layer_ids]
        if shard.is_first_layer:
            self.embed = get("embed", (a.vocab_size, a.hidden_size))
        if shard.is_last_layer:
            self.output_norm = get("output_norm", (a.hidden_size,))
            if shard.is_first_layer and tensors.get("output") is tensors.get("embed"):
                self.output = self.embed  # tied head: one copy in memory
            else:
                self.output = get("output", (a.vocab_size, a.hidden_size))
        self.layers = layers
        mx.eval(*[w for layer in layers for w in layer.w.values()],
                *[w for w in (self.embed, self.output_norm, self.output) if w is not None])

    def weight_bytes(self) -> int:
        """Bytes of weights held."""
        arrays = {id(w): w for layer in self.layers for w in layer.w.values()}
        arrays.update({id(w): w for w in (self.embed, self.output_norm, self.output) if w is not None})
        return sum(w.nbytes for w in arrays.values())


#: The layer tensors ``Block`` knows.
_KEYS = frozenset(("attn_norm", "q", "k", "v", "q_bias", "k_bias", "v_bias", "o", "ffn_norm", "gate", "up", "down"))
