"""The InferenceEngine interface every engine implements, and the engine registry.

Engines never import networking: tensors cross the wire as numpy arrays through
``exo.networking.grpc.codec``. On the wire, hidden states are float32 (the agreed dtype and
layout, whatever each engine computes in) and token ids are int64.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from abc import ABC, abstractmethod

from typing import TYPE_CHECKING

import numpy as np

from exo.inference.shard import Shard

if TYPE_CHECKING:
    from exo.models.architectures import ModelArgs

logger = logging.getLogger(__name__)

WIRE_HIDDEN_DTYPE = np.float32
WIRE_TOKEN_DTYPE = np.int64


class InferenceEngine(ABC):
    """Runs one shard of a model for many concurrent requests, each with its own KV cache.

    Input of ``infer_tensor``:
        - on the first shard: token ids, int64, shape ``(1, T)``;
        - on any other shard: hidden states, float32, shape ``(1, T, hidden_size)``.
    Output:
        - on the last shard: logits of the last position, float32, shape ``(vocab_size,)``;
        - otherwise: hidden states, float32, shape ``(1, T, hidden_size)``.

    ``position`` is the number of tokens of this request already in the KV cache before ``x``:
    0 starts (or restarts) the request with a fresh cache (prefill); a decode step passes the
    current cache length. A mismatch raises ``ValueError`` rather than silently corrupting the
    cache.
    """

    name: str = "base"

    @abstractmethod
    async def ensure_shard(self, shard: Shard) -> None:
        """Load the weights of ``shard`` (only its own layers), dropping any other shard held.

        Raises:
            KeyError: unknown model id.
            FileNotFoundError: the model's weights are not on this machine.
        """

    @abstractmethod
    async def infer_tensor(self, request_id: str, shard: Shard, x: np.ndarray, position: int) -> np.ndarray:
        """Run ``shard``'s layers on ``x`` for ``request_id`` (see the class docstring for shapes).

        Raises:
            ValueError: wrong shape or dtype for this shard, or ``position`` not matching the
                request's cache length.
        """

    async def infer_final_hidden(self, request_id: str, shard: Shard, x: np.ndarray, position: int) -> np.ndarray:
        """``infer_tensor`` of an embedding request: the same on any shard but the last, where it
        returns the final-normed hidden states of every position of ``x`` (the last layer's
        output after the model's final norm, which the output head would read), float32
        ``(1, T, hidden_size)``, instead of logits. The KV cache is kept as by ``infer_tensor``.

        Raises:
            NotImplementedError: this engine does not compute embeddings (the default).
            ValueError, KeyError: as ``infer_tensor``.
        """
        raise NotImplementedError(f"the {self.name} engine does not compute embeddings")

    @abstractmethod
    async def clear_request(self, request_id: str) -> None:
        """Free the KV cache of ``request_id``; a no-op for an unknown id."""

    @abstractmethod
    def cached_request_ids(self) -> set[str]:
        """Ids of the requests that currently hold a KV cache in this engine."""

    #: Nodes of the ring this engine's requests run on, which the node sets before each step:
    #: an engine that batches decode steps splits its requests into that many groups, so that
    #: every node of the ring has a group's step to run at all times. Others ignore it.
    pipeline_depth: int = 1

    def match_prefix(self, token_ids) -> tuple[str | None, int]:
        """The prompt cache entry (``exo.inference.prompt_cache``) sharing the longest prefix
        with ``token_ids`` (int, on the first shard) and that prefix's length in tokens;
        (None, 0) without one (the default: no prompt cache)."""
        return None, 0

    def continue_from_prefix(self, request_id: str, entry_id: str, n_tokens: int) -> None:
        """Start ``request_id``'s KV cache as a copy of the first ``n_tokens`` keys and values
        of prompt cache entry ``entry_id``: its next step is a prefill at position ``n_tokens``.

        Raises:
            PromptCacheMiss: this engine holds no such entry (always, by default).
        """
        from exo.inference.prompt_cache import PromptCacheMiss

        raise PromptCacheMiss(f"the {self.name} engine keeps no prompt cache")

    async def keep_prefix(self, request_id: str, token_ids) -> None:
        """``request_id`` is over: keep its KV cache in the prompt cache as the keys and values
        of the first tokens of ``token_ids`` (as many as it holds), or free it (the default)."""
        await self.clear_request(request_id)

    @property
    @abstractmethod
    def shard(self) -> Shard | None:
        """The shard currently loaded, if any."""

    def weight_bytes(self) -> int:
        """Bytes of model weights this engine holds in memory (0 when nothing is loaded)."""
        return 0

    #: Bytes per parameter this engine holds weights in; 0: the checkpoint's own size (the
    #: torch engine's native CPU kernels keep GGUF blocks as they are). Partitioning sizes a
    #: node's share of layers with it.
    param_bytes: float = 4.0

    def unsupported_reason(self, args: "ModelArgs") -> str | None:
        """Why this engine cannot run a model of ``args`` (None: it can); see ``unsupported_reason``."""
        return unsupported_reason(self.name, args)

    async def unload(self) -> None:
        """Drop the shard held and every KV cache (the engine stays usable for another shard)."""

    async def close(self) -> None:
        """Release resources (threads, device memory)."""


#: The variant features of ``exo.models.architectures`` (``model_features``), with the words a
#: refusal uses for each.
FEATURE_NAMES = {
    "qkv_bias": "bias on q, k and v",
    "sliding_window": "sliding-window attention",
    "llama3_rope": "Llama 3.1 RoPE scaling",
    "linear_rope": "linearly scaled RoPE",
    "tied_head": "an output head tied to the embedding",
    "qk_norm": "QK norm (per-head RMSNorm of q and k)",
    "sandwich_norm": "post-attention and post-feed-forward norms",
    "gelu_tanh": "the GELU (tanh) feed-forward",
    "partial_rotary": "RoPE on part of each head",
    "longrope": "LongRoPE",
    "embed_scale": "a scaled token embedding",
}
ALL_FEATURES = frozenset(FEATURE_NAMES)

#: What each engine implements of ``exo.models.architectures``: the architectures it runs and
#: the variant features it handles; a feature not listed counts as missing, so a new one is
#: refused until an engine says it has it. Framework-free, so that every node can tell which of
#: its peers can run a model (``NodeInfo.engine``) and leave the others out of that model's ring.
ENGINE_SUPPORT: dict[str, tuple[frozenset[str] | None, frozenset[str]]] = {
    "torch": (None, ALL_FEATURES),
    "dummy": (None, ALL_FEATURES),
    "tinygrad": (frozenset({"llama", "mistral", "qwen2"}), frozenset({"qkv_bias", "sliding_window", "llama3_rope", "linear_rope", "tied_head"})),
    "mlx": (frozenset({"llama", "mistral", "qwen2"}), frozenset({"qkv_bias", "sliding_window", "llama3_rope", "linear_rope", "tied_head"})),
}


def model_features(args: "ModelArgs") -> set[str]:
    """The variant features a model of ``args`` uses (names of ``FEATURE_NAMES``)."""
    features = set()
    if args.block.qkv_bias:
        features.add("qkv_bias")
    if any(args.layer_window):
        features.add("sliding_window")
    if any(r.scaling == "llama3" or r.freq_factors is not None for r in args.ropes):
        features.add("llama3_rope")
    if args.tie_word_embeddings:
        features.add("tied_head")
    if args.block.qk_norm:
        features.add("qk_norm")
    if args.block.sandwich_norm:
        features.add("sandwich_norm")
    if args.block.activation != "silu":
        features.add(args.block.activation)
    if args.rope_dim != args.head_dim:
        features.add("partial_rotary")
    if any(r.scaling == "longrope" for r in args.ropes):
        features.add("longrope")
    if any(r.scaling == "linear" for r in args.ropes):
        features.add("linear_rope")
    if args.embed_scale != 1.0:
        features.add("embed_scale")
    return features


def unsupported_reason(engine: str, args: "ModelArgs | None", architecture: str | None = None) -> str | None:
    """Why engine ``engine`` cannot run a model (None: it can, or the engine is unknown), in one
    line naming the architecture and, when ``args`` are known, the features the engine lacks.

    Args:
        engine: an engine name ("" or an unknown name: assumed able).
        args: the model's hyper-parameters, or None when only ``architecture`` is known.
        architecture: the architecture name when ``args`` is None.
    """
    support = ENGINE_SUPPORT.get(engine)
    if support is None:
        return None
    archs, features = support
    arch = args.architecture if args is not None else architecture
    missing = sorted(model_features(args) - features) if args is not None else []
    lacking = ", ".join(FEATURE_NAMES.get(f, f.replace("_", " ")) for f in missing)
    if archs is not None and arch is not None and arch not in archs:
        why = f": {lacking} not implemented" if lacking else ""
        return f"the {engine} engine does not run the {arch} architecture (it runs {', '.join(sorted(archs))}){why}"
    if lacking:
        return f"the {engine} engine does not implement {lacking} ({arch})"
    return None


ENGINES: dict[str, str] = {
    "torch": "exo.inference.torch.engine:TorchInferenceEngine",
    "dummy": "exo.inference.dummy:DummyInferenceEngine",
    "tinygrad": "exo.inference.tinygrad.engine:TinygradInferenceEngine",
    "mlx": "exo.inference.mlx.engine:MLXInferenceEngine",
}


def get_inference_engine(name: str, **kwargs) -> InferenceEngine:
    """Build the engine registered under ``name``.

    Raises:
        ValueError: unknown engine name.
        ImportError: the engine's package is not installed (install the matching extra,
            e.g. ``pip install -e .[tinygrad]``).
    """
    if name not in ENGINES:
        raise ValueError(f"unknown inference engine {name!r}; choose one of {sorted(ENGINES)}")
    module_name, cls_name = ENGINES[name].split(":")
    module = importlib.import_module(module_name)
    return getattr(module, cls_name)(**kwargs)


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def default_engine_name() -> str:
    """The engine that suits this machine.

    MLX on Apple silicon (Metal), else torch where it is installed (CPU or CUDA), else tinygrad
    (with ``clang`` for its CPU device, or a GPU), else MLX's CPU build. Only presence is checked
    (no package is imported), so the choice is cheap.

    Raises:
        ImportError: no engine package is installed (the message says how to install one).
    """
    import platform
    import shutil
    import sys

    if sys.platform == "darwin" and platform.machine() == "arm64" and _importable("mlx"):
        return "mlx"
    if _importable("torch"):
        return "torch"
    if _importable("tinygrad") and (shutil.which("clang") or sys.platform == "darwin"):
        return "tinygrad"
    if _importable("mlx"):
        return "mlx"
    raise ImportError("no inference engine is installed: pip install -e .[torch] (or .[tinygrad], .[mlx])")
