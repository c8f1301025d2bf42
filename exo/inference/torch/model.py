"""A sharded decoder-only transformer in plain PyTorch, built from ``exo.models.architectures``.

One block serves every architecture (the module docstring of ``exo.models.architectures`` lists
the variants): pre-norm RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467), rotary position
embeddings (Su et al. 2021, RoFormer, arXiv:2104.09864) in the HF "rotate half" layout over the
first ``rope_dim`` dimensions of each head, grouped-query attention (Ainslie et al. 2023,
arXiv:2305.13245), causal or sliding-window (Beltagy et al. 2020, Longformer, arXiv:2004.05150),
and a gated feed-forward, SwiGLU or GeGLU (Shazeer 2020, arXiv:2002.05202); with the switches
of ``BlockVariant``: q/k/v bias, per-head QK norm, Gemma's post-attention and post-FFN norms.

The layers are in ``exo.inference.torch.layers``. A ``ShardedTransformer`` holds only layers ``[shard.start_layer, shard.end_layer]``; the token
embedding only on the first shard, the final norm and output head only on the last. Each weight
matrix is either dense (``nn.Linear``, any dtype, any device) or held in its checkpoint's own
format by the native CPU kernels (``GGUFLinear``: GGUF blocks, or F32/F16/BF16 rows), and a
whole shard's decode step then runs in one native call (``decode_layers``).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from exo.inference.shard import Shard
from exo.inference.torch.gguf_weights import KERNEL_MAX_ROWS, WIDENED, GGUFEmbedding, GGUFLinear, held_type, kernel_supports, widen_rows
from exo.models.architectures import LAYER_KEYS, ModelArgs, layer_name, parse_layer_name
from exo.models.gguf import F32
from exo.models.weights import QuantizedRows
from exo.inference.torch.layers import (
    ACTIVATIONS, KV_BLOCK, KVCache, RMSNorm, RotaryEmbedding, TransformerBlock, linear_layer,
)

def native_weight_types(args: ModelArgs, shard: Shard, stored: Mapping[str, int]) -> dict[str, int]:
    """The GGML type each weight matrix of ``shard`` is held in by the native kernels: its
    checkpoint's type where the kernels take it (``kernel_supports``; or the wider type of the
    same weights that ``held_type`` prefers on this CPU), else F32 (the reader dequantizes it).
    ``stored``: canonical name -> the checkpoint's GGML type. Matrices whose shape the kernels
    cannot tile are left out (held dense)."""
    shapes = args.layer_shapes()
    out: dict[str, int] = {}
    names = [layer_name(i, k) for i in range(shard.start_layer, shard.end_layer + 1) for k in ("q", "k", "v", "o", "gate", "up", "down")]
    globals_ = [("embed", (args.vocab_size, args.hidden_size))] if shard.is_first_layer or (shard.is_last_layer and args.tie_word_embeddings) else []
    if shard.is_last_layer and not args.tie_word_embeddings:
        globals_.append(("output", (args.vocab_size, args.hidden_size)))
    for name, shape in [(n, shapes[parse_layer_name(n)[1]]) for n in names] + globals_:
        qtype = stored.get(name)
        if qtype is None:
            continue
        if kernel_supports(qtype, *shape):
            out[name] = held_type(qtype) if kernel_supports(held_type(qtype), *shape) else qtype
        elif kernel_supports(F32, *shape):
            out[name] = F32
    return out


class ShardedTransformer(nn.Module):
    """Layers ``[shard.start_layer, shard.end_layer]`` of a model described by ``args``.

    ``forward(x, caches, position)`` (prefill, or one step of one request):
        x: token ids (B, T) int64 on the first shard, else hidden states (B, T, hidden).
        caches: one ``KVCache`` per layer of the shard.
        position: tokens already in the caches.
    ``decode(x, caches, positions)`` (one decode step of B independent requests):
        x: (B, 1) token ids or (B, 1, hidden) hidden states, one row per request;
        caches[i]: the per-layer caches of request i; positions[i]: its tokens so far.
    Both return hidden states (B, T, hidden), or on the last shard the logits of the last
    position (B, vocab) in float32.

    ``batch_invariant`` (default True): ``decode`` computes each request's row exactly as it
    computes that request alone (B = 1), bit for bit, so that a seeded request samples the same
    tokens at any load. The native path keeps every product of a batch on the float32 kernels,
    whose per-row sums run in the same order for any number of rows (never the AMX tile path,
    whose bfloat16 split of the activations differs from the single-row arithmetic in the last
    bits); any other path (dense or int4 weights, CUDA, a shard not wholly native) runs the
    requests of a batch one after another, since BLAS libraries choose their blocking, and so
    their summation order, by the number of rows. False: batched products take the faster
    paths (AMX from ``amx_rows()`` rows; one BLAS call for the batch), and a request's logits
    may then differ in the last bits with the batch it runs in.

    ``weight_types``: canonical name -> GGML type of each weight matrix (and the embedding /
    output head) held natively (``GGUFLinear`` / ``GGUFEmbedding``, float32 compute on the
    CPU, see ``native_weight_types``); every matrix not named is dense. When every layer
    matrix is native, ``decode`` runs all layers in one ``torch.ops.exo_gguf.decode_layers``
    call. A tied head shares the embedding's storage when both are held.

    Raises:
        ValueError: ``shard`` is of a model with another number of layers; a GGML type or a
            matrix shape the kernels do not support.
    """

    def __init__(self, args: ModelArgs, shard: Shard, weight_types: Mapping[str, int] | None = None):
        super().__init__()
        if shard.n_layers != args.n_layers:
            raise ValueError(f"shard has n_layers={shard.n_layers} but the model has {args.n_layers}")
        self.args, self.shard = args, shard
        self.weight_types = dict(weight_types or {})
        wt = self.weight_types
        if not shard.is_first_layer:
            self.embed_tokens = None
        elif "embed" in wt:
            self.embed_tokens = GGUFEmbedding(args.vocab_size, args.hidden_size, wt["embed"])
        else:
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            TransformerBlock(args, i, {k: wt.get(layer_name(i, k)) for k in ("q", "k", "v", "o", "gate", "up", "down")})
            for i in range(shard.start_layer, shard.end_layer + 1))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps) if shard.is_last_layer else None
        head_type = wt.get("embed" if args.tie_word_embeddings else "output")
        self.lm_head = linear_layer(args.hidden_size, args.vocab_size, head_type) if shard.is_last_layer else None
        self.rotary = [RotaryEmbedding(r, args.rope_dim) for r in args.ropes]
        # float32's rounding of the factor, as HF's float32 scale tensor (Gemma: sqrt(hidden))
        self._embed_scale = float(np.float32(args.embed_scale)) if args.embed_scale != 1.0 else None
        self._native_cache: list[torch.Tensor] | None = None
        self.batch_invariant = True
        self.tie_weights()

    @property
    def native_decode(self) -> bool:
        """Every layer matrix is held by the native kernels: decode runs in one native call."""
        return len(self.layers) > 0 and all(isinstance(m, GGUFLinear) for layer in self.layers for m in layer.matrices())

    def tie_weights(self) -> None:
        """Share the embedding with the output head when tied and both are here (call again
        after ``to_empty``, which allocates each parameter separately)."""
        self._native_cache = None
        if not self.args.tie_word_embeddings or self.embed_tokens is None or self.lm_head is None:
            return
        if isinstance(self.lm_head, nn.Linear) and isinstance(self.embed_tokens, nn.Embedding):
            self.lm_head.weight = self.embed_tokens.weight
        elif isinstance(self.lm_head, GGUFLinear) and isinstance(self.embed_tokens, GGUFEmbedding):
            self.lm_head.tiles = self.embed_tokens.tiles

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].attn_norm.weight.dtype

    def new_caches(self, batch: int = 1, capacity: int = KV_BLOCK) -> list[KVCache]:
        p = self.layers[0].attn_norm.weight
        return [KVCache(batch, self.args.n_kv_heads, self.args.head_dim, p.dtype, p.device, capacity) for _ in self.layers]

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is None:
            return x.to(self.dtype)
        h = self.embed_tokens(x)  # (B, T, hidden)
        if self._embed_scale is not None:
            h = h * self._embed_scale
        return h

    def _head(self, h: torch.Tensor, rows_apart: bool = False) -> torch.Tensor:
        """Logits (B, vocab) float32 of the last position of h (B, T, hidden), or h itself off
        the last shard. ``rows_apart``: the B rows are requests that must each get the logits
        they get alone (``batch_invariant``)."""
        if self.lm_head is None:
            return h
        x = self.norm(h[:, -1, :])  # (B, hidden)
        if rows_apart:  # whatever B, so that one row and a batch take the same path
            if isinstance(self.lm_head, GGUFLinear) and x.shape[0] <= KERNEL_MAX_ROWS:
                return self.lm_head(x, allow_amx=False).float()  # rows computed apart by the kernel
            if x.shape[0] > 1:
                return torch.cat([self.lm_head(x[i:i + 1].clone()) for i in range(x.shape[0])]).float()
        return self.lm_head(x).float()  # (B, vocab)

    def forward(self, x: torch.Tensor, caches: list[KVCache], position: int, final_hidden: bool = False) -> torch.Tensor:
        """See the class docstring. ``final_hidden`` (an embedding request): the last shard
        returns the final-normed hidden states of every position (B, T, hidden) in the model's
        dtype instead of logits; the native decode step is never taken for it."""
        if self.native_decode and x.shape[:2] == (1, 1) and not final_hidden:  # one token: the native decode step
            return self.decode(x, [caches], [position])
        h = self._embed(x)
        tables = [r(position, h.shape[1], h.dtype, h.device) for r in self.rotary]  # (T, 1, rope_dim) each
        for layer, cache in zip(self.layers, caches):
            cos, sin = tables[layer.self_attn.rope_index]
            h = layer(h, cos, sin, cache)
        if final_hidden:
            return self.norm(h) if self.norm is not None else h  # (B, T, hidden)
        return self._head(h)

    def decode(self, x: torch.Tensor, caches: list[list[KVCache]], positions: list[int]) -> torch.Tensor:
        if not len(caches) == len(positions) == x.shape[0] or x.shape[1] != 1:
            raise ValueError(f"decode takes one token per request: x {tuple(x.shape)}, {len(caches)} caches, {len(positions)} positions")
        b = x.shape[0]
        native = self.native_decode and self.dtype == torch.float32 and x.device.type == "cpu"
        if self.batch_invariant and b > 1 and not native:  # each request as it runs alone
            return torch.cat([self.decode(x[i:i + 1], [caches[i]], [positions[i]]) for i in range(b)])
        h = self._embed(x)  # (B, 1, hidden)
        tables = [r.at(positions, h.dtype, h.device) for r in self.rotary]  # (B, 1, 1, rope_dim) each
        if native:
            return self._head(self._decode_layers(h, tables, caches), rows_apart=self.batch_invariant)
        for layer, layer_caches in zip(self.layers, zip(*caches)):
            cos, sin = tables[layer.self_attn.rope_index]
            h = layer.decode(h, cos, sin, layer_caches)
        return self._head(h)

    def _decode_layers(self, h: torch.Tensor, tables: list[tuple[torch.Tensor, torch.Tensor]],
                       caches: list[list[KVCache]]) -> torch.Tensor:
        """Every layer's decode step in one native call (``torch.ops.exo_gguf.decode_layers``,
        the arithmetic of ``TransformerBlock.decode``): h (B, 1, hidden) float32, ``tables``
        each rope set's (cos, sin) (B, 1, 1, rope_dim), ``caches[i]`` request i's per-layer
        caches. Appends to the caches. With ``batch_invariant`` no product takes the AMX path."""
        b = h.shape[0]
        a = self.args
        layer_caches = [c for per_layer in zip(*caches) for c in per_layer]  # layer-major
        for c in layer_caches:
            c.reserve(c.offset + 1)
        weights, qtypes = self._native_weights()
        first = self.shard.start_layer
        out = torch.ops.exo_gguf.decode_layers(
            h, weights, qtypes, [c.reshape(b, -1) for c, _ in tables], [s.reshape(b, -1) for _, s in tables],
            list(a.layer_rope[first:first + len(self.layers)]), list(a.layer_window[first:first + len(self.layers)]),
            [c.k for c in layer_caches], [c.v for c in layer_caches], [c.offset for c in layer_caches],
            a.n_heads, a.n_kv_heads, a.head_dim, a.rope_dim, a.rms_norm_eps, a.attn_scale, ACTIVATIONS[a.block.activation],
            not self.batch_invariant)
        for c in layer_caches:
            c.offset += 1
        return out

    def _native_weights(self) -> tuple[list[torch.Tensor], list[int]]:
        """The layers' weights in ``decode_layers``' slot order (``LAYER_KEYS``, 16 per layer, an
        empty tensor for a slot the layer lacks) and each slot's GGML type (-1 for vectors).
        Cached; ``_apply`` (``to``, ``to_empty``) and ``tie_weights`` drop the cache."""
        if self._native_cache is None:
            empty = torch.empty(0)
            weights: list[torch.Tensor] = []
            qtypes: list[int] = []
            for layer in self.layers:
                att, mlp = layer.self_attn, layer.mlp
                q, kv = self.args.q_rows, self.args.kv_rows
                bias = att.qkv_bias.detach() if att.qkv_bias is not None else None
                if att.fused:
                    qkv = [att.qkv_proj, None, None]
                    biases = [bias, None, None]
                else:
                    qkv = [att.q_proj, att.k_proj, att.v_proj]
                    biases = [bias[:q], bias[q:q + kv], bias[q + kv:]] if bias is not None else [None] * 3
                gate_up = [mlp.gate_up_proj, None] if mlp.fused else [mlp.gate_proj, mlp.up_proj]
                slots = {
                    "attn_norm": layer.attn_norm.weight, "q": qkv[0], "k": qkv[1], "v": qkv[2], "q_bias": biases[0],
                    "k_bias": biases[1], "v_bias": biases[2], "q_norm": att.q_norm.weight if att.q_norm is not None else None,
                    "k_norm": att.k_norm.weight if att.k_norm is not None else None, "o": att.o_proj,
                    "attn_post_norm": layer.attn_post_norm.weight if layer.attn_post_norm is not None else None,
                    "ffn_norm": layer.ffn_norm.weight, "gate": gate_up[0], "up": gate_up[1], "down": mlp.down_proj,
                    "ffn_post_norm": layer.ffn_post_norm.weight if layer.ffn_post_norm is not None else None,
                }
                for key in LAYER_KEYS:
                    v = slots[key]
                    if isinstance(v, GGUFLinear):
                        weights.append(v.tiles)
                        qtypes.append(v.qtype)
                    else:
                        weights.append(empty if v is None else v.detach().contiguous())
                        qtypes.append(-1)
            self._native_cache = (weights, qtypes)
        return self._native_cache

    def _apply(self, fn, recurse=True):
        self._native_cache = None
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ loading

    def _targets(self) -> dict[str, tuple[nn.Module | nn.Parameter, int]]:
        """Canonical tensor name -> (where it goes: a native module or a parameter, first row).

        The explicit mapping of checkpoint tensors onto this model, fused projections included.
        A tied head that shares the embedding here takes no tensor of its own."""
        a = self.args
        q, kv, i_rows = a.q_rows, a.kv_rows, a.intermediate_size
        out: dict[str, tuple[nn.Module | nn.Parameter, int]] = {}

        def target(m: nn.Module) -> nn.Module | nn.Parameter:
            return m if isinstance(m, (GGUFLinear, GGUFEmbedding)) else m.weight

        if self.embed_tokens is not None:
            out["embed"] = (target(self.embed_tokens), 0)
        for local, layer in enumerate(self.layers):
            i = self.shard.start_layer + local
            att, mlp = layer.self_attn, layer.mlp
            n = lambda key: layer_name(i, key)  # noqa: E731
            out[n("attn_norm")] = (layer.attn_norm.weight, 0)
            if att.fused:
                out[n("q")], out[n("k")], out[n("v")] = (target(att.qkv_proj), 0), (target(att.qkv_proj), q), (target(att.qkv_proj), q + kv)
            else:
                out[n("q")], out[n("k")], out[n("v")] = (target(att.q_proj), 0), (target(att.k_proj), 0), (target(att.v_proj), 0)
            if att.qkv_bias is not None:
                out[n("q_bias")], out[n("k_bias")], out[n("v_bias")] = (att.qkv_bias, 0), (att.qkv_bias, q), (att.qkv_bias, q + kv)
            if att.q_norm is not None:
                out[n("q_norm")], out[n("k_norm")] = (att.q_norm.weight, 0), (att.k_norm.weight, 0)
            out[n("o")] = (target(att.o_proj), 0)
            if layer.attn_post_norm is not None:
                out[n("attn_post_norm")] = (layer.attn_post_norm.weight, 0)
            out[n("ffn_norm")] = (layer.ffn_norm.weight, 0)
            if mlp.fused:
                out[n("gate")], out[n("up")] = (target(mlp.gate_up_proj), 0), (target(mlp.gate_up_proj), i_rows)
            else:
                out[n("gate")], out[n("up")] = (target(mlp.gate_proj), 0), (target(mlp.up_proj), 0)
            out[n("down")] = (target(mlp.down_proj), 0)
            if layer.ffn_post_norm is not None:
                out[n("ffn_post_norm")] = (layer.ffn_post_norm.weight, 0)
        if self.norm is not None:
            out["output_norm"] = (self.norm.weight, 0)
        if self.lm_head is not None and not self._head_shares_embedding():
            out["output"] = (target(self.lm_head), 0)
        return out

    def load_weights(self, chunks: Iterable[tuple[str, tuple[int, ...], int, "np.ndarray | QuantizedRows"]]) -> None:
        """Copy checkpoint tensors, a block of rows at a time, into the parameters (converting to
        their dtype and device), so no second full copy of the weights is ever held.

        ``chunks`` yields ``(name, shape, row, block)`` as ``ModelWeights.iter_shard``: canonical
        name, the tensor's full shape, the first row of ``block`` (float32 ``(rows,) +
        shape[1:]``, or for a matrix held natively in its file's type a ``QuantizedRows``).
        Tensors this shard does not hold are skipped.

        Raises:
            KeyError: a tensor of the shard got no (or partial) weights (named in the message).
            ValueError: a tensor's shape or GGML type differs from where it goes (both named).
        """
        targets = self._targets()
        filled = dict.fromkeys(targets, 0)
        with torch.no_grad():
            for name, shape, row, block in chunks:
                if name not in targets:
                    continue
                dest, base = targets[name]
                n = block.shape[0]
                if isinstance(dest, (GGUFLinear, GGUFEmbedding)):
                    if tuple(shape[1:]) != (dest.cols,) or base + shape[0] > dest.rows:
                        raise ValueError(f"tensor {name!r} has shape {tuple(shape)}, which does not fit a ({dest.rows}, {dest.cols}) matrix")
                    if not isinstance(block, QuantizedRows):  # dequantized by the reader: held as F32 rows
                        if dest.qtype != F32:
                            raise ValueError(f"tensor {name!r} came as float32 rows, but it is held in GGML type {dest.qtype}")
                        dest.load_rows(base + row, np.ascontiguousarray(block, dtype=np.float32))
                    elif block.qtype == dest.qtype:
                        dest.load_rows(base + row, block.data)
                    elif WIDENED.get(block.qtype) == dest.qtype:  # the same weights in a wider type
                        dest.load_rows(base + row, widen_rows(block.qtype, dest.qtype, block.data))
                    else:
                        raise ValueError(f"tensor {name!r} is GGML type {block.qtype}, but it is held in GGML type {dest.qtype}")
                else:
                    if isinstance(block, QuantizedRows):
                        raise ValueError(f"tensor {name!r} came as GGML type {block.qtype} blocks, but it is held dense")
                    if tuple(shape[1:]) != tuple(dest.shape[1:]) or base + shape[0] > dest.shape[0]:
                        raise ValueError(f"tensor {name!r} has shape {tuple(shape)}, which does not fit {tuple(dest.shape)}")
                    dest[base + row:base + row + n].copy_(torch.from_numpy(np.asarray(block)))
                filled[name] += n
        for name, (dest, _) in targets.items():
            parsed = parse_layer_name(name)
            rows = self._rows(name, parsed)
            if filled[name] != rows:
                raise KeyError(f"no weights for {name!r}" if not filled[name] else f"only {filled[name]} of {rows} rows of {name!r}")
        self._native_cache = None

    def _rows(self, name: str, parsed: tuple[int, str] | None) -> int:
        a = self.args
        if parsed is None:
            return a.hidden_size if name == "output_norm" else a.vocab_size
        return a.layer_shapes()[parsed[1]][0]

    def _head_shares_embedding(self) -> bool:
        if self.embed_tokens is None or self.lm_head is None:
            return False
        if isinstance(self.lm_head, GGUFLinear):
            return isinstance(self.embed_tokens, GGUFEmbedding) and self.lm_head.tiles is self.embed_tokens.tiles
        return self.lm_head.weight is getattr(self.embed_tokens, "weight", None)

    def load_tensors(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Load whole float32 arrays by canonical name; see ``load_weights``."""
        self.load_weights((name, arr.shape, 0, arr) for name, arr in tensors.items())


__all__ = ["ShardedTransformer", "native_weight_types"]
