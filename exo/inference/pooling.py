"""Sentence embeddings from a decoder's last hidden states: pooling, L2 normalization and
Matryoshka truncation, as pure numpy functions.

The node holding a model's last layer turns the final-normed hidden states of a prompt,
``(1, T, hidden)`` or ``(T, hidden)``, into one vector ``(hidden,)`` with ``pool``; the node that
received the request normalizes it (``l2_normalize``) and, for a Matryoshka model, keeps its
first dimensions (``truncate_dimensions``).

Pooling modes (sentence-transformers' ``Pooling`` module, ``1_Pooling/config.json``; llama.cpp's
``{arch}.pooling_type``):

| mode   | vector                                   | sentence-transformers       | llama.cpp |
|--------|------------------------------------------|-----------------------------|-----------|
| mean   | mean over the T positions                 | ``pooling_mode_mean_tokens`` | 1         |
| cls    | the first position's                      | ``pooling_mode_cls_token``   | 2         |
| last   | the last position's (causal models: the   | ``pooling_mode_lasttoken``   | 3         |
|        | only one that saw every token)            |                             |           |

Matryoshka representation learning (Kusupati et al. 2022, arXiv:2205.13147) trains the first
``d`` dimensions of a vector to be an embedding of their own: truncate, then normalize again.
"""

from __future__ import annotations

import numpy as np

#: The pooling modes ``pool`` implements.
POOLINGS = ("mean", "last", "cls")
#: The pooling of a model whose checkpoint says none.
DEFAULT_POOLING = "mean"


def pool(hidden_states: np.ndarray, mode: str) -> np.ndarray:
    """One vector of the hidden states of a sequence.

    Args:
        hidden_states: ``(T, hidden)`` or ``(1, T, hidden)``, any float dtype, T >= 1.
        mode: one of ``POOLINGS`` (see the module docstring).

    Returns:
        ``(hidden,)`` float32 (not normalized; the mean is accumulated in float64).

    Raises:
        ValueError: an unknown mode, or a shape other than those above.
    """
    h = np.asarray(hidden_states)
    if h.ndim == 3 and h.shape[0] == 1:
        h = h[0]
    if h.ndim != 2 or h.shape[0] < 1:
        raise ValueError(f"hidden states must have shape (T, hidden) or (1, T, hidden) with T >= 1, got {hidden_states.shape}")
    if mode == "mean":
        return h.mean(axis=0, dtype=np.float64).astype(np.float32)
    if mode == "last":
        return h[-1].astype(np.float32, copy=True)
    if mode == "cls":
        return h[0].astype(np.float32, copy=True)
    raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {mode!r}")


def l2_normalize(vector: np.ndarray) -> np.ndarray:
    """``vector / ||vector||_2`` as float32 (computed in float64); a zero vector stays zero.

    Raises:
        ValueError: the vector holds NaN or an infinity (as Ollama refuses it).
    """
    v = np.asarray(vector, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError("the embedding holds NaN or infinite values")
    norm = float(np.linalg.norm(v))
    return (v / norm if norm > 0 else v).astype(np.float32)


def truncate_dimensions(vector: np.ndarray, dimensions: int) -> np.ndarray:
    """The first ``dimensions`` values of ``vector``, L2-normalized again (Matryoshka).

    Raises:
        ValueError: ``dimensions`` not in ``[1, len(vector)]``.
    """
    if not 1 <= dimensions <= len(vector):
        raise ValueError(f"dimensions must be in [1, {len(vector)}], got {dimensions}")
    return l2_normalize(np.asarray(vector)[:dimensions])


def pooling_from_sentence_transformers(config: dict) -> str | None:
    """The pooling mode a sentence-transformers ``1_Pooling/config.json`` (decoded) sets, or
    None when it sets none this module implements (max pooling, weighted mean...)."""
    for key, mode in (("pooling_mode_lasttoken", "last"), ("pooling_mode_mean_tokens", "mean"),
                      ("pooling_mode_cls_token", "cls")):
        if config.get(key) is True:
            return mode
    return None


#: llama.cpp's ``enum llama_pooling_type`` (``{arch}.pooling_type`` in a GGUF): value -> mode.
GGUF_POOLING = {1: "mean", 2: "cls", 3: "last"}
