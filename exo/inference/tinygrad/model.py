"""A sharded decoder-only transformer in tinygrad, built from a ``ModelArgs``: the block of
``exo.models.architectures`` (Llama, Touvron et al. 2023, arXiv:2302.13971) with the switches
this engine implements: bias on q, k, v (Qwen2) and sliding-window attention per layer
(Mistral). Pre-norm RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467), rotary position
embeddings (Su et al. 2021, RoFormer, arXiv:2104.09864) in the HF "rotate half" layout with the
frequencies of ``Rope.inv_freq`` (Llama 3.1 scaling included), grouped-query attention (Ainslie
et al. 2023, arXiv:2305.13245), a SwiGLU feed-forward (Shazeer 2020, arXiv:2002.05202). Float32.

A ``ShardedModel`` holds only layers ``[shard.start_layer, shard.end_layer]``; the token
embedding only on the first shard (looked up on the host, in numpy), the final norm and output
head (the embedding again when tied) only on the last.

Compilation. tinygrad runs eagerly at ~1 s of scheduling per layer on this kind of machine, so
every step goes through a ``TinyJit``. The layer is a pure function of its inputs
(``block_forward``), so ONE captured graph serves every layer of the shard: weights, KV cache,
hidden states, RoPE tables, the RMSNorm epsilon and the attention scale are the graph's inputs,
and so are the symbolic start position and the layer's sliding window (a full-attention layer
gets a window longer than any cache). A model without q/k/v bias gets zero biases, so every
variant runs the same graph. Warming a graph up costs two eager layers, not two eager shards.
One graph serves every position of a KV cache of a given capacity. Two graphs per capacity: a
decode step (T = 1) and a prefill chunk of exactly ``PREFILL_CHUNK`` tokens (shorter chunks
are zero-padded; the padded rows write KV entries past the real tokens, which the causal mask
hides and later tokens overwrite). The graphs live in a process-wide cache keyed by the
layer's shapes (``_GRAPHS``), so another shard of the same model (a new partition), or another
model of the same shapes, starts with them captured.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
from tinygrad import Tensor, TinyJit, UOp, dtypes

from exo.inference.shard import Shard
from exo.models.architectures import ModelArgs, Rope

INITIAL_CACHE_CAPACITY = 256  # tokens; a request's KV cache doubles from here
PREFILL_CHUNK = 16  # tokens per prefill graph call
MAX_GRAPHS = 64  # captured graphs kept per process (least recently used dropped beyond)

#: Captured graphs by what fixes their inputs' shapes: ("layer", kind, KV cache capacity,
#: ``ShardedModel.signature``) or ("head", hidden, vocab). Used from the tinygrad thread only.
_GRAPHS: OrderedDict[tuple, TinyJit] = OrderedDict()


def _graph(key: tuple, fxn) -> TinyJit:
    """The process's graph for ``key``, a new ``TinyJit(fxn)`` the first time."""
    jit = _GRAPHS.get(key)
    if jit is None:
        jit = _GRAPHS[key] = TinyJit(fxn)
        while len(_GRAPHS) > MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    _GRAPHS.move_to_end(key)
    return jit


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


def rope_tables(rope: Rope, head_dim: int, length: int) -> tuple[Tensor, Tensor]:
    """RoPE cos, sin tables (length, head_dim) float32 of ``rope`` over a whole head, computed
    in float64."""
    freqs = np.outer(np.arange(length, dtype=np.float64), rope.inv_freq(head_dim))
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb) * rope.attention_factor, np.sin(emb) * rope.attention_factor
    return Tensor(cos.astype(np.float32)).realize(), Tensor(sin.astype(np.float32)).realize()


def rms_norm(x: Tensor, weight: Tensor, eps: Tensor) -> Tensor:
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight."""
    return x * (x.square().mean(-1, keepdim=True) + eps).rsqrt() * weight


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return (-x2).cat(x1, dim=-1)


def block_forward(h: Tensor, start_pos: int | UOp, window: int | UOp, cache: Tensor, cos: Tensor, sin: Tensor, eps: Tensor,
                  scale: Tensor, attn_norm: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, bq: Tensor, bk: Tensor, bv: Tensor,
                  wo: Tensor, ffn_norm: Tensor, wg: Tensor, wu: Tensor, wd: Tensor) -> Tensor:
    """One layer: ``h + o(attn(norm(h)))``, then ``+ down(silu(gate(.)) * up(.))`` of its norm.

    h: (1, T, hidden) float32; cache: (2, 1, n_kv, capacity, head_dim), written at
    ``[start_pos, start_pos + T)``; window: the layer's sliding window (query p sees keys
    (p - window, p]; longer than the cache for full attention); cos, sin: the layer's whole RoPE
    tables (max_len, head_dim); eps, scale: the RMSNorm epsilon and the attention scale as
    1-element tensors; then the layer's weights (``LAYER_KEYS``; zero biases for a model without).
    Returns the layer's output (1, T, hidden), realized.
    """
    b, t, _ = h.shape
    head_dim = cos.shape[-1]
    n_heads, n_kv = wq.shape[0] // head_dim, wk.shape[0] // head_dim
    x = rms_norm(h, attn_norm, eps)
    q = x.linear(wq.T, bq).reshape(b, t, n_heads, head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
    k = x.linear(wk.T, bk).reshape(b, t, n_kv, head_dim).transpose(1, 2)  # (B, n_kv, T, head_dim)
    v = x.linear(wv.T, bv).reshape(b, t, n_kv, head_dim).transpose(1, 2)
    c, s = cos[start_pos:start_pos + t], sin[start_pos:start_pos + t]  # (T, head_dim)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    cache[:, :, :, start_pos:start_pos + t, :].assign(Tensor.stack(k, v)).realize()
    keys = cache[0, :, :, 0:start_pos + t, :].repeat_interleave(n_heads // n_kv, dim=1)  # (B, n_heads, start_pos + T, head_dim)
    values = cache[1, :, :, 0:start_pos + t, :].repeat_interleave(n_heads // n_kv, dim=1)
    # query i (position start_pos + i) sees key j iff start_pos + i - window < j <= start_pos + i
    query, key = Tensor.arange(t).unsqueeze(-1), Tensor.arange(start_pos + t)  # (T, 1), (start_pos + T,)
    hidden = (query + (start_pos + 1) <= key) | (key <= query + (start_pos - window))  # (T, start_pos + T)
    scores = q.matmul(keys.transpose(-2, -1)) * scale + hidden.where(float("-inf"), 0.0)  # (B, n_heads, T, start_pos + T)
    attn = scores.softmax(-1) @ values  # (B, n_heads, T, head_dim)
    h = h + attn.transpose(1, 2).reshape(b, t, n_heads * head_dim).linear(wo.T)
    x = rms_norm(h, ffn_norm, eps)
    return (h + (x.linear(wg.T).silu() * x.linear(wu.T)).linear(wd.T)).realize()


def head_forward(h: Tensor, eps: Tensor, norm: Tensor, output: Tensor) -> Tensor:
    """Final norm and output head: h (1, 1, hidden) -> logits (1, vocab) float32, realized."""
    return rms_norm(h[:, 0, :], norm, eps).linear(output.T).realize()


class ShardedModel:
    """Layers ``[shard.start_layer, shard.end_layer]`` of the model ``args`` describes, in tinygrad.

    ``__call__(x, cache)``:
        x: token ids (1, T) int on the first shard, else hidden states (1, T, hidden) float32.
        cache: the request's ``KVCache``; ``cache.offset`` tokens already in it.
    Returns numpy float32: hidden states (1, T, hidden), or on the last shard the logits of the
    last position (vocab,).

    Not thread-safe: tinygrad's state is global; call from one thread.
    """

    def __init__(self, args: ModelArgs, shard: Shard):
        if shard.n_layers != args.n_layers:
            raise ValueError(f"shard has n_layers={shard.n_layers} but the model has {args.n_layers}")
        self.args, self.shard = args, shard
        extra = set(args.block.layer_keys()) - set(LAYER_KEYS)
        if extra:
            raise ValueError(f"layers with {sorted(extra)} are not implemented")
        self.layer_ids = range(shard.start_layer, shard.end_layer + 1)
        self.max_len = args.max_seq_len + PREFILL_CHUNK  # prefill chunks are padded: the cache and RoPE tables hold one more
        # per layer; a full-attention layer's window is longer than any cache, so it hides nothing
        self.windows = [min(args.layer_window[i] or self.max_len, self.max_len) for i in self.layer_ids]
        self.embed: np.ndarray | None = None  # (vocab, hidden), looked up on the host
        self.layers: list[tuple[Tensor, ...]] = []  # per layer, weights in LAYER_KEYS order
        self.output_norm: Tensor | None = None
        self.output: Tensor | None = None  # (vocab, hidden)
        self.eps = Tensor([args.rms_norm_eps], dtype=dtypes.float32).realize()
        self.scale = Tensor([args.attn_scale], dtype=dtypes.float32).realize()
        used = sorted({args.layer_rope[i] for i in self.layer_ids})
        tables = {r: rope_tables(args.ropes[r], args.head_dim, self.max_len) for r in used}
        self.rope = [tables[args.layer_rope[i]] for i in self.layer_ids]  # per layer: (cos, sin)
        # what fixes the shapes of a layer graph's inputs, beside the KV cache capacity
        self.signature = (args.hidden_size, args.intermediate_size, args.n_heads, args.n_kv_heads, args.head_dim, self.max_len)
        self._const_inputs: list[tuple[UOp, ...]] = []  # per layer: buffers of the graph's inputs after h and kv

    def new_cache(self) -> KVCache:
        return KVCache(self.shard.n_shard_layers, self.args.n_kv_heads, self.args.head_dim, INITIAL_CACHE_CAPACITY, self.max_len)

    def _layers(self, h: Tensor, position: int, t: int, cache: KVCache) -> Tensor:
        """Run every layer on h (1, t, hidden), t being 1 or PREFILL_CHUNK, at ``position``."""
        kind = "decode" if t == 1 else "prefill"
        jit = _graph(("layer", kind, cache.capacity, self.signature), block_forward)
        pos = UOp.variable("start_pos", 0, cache.capacity - t).bind(position)
        for i, (weights, kv) in enumerate(zip(self.layers, cache.kv)):
            if jit.captured is not None and jit.cnt >= 2:
                # replay the captured graph directly: TinyJit's own argument checks cost ~0.4 ms per
                # input on every call, and the inputs are the same realized buffers in the same order
                h = jit.captured([h.uop.base, kv.uop.base, *self._const_inputs[i]], {"start_pos": position, "window": self.windows[i]})
                continue
            window = UOp.variable("window", 1, self.max_len).bind(self.windows[i])
            cos, sin = self.rope[i]
            h = jit(h, pos, window, kv, cos, sin, self.eps, self.scale, *weights)
        return h

    def __call__(self, x: np.ndarray, cache: KVCache, final_hidden: bool = False) -> np.ndarray:
        """Hidden states (1, T, hidden), or on the last shard the logits (vocab,) of the last
        position; ``final_hidden`` (embeddings): there, the final-normed hidden states (1, T, hidden)."""
        position, t = cache.offset, x.shape[1]
        if self.embed is not None:
            hidden = self.embed[np.asarray(x[0], dtype=np.int64)][None]  # (1, T, hidden)
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
        if self.output is None:
            return out
        if final_hidden:
            return rms_norm(Tensor(np.ascontiguousarray(out, dtype=np.float32)), self.output_norm, self.eps).numpy()
        last = Tensor(np.ascontiguousarray(out[:, -1:])).realize()
        head = _graph(("head", self.args.hidden_size, self.args.vocab_size), head_forward)
        return head(last, self.eps, self.output_norm, self.output).numpy()[0]

    def load_tensors(self, tensors: dict[str, Any]) -> None:
        """Load the shard's float32 arrays by canonical name (``layers.{i}.{key}`` with ``i``
        global, ``embed``, ``output_norm``, ``output``: ``ModelWeights.load_shard``).

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

        shapes = a.layer_shapes()
        zeros = {"q_bias": a.q_rows, "k_bias": a.kv_rows, "v_bias": a.kv_rows}  # a model without biases

        def weight(i: int, key: str) -> Tensor:
            if key in zeros and key not in shapes:
                return Tensor.zeros(zeros[key], dtype=dtypes.float32).contiguous()
            return Tensor(get(f"layers.{i}.{key}", shapes[key]))

        layers = [tuple(weight(i, k) for k in LAYER_KEYS) for i in self.layer_ids]
        if shard.is_first_layer:
            self.embed = get("embed", (a.vocab_size, a.hidden_size))
        if shard.is_last_layer:
            self.output_norm = Tensor(get("output_norm", (a.hidden_size,)))
            self.output = Tensor(get("output", (a.vocab_size, a.hidden_size)))
        self.layers = layers
        Tensor.realize(*[w for ws in layers for w in ws], *[w for w in (self.output_norm, self.output) if w is not None])
        self._const_inputs = [(cos.uop.base, sin.uop.base, self.eps.uop.base, self.scale.uop.base, *[w.uop.base for w in ws])
                              for (cos, sin), ws in zip(self.rope, layers)]

    def weight_bytes(self) -> int:
        """Bytes of weights held (device tensors plus the host embedding)."""
        total = sum(w.nbytes() for ws in self.layers for w in ws)
        total += sum(w.nbytes() for w in (self.output_norm, self.output) if w is not None)
        return total + (self.embed.nbytes if self.embed is not None else 0)


#: A layer's tensors (canonical keys of ``exo.models.architectures``), in the order
#: ``block_forward`` takes them.
LAYER_KEYS = ("attn_norm", "q", "k", "v", "q_bias", "k_bias", "v_bias", "o", "ffn_norm", "gate", "up", "down")
