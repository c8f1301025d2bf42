"""``ModelArgs`` from a checkpoint's own config: the metadata of a GGUF file
(``args_from_gguf``) or a Hugging Face ``config.json`` (``args_from_hf_config``), for the
architectures ``exo.models.architectures`` describes; and how the model pools its hidden states
into an embedding (``embedding_config_from_gguf``, ``embedding_config_from_hf_dir``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from exo.models.architectures import ARCHITECTURES, BlockVariant, ModelArgs, Rope, UnsupportedModelError

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


# ---------------------------------------------------------------------------- embeddings

#: Model families trained with Matryoshka representation learning (their model cards say so),
#: matched against the name a checkpoint gives itself (a GGUF's ``general.basename`` or
#: ``general.name``; a Hugging Face directory's ``_name_or_path`` or its own directory name).
#: A checkpoint may also declare it: ``matryoshka_dimensions`` in its ``config.json`` or
#: ``config_sentence_transformers.json``.
MATRYOSHKA_FAMILIES = ("qwen3-embedding",)


def _is_matryoshka_name(*names: Any) -> bool:
    return any(isinstance(n, str) and any(f in n.lower() for f in MATRYOSHKA_FAMILIES) for n in names)


def embedding_config_from_gguf(meta: Mapping[str, Any]) -> tuple[str, bool]:
    """(pooling, matryoshka) of a GGUF model: llama.cpp's ``{arch}.pooling_type`` (1 mean,
    2 cls, 3 last; ``exo.inference.pooling.GGUF_POOLING``), else mean; Matryoshka by name
    (``MATRYOSHKA_FAMILIES``)."""
    from exo.inference.pooling import DEFAULT_POOLING, GGUF_POOLING

    arch = meta.get("general.architecture")
    pooling = GGUF_POOLING.get(meta.get(f"{arch}.pooling_type"), DEFAULT_POOLING)  # type: ignore[arg-type]
    return pooling, _is_matryoshka_name(meta.get("general.basename"), meta.get("general.name"))


def embedding_config_from_hf_dir(directory: Path, config: Mapping[str, Any]) -> tuple[str, bool]:
    """(pooling, matryoshka) of a Hugging Face model directory: the sentence-transformers
    Pooling module's ``config.json`` that ``modules.json`` names (``pooling_mode_lasttoken``
    -> last, ``pooling_mode_mean_tokens`` -> mean, ``pooling_mode_cls_token`` -> cls), else
    mean; Matryoshka when a config declares ``matryoshka_dimensions`` or by name
    (``MATRYOSHKA_FAMILIES``). Unreadable sentence-transformers files count as absent."""
    from exo.inference.pooling import DEFAULT_POOLING, pooling_from_sentence_transformers

    def read(name: str) -> Any:
        try:
            return json.loads((directory / name).read_text())
        except (OSError, ValueError):
            return None

    pooling = None
    modules = read("modules.json")
    if isinstance(modules, list):
        for m in modules:
            if isinstance(m, dict) and str(m.get("type", "")).endswith(".Pooling") and isinstance(m.get("path"), str):
                pooling_cfg = read(f"{m['path']}/config.json")
                if isinstance(pooling_cfg, dict):
                    pooling = pooling_from_sentence_transformers(pooling_cfg)
                break
    st_config = read("config_sentence_transformers.json")
    declared = "matryoshka_dimensions" in config or (isinstance(st_config, dict) and "matryoshka_dimensions" in st_config)
    matryoshka = declared or _is_matryoshka_name(config.get("_name_or_path"), directory.name)
    return pooling or DEFAULT_POOLING, matryoshka
