"""A sharded Llama transformer in tinygrad, the same math as ``exo.inference.torch.model``.

Architecture: Llama (Touvron et al. 2023, arXiv:2302.13971): pre-norm RMSNorm (Zhang & Sennrich
2019, arXiv:1910.07467), rotary position embeddings (Su et al. 2021, RoFormer, arXiv:2104.09864)
in the HF "rotate half" layout, grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245)
and a SwiGLU feed-forward (Shazeer 2020, arXiv:2002.05202).

A ``ShardedLlama`` holds only layers ``[shard.start_layer, shard.end_layer]``; the token
embedding only on the first shard (looked up on the host, in numpy), the final norm and output
head only on the last.

Compilation. tinygrad runs eagerly at ~1 s of scheduling per layer on this kind of machine, so
every step goes through a ``TinyJit``. The layer is a pure function of its weights
(``block_forward``), so ONE captured graph serves every layer of the shard (weights, KV cache
and hidden states are the graph's inputs) and warming it up costs two eager layers, not two
eager shards. The start position is a symbolic variable, so one graph serves every position of
a KV cache of a given capacity. Two graphs per capacity: a decode step (T = 1) and a prefill
chunk of exactly ``PREFILL_CHUNK`` tokens (shorter chunks are zero-padded; the padded rows write
KV entries past the real tokens, which the causal mask hides and later tokens overwrite).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tinygrad import Tensor, TinyJit, UOp, dtypes

from exo.inference.shard import Shard
from exo.models.llama import LlamaArgs

INITIAL_CACHE_CAPACITY = 256  # tokens; a request's KV cache doubles from here
PREFILL_CHUNK = 16  # tokens per prefill graph call

# HF names of one layer's weights, in the order block_forward takes them.
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


def layer_weight_shapes(args: LlamaArgs) -> dict[str, tuple[int, ...]]:
    """Shape of each of ``LAYER_WEIGHTS`` ((out, in) for projections, as in HF checkpoints)."""
    h, i, hd = args.hidden_size, args.intermediate_size, args.head_dim
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (args.n_heads * hd, h),
        "self_attn.k_proj.weight": (args.n_kv_heads * hd, h),
        "self_attn.v_proj.weight": (args.n_kv_heads * hd, h),
        "self_attn.o_proj.weight": (h, args.n_heads * hd),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }


class KVCache:
    """Keys and values of one request for every layer of the shard.

    ``kv[i]``: float32 tensor (2, 1, n_kv_heads, capacity, head_dim) of the shard's i-th layer
    (0: keys, 1: values); ``offset`` tokens are filled. Capacity (tokens) grows by doubling,
    with a copy, up to ``max_capacity``.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, max_capacity: int):
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.capacity, self.max_capacity = min(capacity, max_capacity), max_capacity
        self.kv = [Tensor.zeros(2, 1, n_kv_heads, capacity, head_dim, dtype=dtypes.float32).contiguous().realize()
                   for _ in range(n_layers)]
        self.offset = 0

    def reserve(self, n_tokens: int) -> None:
        """Make room for ``n_tokens`` in total, doubling the capacity as often as needed.

        Raises:
            ValueError: more than ``max_capacity`` tokens.
        """
        if n_tokens <= self.capacity:
            return
        if n_tokens > self.max_capacity:
            raise ValueError(f"{n_tokens} tokens exceed the KV cache's maximum of {self.max_capacity}")
        cap = self.capacity
        while cap < n_tokens:
            cap *= 2
        cap = min(cap, self.max_capacity)
        pad = ((0, 0), (0, 0), (0, 0), (0, cap - self.capacity), (0, 0))
        self.kv = [c.pad(pad).contiguous().realize() for c in self.kv]
        self.capacity = cap

    def nbytes(self) -> int:
        return len(self.kv) * 2 * self.n_kv_heads * self.capacity * self.head_dim * 4


def rope_tables(head_dim: int, theta: float, length: int) -> tuple[Tensor, Tensor]:
    """RoPE cos, sin tables (length, head_dim) float32, computed in float64 like the torch engine."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = np.outer(np.arange(length, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return Tensor(np.cos(emb).astype(np.float32)).realize(), Tensor(np.sin(emb).astype(np.float32)).realize()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight."""
    return x * (x.square().mean(-1, keepdim=True) + eps).rsqrt() * weight


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return (-x2).cat(x1, dim=-1)


def block_forward(h: Tensor, start_pos: int | UOp, cache: Tensor, cos: Tensor, sin: Tensor, eps: Tensor,
                  ln1: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, wo: Tensor,
                  ln2: Tensor, wg: Tensor, wu: Tensor, wd: Tensor) -> Tensor:
    """One Llama layer: ``h + attn(norm(h))``, then ``+ mlp(norm(.))``.

    h: (1, T, hidden) float32; cache: (2, 1, n_kv, capacity, head_dim), written at
    ``[start_pos, start_pos + T)``; cos, sin: the whole RoPE tables (max_len, head_dim); eps: the
    RMSNorm epsilon as a 1-element tensor (a graph input, so layers of any model share the graph).
    Returns the layer's output (1, T, hidden), realized.
    """
    b, t, _ = h.shape
    head_dim = cos.shape[-1]
    n_heads, n_kv = wq.shape[0] // head_dim, wk.shape[0] // head_dim
    x = rms_norm(h, ln1, eps)
    q = x.linear(wq.T).reshape(b, t, n_heads, head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
    k = x.linear(wk.T).reshape(b, t, n_kv, head_dim).transpose(1, 2)  # (B, n_kv, T, head_dim)
    v = x.linear(wv.T).reshape(b, t, n_kv, head_dim).transpose(1, 2)
    c, s = cos[start_pos:start_pos + t], sin[start_pos:start_pos + t]  # (T, head_dim)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    cache[:, :, :, start_pos:start_pos + t, :].assign(Tensor.stack(k, v)).realize()
    keys = cache[0, :, :, 0:start_pos + t, :]  # (B, n_kv, start_pos + T, head_dim)
    values = cache[1, :, :, 0:start_pos + t, :]
    mask = None
    if t > 1:  # query i sees keys [0, start_pos + i]
        mask = Tensor.full((1, 1, t, start_pos + t), float("-inf"), dtype=h.dtype).triu(start_pos + 1)
    attn = q.scaled_dot_product_attention(keys, values, attn_mask=mask, enable_gqa=True)  # (B, n_heads, T, head_dim)
    h = h + attn.transpose(1, 2).reshape(b, t, n_heads * head_dim).linear(wo.T)
    x = rms_norm(h, ln2, eps)
    return (h + (x.linear(wg.T).silu() * x.linear(wu.T)).linear(wd.T)).realize()


def head_forward(h: Tensor, eps: Tensor, norm: Tensor, lm_head: Tensor) -> Tensor:
    """Final norm and output head: h (1, 1, hidden) -> logits (1, vocab) float32, realized."""
    return rms_norm(h[:, 0, :], norm, eps).linear(lm_head.T).realize()


class ShardedLlama:
    """Layers ``[shard.start_layer, shard.end_layer]`` of a Llama model in tinygrad.

    ``__call__(x, cache)``:
        x: token ids (1, T) int on the first shard, else hidden states (1, T, hidden) float32.
        cache: the request's ``KVCache``; ``cache.offset`` tokens already in it.
    Returns numpy float32: hidden states (1, T, hidden), or on the last shard the logits of the
    last position (vocab,).

    Not thread-safe: tinygrad's state is global; call from one thread.
    """

    def __init__(self, args: LlamaArgs, shard: Shard):
        if shard.n_layers != args.n_layers:
            raise ValueError(f"shard has n_layers={shard.n_layers} but the model has {args.n_layers}")
        self.args, self.shard = args, shard
        self.embed_tokens: np.ndarray | None = None  # (vocab, hidden), looked up on the host
        self.layers: list[tuple[Tensor, ...]] = []  # per layer, weights in LAYER_WEIGHTS order
        self.norm: Tensor | None = None
        self.lm_head: Tensor | None = None  # (vocab, hidden)
        self.eps = Tensor([args.rms_norm_eps], dtype=dtypes.float32).realize()
        self.cos, self.sin = rope_tables(args.head_dim, args.rope_theta, args.max_seq_len + PREFILL_CHUNK)
        self._jits: dict[tuple[str, int], TinyJit] = {}  # (kind, KV cache capacity) -> graph
        self._const_inputs: list[tuple[UOp, ...]] = []  # per layer: buffers of the graph's inputs after h and kv
        self._head_jit = TinyJit(head_forward)

    def new_cache(self) -> KVCache:
        # prefill chunks are padded to PREFILL_CHUNK tokens: the cache (and RoPE tables) hold that much past the context
        return KVCache(self.shard.n_shard_layers, self.args.n_kv_heads, self.args.head_dim, INITIAL_CACHE_CAPACITY,
                       self.args.max_seq_len + PREFILL_CHUNK)

    def _graph(self, kind: str, capacity: int) -> TinyJit:
        jit = self._jits.get((kind, capacity))
        if jit is None:
            jit = self._jits[(kind, capacity)] = TinyJit(block_forward)
        return jit

    def _layers(self, h: Tensor, position: int, t: int, cache: KVCache) -> Tensor:
        """Run every layer on h (1, t, hidden), t being 1 or PREFILL_CHUNK, at ``position``."""
        kind = "decode" if t == 1 else "prefill"
        jit = self._graph(kind, cache.capacity)
        pos = UOp.variable("start_pos", 0, cache.capacity - t).bind(position)
        for i, (weights, kv) in enumerate(zip(self.layers, cache.kv)):
            if jit.captured is not None and jit.cnt >= 2:
                # replay the captured graph directly: TinyJit's own argument checks cost ~0.4 ms per
                # input on every call, and the inputs are the same realized buffers in the same order
                h = jit.captured([h.uop.base, kv.uop.base, *self._const_inputs[i]], {"start_pos": position})
                continue
            h = jit(h, pos, kv, self.cos, self.sin, self.eps, *weights)
        return h

    def __call__(self, x: np.ndarray, cache: KVCache) -> np.ndarray:
        position, t = cache.offset, x.shape[1]
        if self.embed_tokens is not None:
            hidden = self.embed_tokens[np.asarray(x[0], dtype=np.int64)][None]  # (1, T, hidden)
        else:
            hidden = np.asarray(x, dtype=np.float32)
        if t == 1:
            cache.reserve(position + 1)
            out = self._layers(Tensor(np.ascontiguousarray(hidden, dtype=np.float32)).realize(), position, 1, cache).numpy()
        else:
            outs = []
            for start in range(0, t, PREFILL_CHUNK):
                n = min(PREFILL_CHUNK, t - start)
                cache.reserve(position + start + PREFILL_CHUNK)
                chunk = np.zeros((1, PREFILL_CHUNK, self.args.hidden_size), dtype=np.float32)
                chunk[:, :n] = hidden[:, start:start + n]
                # .numpy() copies out: a captured graph reuses its output buffer on the next call
                outs.append(self._layers(Tensor(chunk).realize(), position + start, PREFILL_CHUNK, cache).numpy()[:, :n])
            out = np.concatenate(outs, axis=1)
        cache.offset = position + t
        if self.lm_head is None:
            return out
        last = Tensor(np.ascontiguousarray(out[:, -1:])).realize()
        return self._head_jit(last, self.eps, self.norm, self.lm_head).numpy()[0]

    def load_tensors(self, tensors: dict[str, Any]) -> None:
        """Load HF-named float32 arrays (layer names global, e.g. ``layers.17.mlp.up_proj.weight``).

        Raises:
            KeyError: a weight of the shard has no tensor (named in the message).
            ValueError: a tensor's shape differs from the weight's (both named).
        """
        a, shard = self.args, self.shard

        def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
            if name not in tensors:
                raise KeyError(f"no weights for {name!r}")
            arr = tensors[name]
            if tuple(arr.shape) != tuple(shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
            return np.ascontiguousarray(arr, dtype=np.float32)

        shapes = layer_weight_shapes(a)
        layers = [tuple(Tensor(get(f"layers.{i}.{n}", shapes[n])) for n in LAYER_WEIGHTS)
                  for i in range(shard.start_layer, shard.end_layer + 1)]
        if shard.is_first_layer:
            self.embed_tokens = get("embed_tokens.weight", (a.vocab_size, a.hidden_size))
        if shard.is_last_layer:
            self.norm = Tensor(get("norm.weight", (a.hidden_size,)))
            self.lm_head = Tensor(get("lm_head.weight", (a.vocab_size, a.hidden_size)))
        self.layers = layers
        Tensor.realize(*[w for ws in layers for w in ws], *[w for w in (self.norm, self.lm_head) if w is not None])
        self._const_inputs = [(self.cos.uop.base, self.sin.uop.base, self.eps.uop.base, *[w.uop.base for w in ws]) for ws in layers]

    def weight_bytes(self) -> int:
        """Bytes of weights held (device tensors plus the host embedding)."""
        total = sum(w.nbytes() for ws in self.layers for w in ws)
        total += sum(w.nbytes() for w in (self.norm, self.lm_head) if w is not None)
        return total + (self.embed_tokens.nbytes if self.embed_tokens is not None else 0)
