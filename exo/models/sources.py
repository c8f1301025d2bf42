"""Where a named model's weights are on this machine.

A model is named by a catalogue id (``smollm2-135m``), a local GGUF file (a single file or any
split of ``NAME-0000K-of-0000N.gguf``), a local Hugging Face model directory, or a Hugging Face
repo id (``org/name``, ``org/name:FILE.gguf``, ``hf.co/org/name:Q4_K_M``). ``local_path``
answers for the first three; hub names are answered from the Hugging Face cache by
``exo.models.hub``. ``open_model`` opens the checkpoint (``exo.models.weights``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from exo.models.weights import ModelWeights, open_weights

logger = logging.getLogger(__name__)


class ModelNotFound(LookupError):
    """A model name that is no catalogue id, no existing path and no hub repo (the message says
    what was looked for)."""


def as_local_path(name: str) -> Path | None:
    """``name`` as a path on this machine when it names one (a ``.gguf`` file, a split of one,
    or a directory with ``config.json``), else None. ``~`` is expanded; relative paths are
    taken from the working directory."""
    if not name or "\n" in name or "\x00" in name:
        return None
    p = Path(name).expanduser()
    looks_like_path = name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf") or p.exists()
    if not looks_like_path:
        return None
    return p.resolve()


def local_path(name: str) -> Path:
    """The checkpoint on this machine for model ``name``.

    Raises:
        ModelNotFound: ``name`` is neither a catalogue id nor a path (hub names are looked up
            by ``exo.models.hub``).
        FileNotFoundError: a path that does not exist, or a catalogue model whose weights are
            not on this machine (the message says how to get them).
    """
    from exo.models.registry import MODELS

    card = MODELS.get(name)
    if card is not None:
        return card.gguf_path()
    p = as_local_path(name)
    if p is None:
        raise ModelNotFound(f"unknown model {name!r}: not a catalogue id, a local path or a Hugging Face repo")
    if not p.exists():
        raise FileNotFoundError(f"no model at {p}")
    return p


def open_model(name: str) -> ModelWeights:
    """The checkpoint of model ``name`` on this machine, opened (cached per process).

    Raises:
        as ``local_path`` and ``open_weights``.
    """
    return open_weights(local_path(name))
