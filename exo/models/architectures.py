"""Each model architecture described once: its hyper-parameters, its block variant and its tensor
names, independent of any ML framework. Every engine builds its layers from a ``ModelArgs``
and loads tensors by the canonical names below, whatever the checkpoint format.

The block (one transformer layer) of every supported architecture is the pre-norm decoder
layer of Llama (Touvron et al. 2023, arXiv:2302.13971) with switches:

    x = x + post_attn_norm?(attention(attn_norm(x)))     attention: q, k, v (+ bias?),
    x = x + post_ffn_norm?(down(act(gate(h)) * up(h)))    per-head RMSNorm of q and k?, RoPE,
                                                          causal (or sliding-window) GQA, o
    with h = ffn_norm(x)

| architecture | differences from llama                                                    |
|--------------|---------------------------------------------------------------------------|
| llama        | (Llama 3.1+ ``rope_scaling`` "llama3", tied or untied head)               |
| mistral      | sliding-window attention when the config sets ``sliding_window``           |
| qwen2        | bias on q, k, v                                                           |
| qwen3        | per-head RMSNorm of q and k (QK norm) before RoPE; ``head_dim`` explicit  |
| gemma3       | QK norm; four norms per layer (post-attention, post-FFN); GELU (tanh);     |
|              | embedding x sqrt(hidden); 5 of every 6 layers sliding-window with their    |
|              | own RoPE base; attention scale ``query_pre_attn_scalar ** -0.5``; RMSNorm  |
|              | weights stored as ``w`` by HF (applied as 1 + w) and as 1 + w in GGUF      |
| phi3         | fused q/k/v and gate/up projections in the checkpoint; partial rotary;    |
|              | LongRoPE (Phi-3.5 / Phi-4-mini)                                           |

Canonical tensor names: ``layers.{i}.{key}`` for ``key`` in ``LAYER_KEYS`` (``i`` the global
layer index), and ``embed``, ``output_norm``, ``output`` (the head; absent when tied). Norm
weights are the factors applied (Gemma's 1 + w), Q/K rows are in the HF "rotate half" layout,
fused checkpoint tensors are split; matrices are (out_features, in_features).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

#: Per-layer tensors, in the order engines list them.
LAYER_KEYS = ("attn_norm", "q", "k", "v", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm", "o",
              "attn_post_norm", "ffn_norm", "gate", "up", "down", "ffn_post_norm")
#: Per-layer matrices (the weights a quantized format may hold in blocks).
LAYER_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")
GLOBAL_KEYS = ("embed", "output_norm", "output")


class UnsupportedModelError(ValueError):
    """A checkpoint of an architecture (or variant) exo does not implement; the message names it."""


@dataclass(frozen=True)
class BlockVariant:
    """The switches of the transformer block (see the module docstring).

    Attributes:
        qkv_bias: q, k and v projections have a bias.
        qk_norm: RMSNorm over each head of q and of k (weights (head_dim,)) before RoPE.
        sandwich_norm: the attention and FFN outputs are normalized again before the residual
            add (Gemma's post-attention and post-feed-forward norms).
        activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU with the tanh approximation).
    """

    qkv_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False
    activation: str = "silu"

    def layer_keys(self) -> tuple[str, ...]:
        """The ``LAYER_KEYS`` a layer of this variant has."""
        skip = set()
        if not self.qkv_bias:
            skip |= {"q_bias", "k_bias", "v_bias"}
        if not self.qk_norm:
            skip |= {"q_norm", "k_norm"}
        if not self.sandwich_norm:
            skip |= {"attn_post_norm", "ffn_post_norm"}
        return tuple(k for k in LAYER_KEYS if k not in skip)


@dataclass(frozen=True)
class Rope:
    """One set of rotary position embedding (RoPE; Su et al. 2021, RoFormer, arXiv:2104.09864)
    frequencies, HF's "rotate half" layout.

    Attributes:
        theta: the base.
        scaling: "default", "linear" (positions / factor), "llama3" (Llama 3.1's smoothed
            frequency scaling), or "longrope" (Phi-3.5's per-frequency factors; the long ones
            once a sequence passes ``original_max_position_embeddings``).
        factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: as in HF's
            ``rope_scaling``.
        short_factor, long_factor: LongRoPE's per-frequency divisors.
        attention_factor: multiplies cos and sin (LongRoPE's magnitude correction).
        freq_factors: per-frequency divisors given directly (a GGUF's ``rope_freqs`` tensor).
    """

    theta: float = 10000.0
    scaling: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float = 1.0
    freq_factors: tuple[float, ...] | None = None

    def inv_freq(self, rot_dim: int, long: bool = False) -> np.ndarray:
        """Inverse frequencies (rot_dim / 2,) float64; ``long``: LongRoPE's long factors.

        The formulas of transformers' ``modeling_rope_utils`` for the same scaling types.
        """
        inv = 1.0 / (self.theta ** (np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim))
        if self.freq_factors is not None:
            inv = inv / np.asarray(self.freq_factors, dtype=np.float64)
        if self.scaling == "linear":
            inv = inv / self.factor
        elif self.scaling == "llama3":
            old = self.original_max_position_embeddings
            low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            inv = np.where(medium, smoothed, scaled)
        elif self.scaling == "longrope":
            factors = self.long_factor if long else self.short_factor
            if factors is not None:
                inv = inv / np.asarray(factors, dtype=np.float64)
        return inv

    @property
    def switches_to_long(self) -> bool:
        """LongRoPE with distinct long factors: frequencies depend on the sequence length."""
        return self.scaling == "longrope" and self.long_factor is not None and self.long_factor != self.short_factor


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a model, read from its checkpoint (``args_from_gguf``,
    ``args_from_hf_config``). Sizes in elements; lengths in tokens.

    Attributes:
        architecture: one of ``ARCHITECTURES``.
        head_dim: per-head size (explicit in Qwen3, Gemma 3, Mistral Nemo; else hidden / heads).
        rope_dim: dimensions of each head that RoPE rotates (the first ones; < head_dim with
            a partial rotary factor).
        ropes: the RoPE frequency sets; ``layer_rope[i]`` indexes the one layer i uses.
        layer_window: per layer, its sliding window in tokens (a query sees itself and the
            window - 1 keys before it), 0 for full causal attention.
        attn_scale: attention logits scale (1 / sqrt(head_dim) unless the model says otherwise).
        embed_scale: factor of the token embedding (Gemma: sqrt(hidden)).
        tie_word_embeddings: the output head is the embedding matrix.
        max_seq_len: context length.
        bos_token_id, eos_token_ids: from the config (the tokenizer has the final say).
    """

    architecture: str
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    block: BlockVariant = field(default_factory=BlockVariant)
    ropes: tuple[Rope, ...] = (Rope(),)
    layer_rope: tuple[int, ...] = ()
    rope_dim: int = 0
    layer_window: tuple[int, ...] = ()
    attn_scale: float = 0.0
    embed_scale: float = 1.0
    tie_word_embeddings: bool = False
    max_seq_len: int = 8192

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_heads < 1 or self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(f"{self.architecture}: {self.n_heads} heads, {self.n_kv_heads} KV heads and "
                                        f"{self.n_layers} layers do not make a model")
        if not self.layer_rope:
            object.__setattr__(self, "layer_rope", (0,) * self.n_layers)
        if not self.layer_window:
            object.__setattr__(self, "layer_window", (0,) * self.n_layers)
        if not self.rope_dim:
            object.__setattr__(self, "rope_dim", self.head_dim)
        if not self.attn_scale:
            object.__setattr__(self, "attn_scale", 1.0 / math.sqrt(self.head_dim))
        if len(self.layer_rope) != self.n_layers or len(self.layer_window) != self.n_layers:
            raise UnsupportedModelError(f"{self.architecture}: per-layer settings for {len(self.layer_rope)} / "
                                        f"{len(self.layer_window)} layers, the model has {self.n_layers}")
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise UnsupportedModelError(f"{self.architecture}: rotary dimensions {self.rope_dim} do not fit heads of {self.head_dim}")

    @property
    def q_rows(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_rows(self) -> int:
        return self.n_kv_heads * self.head_dim

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each per-layer tensor this model has (``BlockVariant.layer_keys``)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        shapes = {"attn_norm": (h,), "q": (self.q_rows, h), "k": (self.kv_rows, h), "v": (self.kv_rows, h),
                  "q_bias": (self.q_rows,), "k_bias": (self.kv_rows,), "v_bias": (self.kv_rows,), "q_norm": (d,),
                  "k_norm": (d,), "o": (h, self.q_rows), "attn_post_norm": (h,), "ffn_norm": (h,), "gate": (i, h),
                  "up": (i, h), "down": (h, i), "ffn_post_norm": (h,)}
        return {k: shapes[k] for k in self.block.layer_keys()}

    def layer_params(self) -> int:
        """Parameters of one layer."""
        return sum(math.prod(s) for s in self.layer_shapes().values())


@dataclass(frozen=True)
class Architecture:
    """How one architecture's checkpoints name and lay out their tensors.

    Attributes:
        name: exo's name (``ModelArgs.architecture``).
        hf_model_types: ``model_type`` values of its HF ``config.json``.
        gguf_archs: ``general.architecture`` values of its GGUF files.
        block: the block variant.
        hf_layer: canonical key -> HF tensor name within ``layers.{i}.`` (fused phi3
            projections: see ``hf_fused``).
        hf_fused: HF fused tensor -> the canonical keys it stacks, in row order.
        gguf_fused: GGUF fused tensor -> the canonical keys it stacks, in row order.
        gguf_permuted_qk: llama.cpp's converter reordered Q/K rows for its interleaved RoPE
            (llama-architecture GGUFs): undone at load.
        hf_norm_offset: added to HF norm weights (Gemma's RMSNorm multiplies by 1 + w).
    """

    name: str
    hf_model_types: tuple[str, ...]
    gguf_archs: tuple[str, ...]
    block: BlockVariant
    hf_layer: Mapping[str, str]
    hf_fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    gguf_fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    gguf_permuted_qk: bool = False
    hf_norm_offset: float = 0.0


#: GGUF tensor names (llama.cpp's), the same for every architecture; {i}: layer index.
GGUF_LAYER = {
    "attn_norm": "attn_norm.weight", "q": "attn_q.weight", "k": "attn_k.weight", "v": "attn_v.weight",
    "q_bias": "attn_q.bias", "k_bias": "attn_k.bias", "v_bias": "attn_v.bias", "q_norm": "attn_q_norm.weight",
    "k_norm": "attn_k_norm.weight", "o": "attn_output.weight", "attn_post_norm": "post_attention_norm.weight",
    "ffn_norm": "ffn_norm.weight", "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight",
    "ffn_post_norm": "post_ffw_norm.weight",
}
GGUF_GLOBAL = {"embed": "token_embd.weight", "output_norm": "output_norm.weight", "output": "output.weight"}
HF_GLOBAL = {"embed": "embed_tokens.weight", "output_norm": "norm.weight", "output": "lm_head.weight"}

_HF_LLAMA_LAYER = {
    "attn_norm": "input_layernorm.weight", "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight", "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias", "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
    "o": "self_attn.o_proj.weight", "ffn_norm": "post_attention_layernorm.weight", "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight",
}
_HF_GEMMA_LAYER = {**_HF_LLAMA_LAYER, "attn_post_norm": "post_attention_layernorm.weight",
                   "ffn_norm": "pre_feedforward_layernorm.weight", "ffn_post_norm": "post_feedforward_layernorm.weight"}

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("llama", ("llama",), ("llama",), BlockVariant(), _HF_LLAMA_LAYER, gguf_permuted_qk=True),
    Architecture("mistral", ("mistral",), (), BlockVariant(), _HF_LLAMA_LAYER),
    Architecture("qwen2", ("qwen2",), ("qwen2",), BlockVariant(qkv_bias=True), _HF_LLAMA_LAYER),
    Architecture("qwen3", ("qwen3",), ("qwen3",), BlockVariant(qk_norm=True), _HF_LLAMA_LAYER),
    Architecture("gemma3", ("gemma3_text", "gemma3"), ("gemma3",),
                 BlockVariant(qk_norm=True, sandwich_norm=True, activation="gelu_tanh"), _HF_GEMMA_LAYER, hf_norm_offset=1.0),
    Architecture("phi3", ("phi3",), ("phi3",), BlockVariant(), _HF_LLAMA_LAYER,
                 hf_fused={"self_attn.qkv_proj.weight": ("q", "k", "v"), "mlp.gate_up_proj.weight": ("gate", "up")},
                 gguf_fused={"attn_qkv.weight": ("q", "k", "v"), "ffn_up.weight": ("gate", "up")}),
)}


def architecture(name: str) -> Architecture:
    """The description of architecture ``name``.

    Raises:
        UnsupportedModelError: an architecture exo does not implement (the message lists those it does).
    """
    if name not in ARCHITECTURES:
        raise UnsupportedModelError(f"architecture {name!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name]


def layer_name(i: int, key: str) -> str:
    """Canonical name of tensor ``key`` of layer ``i``."""
    return f"layers.{i}.{key}"


_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(\w+)$")


def parse_layer_name(name: str) -> tuple[int, str] | None:
    """``"layers.3.q"`` -> ``(3, "q")``; None for a global tensor."""
    m = _LAYER_NAME.match(name)
    return (int(m[1]), m[2]) if m else None


# ---------------------------------------------------------------------------- GGUF


def _gemma3_window_pattern(n_layers: int, window: int, pattern: int = 6) -> tuple[int, ...]:
    """Gemma 3's layers: every ``pattern``-th is global (full attention), the others slide."""
    return tuple(0 if (i + 1) % pattern == 0 else window for i in range(n_layers))


def args_from_gguf(meta: Mapping[str, Any], tensor_names: set[str] | frozenset[str],
                   tensor_data: Mapping[str, np.ndarray] | None = None) -> ModelArgs:
    """``ModelArgs`` of a GGUF model from its metadata and tensor names.

    Args:
        meta: the metadata (``exo.models.gguf.GGUFModel.metadata``).
        tensor_names: every tensor's GGUF name (variant switches are read from which exist).
        tensor_data: small float32 tensors the RoPE needs when the file has them
            (``rope_freqs.weight``, ``rope_factors_long.weight``, ``rope_factors_short.weight``).

    Raises:
        UnsupportedModelError: an architecture exo does not implement.
        KeyError: a required metadata key is missing (named).
    """
    gguf_arch = meta.get("general.architecture")
    arch = next((a for a in ARCHITECTURES.values() if gguf_arch in a.gguf_archs), None)
    if arch is None:
        raise UnsupportedModelError(f"GGUF architecture {gguf_arch!r} is not supported "
                                    f"(supported: {', '.join(a for x in ARCHITECTURES.values() for a in x.gguf_archs)})")
    p = f"{gguf_arch}."

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        if p + name in meta:
            return meta[p + name]
        if required:
            raise KeyError(f"GGUF metadata key {p + name!r} is missing")
        return default

    tensor_data = tensor_data or {}
    hidden = int(key("embedding_length", required=True))
    n_layers = int(key("block_count", required=True))
    n_heads = int(key("attention.head_count", required=True))
    n_kv = key("attention.head_count_kv", n_heads)
    n_kv = int(n_kv[0] if isinstance(n_kv, list) else n_kv)
    head_dim = int(key("attention.key_length", hidden // n_heads))
    ffn = key("feed_forward_length", required=True)
    ffn = int(ffn[0] if isinstance(ffn, list) else ffn)
    vocab = key("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    if not vocab and "token_embd.weight" not in tensor_names:
        raise KeyError("the GGUF has neither a vocabulary size nor a token embedding")
    theta = float(key("rope.freq_base", 10000.0))
    rope = _gguf_rope(meta, p, theta, tensor_data)
    ropes, layer_rope, windows = (rope,), (0,) * n_layers, (0,) * n_layers
    attn_scale, embed_scale = 0.0, 1.0
    block = arch.block
    if arch.name in ("llama", "qwen2"):
        block = BlockVariant(qkv_bias="blk.0.attn_q.bias" in tensor_names, qk_norm="blk.0.attn_q_norm.weight" in tensor_names)
    if arch.name == "gemma3":
        window = int(key("attention.sliding_window", 0) or 0)
        pattern = key("attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # per layer: true where the layer slides
            windows = tuple(window if s else 0 for s in pattern) if window else windows
        else:
            windows = _gemma3_window_pattern(n_layers, window, int(pattern)) if window else windows
        # llama.cpp: sliding layers use base 10000 without scaling; 27B scales queries by hidden / heads
        ropes = (rope, Rope(theta=10000.0))
        layer_rope = tuple(1 if w else 0 for w in windows)
        attn_scale = 1.0 / math.sqrt(hidden // n_heads if n_layers == 62 else head_dim)
        embed_scale = math.sqrt(hidden)
    elif arch.name == "phi3":
        window = int(key("attention.sliding_window", 0) or 0)
        windows = (window,) * n_layers if window else windows
    rope_dim = int(key("rope.dimension_count", head_dim) or head_dim)
    if "output.weight" in tensor_names:
        tied = False
    else:
        tied = True
    return ModelArgs(
        architecture=arch.name, hidden_size=hidden, intermediate_size=ffn, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim, vocab_size=int(vocab), block=block,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)), ropes=ropes, layer_rope=layer_rope,
        rope_dim=rope_dim, layer_window=windows, attn_scale=attn_scale, embed_scale=embed_scale,
        tie_word_embeddings=tied, max_seq_len=int(key("context_length", 8192)),
    )


def _gguf_rope(meta: Mapping[str, Any], p: str, theta: float, tensor_data: Mapping[str, np.ndarray]) -> Rope:
    scaling = meta.get(p + "rope.scaling.type") or "none"
    factor = float(meta.get(p + "rope.scaling.factor") or 1.0)
    original = int(meta.get(p + "rope.scaling.original_context_length") or 0)
    freqs = tensor_data.get("rope_freqs.weight")
    if freqs is not None:  # Llama 3.1+: the llama3 scaling precomputed as per-frequency divisors
        return Rope(theta=theta, freq_factors=tuple(float(x) for x in np.asarray(freqs).reshape(-1)))
    long, short = tensor_data.get("rope_factors_long.weight"), tensor_data.get("rope_factors_short.weight")
    if long is not None or short is not None:  # Phi-3.5 LongRoPE
        attn = meta.get(p + "rope.scaling.attn_factor")
        return Rope(theta=theta, scaling="longrope", original_max_position_embeddings=original or int(meta.get(p + "context_length", 4096)),
                    short_factor=tuple(float(x) for x in np.asarray(short if short is not None else long).reshape(-1)),
                    long_factor=tuple(float(x) for x in np.asarray(long if long is not None else short).reshape(-1)),
                    attention_factor=float(attn) if attn is not None else 1.0)
    if scaling == "linear" and factor != 1.0:
        return Rope(theta=theta, scaling="linear", factor=factor)
    if scaling not in ("none", "linear"):
        raise UnsupportedModelError(f"RoPE scaling {scaling!r} is not supported")
    return Rope(theta=theta)


# ---------------------------------------------------------------------------- HF config.json


def _hf_rope(params: Mapping[str, Any], config: Mapping[str, Any]) -> Rope:
    """A ``Rope`` from one HF rope parameter set (transformers 5's ``rope_parameters`` entry, or
    a pre-5 config's ``rope_theta`` + ``rope_scaling``)."""
    kind = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    if kind == "default":
        return Rope(theta=theta)
    if kind == "linear":
        return Rope(theta=theta, scaling="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return Rope(theta=theta, scaling="llama3", factor=float(params["factor"]),
                    low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"]),
                    original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    if kind in ("longrope", "su"):
        original = int(params.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
                       or config["max_position_embeddings"])
        factor = params.get("factor") or config["max_position_embeddings"] / original
        attn = params.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return Rope(theta=theta, scaling="longrope", factor=float(factor), original_max_position_embeddings=original,
                    short_factor=tuple(map(float, params["short_factor"])), long_factor=tuple(map(float, params["long_factor"])),
                    attention_factor=float(attn))
    raise UnsupportedModelError(f"RoPE type {kind!r} is not supported (default, linear, llama3, longrope)")


def _hf_rope_params(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The rope parameters of a config, whichever transformers version wrote it."""
    params = config.get("rope_parameters")
    if params is None:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return params


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a config (multimodal checkpoints nest it as ``text_config``)."""
    inner = config.get("text_config")
    if isinstance(inner, Mapping):
        merged = dict(inner)
        merged.setdefault("model_type", config.get("model_type"))
        for k in ("tie_word_embeddings", "eos_token_id", "bos_token_id"):
            if k not in merged and k in config:
                merged[k] = config[k]
        return merged
    return config


def args_from_hf_config(config: Mapping[str, Any]) -> ModelArgs:
    """``ModelArgs`` from a Hugging Face ``config.json`` (decoded).

    Raises:
        UnsupportedModelError: a model type or setting exo does not implement (named).
        KeyError: a required key is missing (named).
    """
    model_type = config.get("model_type")
    c = text_config(config)
    arch = next((a for a in ARCHITECTURES.values() if model_type in a.hf_model_types or c.get("model_type") in a.hf_model_types), None)
    if arch is None:
        raise UnsupportedModelError(f"model type {model_type!r} is not supported "
                                    f"(supported: {', '.join(t for a in ARCHITECTURES.values() for t in a.hf_model_types)})")
    try:
        hidden, n_layers, n_heads = int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["num_attention_heads"])
        ffn, vocab = int(c["intermediate_size"]), int(c["vocab_size"])
    except KeyError as e:
        raise KeyError(f"config.json has no {e.args[0]!r}") from None
    n_kv = int(c.get("num_key_value_heads") or n_heads)
    head_dim = int(c.get("head_dim") or hidden // n_heads)
    if c.get("mlp_bias") or (c.get("attention_bias") and arch.name != "qwen2"):
        raise UnsupportedModelError(f"{arch.name} with attention_bias / mlp_bias is not supported")
    if c.get("final_logit_softcapping") or c.get("attn_logit_softcapping"):
        raise UnsupportedModelError(f"{arch.name} with logit soft-capping is not supported")
    act = c.get("hidden_activation") or c.get("hidden_act") or "silu"
    activation = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}.get(act)
    if activation is None or activation != arch.block.activation:
        raise UnsupportedModelError(f"{arch.name} with activation {act!r} is not supported")
    params = _hf_rope_params(c)
    window = int(c.get("sliding_window") or 0)
    layer_types = c.get("layer_types")
    if layer_types is None and arch.name == "gemma3":
        pattern = int(c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or 6)
        layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
    if arch.name == "qwen2" or arch.name == "qwen3":
        if not c.get("use_sliding_window"):
            layer_types = ["full_attention"] * n_layers
    if layer_types is None:
        layer_types = ["sliding_attention" if window else "full_attention"] * n_layers
    windows = tuple(window if t == "sliding_attention" else 0 for t in layer_types)
    if any(t not in ("sliding_attention", "full_attention") for t in layer_types):
        raise UnsupportedModelError(f"layer types {sorted(set(layer_types))} are not supported")
    if arch.name == "gemma3":
        if "full_attention" in params or "sliding_attention" in params:  # transformers 5: per layer type
            full, local = _hf_rope(params.get("full_attention", {}), c), _hf_rope(params.get("sliding_attention", {}), c)
        else:
            full = _hf_rope(params, c)
            local = Rope(theta=float(c.get("rope_local_base_freq", 10000.0)))
        ropes = (full, local)
        layer_rope = tuple(1 if w else 0 for w in windows)
        attn_scale = float(c.get("query_pre_attn_scalar") or head_dim) ** -0.5
        embed_scale = math.sqrt(hidden)
    else:
        ropes, layer_rope, attn_scale, embed_scale = (_hf_rope(params, c),), (0,) * n_layers, 0.0, 1.0
    partial = float(params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)) or 1.0)
    tied = c.get("tie_word_embeddings")
    if tied is None:
        tied = arch.name == "gemma3"
    return ModelArgs(
        architecture=arch.name, hidden_size=hidden, intermediate_size=ffn, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim, vocab_size=vocab, block=arch.block,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)), ropes=ropes, layer_rope=layer_rope,
        rope_dim=int(head_dim * partial), layer_window=windows, attn_scale=attn_scale, embed_scale=embed_scale,
        tie_word_embeddings=bool(tied), max_seq_len=int(c.get("max_position_embeddings", 8192)),
    )
