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

``exo.models.config_readers`` builds a ``ModelArgs`` from a checkpoint's own config (GGUF
metadata or ``config.json``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping

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
