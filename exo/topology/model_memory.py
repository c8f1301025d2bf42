"""How much memory one transformer layer of a model takes: what partitioning compares with a
node's memory to decide whether it can hold a layer at all, and how many it can hold."""

from __future__ import annotations

import functools
import logging
import math
import re

from exo.models.registry import ModelCard

logger = logging.getLogger(__name__)

#: Bytes per parameter of a loaded layer. Engines dequantize GGUF weights to float32 on CPU
#: (bfloat16 on GPUs); every node must compute the same ring, so all use the largest.
BYTES_PER_PARAM = 4

_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.")


def layer_params_from_shapes(tensors: dict[str, tuple[int, ...]]) -> int:
    """The parameter count of the largest layer, from GGUF tensor names and shapes.

    ``tensors``: name -> shape, e.g. ``{"blk.0.attn_q.weight": (576, 576), ...}``; tensors
    outside the ``blk.N.`` layers (embedding, output head, final norm) are ignored.

    Raises:
        ValueError: no layer tensor among ``tensors``.
    """
    per_layer: dict[int, int] = {}
    for name, shape in tensors.items():
        m = _LAYER_TENSOR.match(name)
        if m:
            i = int(m.group(1))
            per_layer[i] = per_layer.get(i, 0) + math.prod(int(d) for d in shape)
    if not per_layer:
        raise ValueError("no layer tensors (blk.N.*) found")
    return max(per_layer.values())


@functools.lru_cache(maxsize=16)
def _gguf_layer_params(path: str) -> int:
    from exo.models.gguf import open_gguf

    reader = open_gguf(path)
    return layer_params_from_shapes({t.name: tuple(int(d) for d in t.shape) for t in reader.tensors})


def layer_bytes(card: ModelCard) -> int:
    """Bytes one layer of ``card``'s model takes once loaded (``BYTES_PER_PARAM`` per parameter of
    its largest layer), read from the model's GGUF tensor table; 0 when this machine does not
    have the weights (partitioning then skips the size check).

    Opening a GGUF file the first time takes seconds (``gguf.GGUFReader``; the reader is shared
    with the engines): call it from a thread.
    """
    explicit = getattr(card, "layer_bytes", None)
    if explicit:
        return int(explicit)
    try:
        path = card.gguf_path()
    except FileNotFoundError:
        return 0
    try:
        return _gguf_layer_params(str(path)) * BYTES_PER_PARAM
    except Exception:
        logger.exception("could not read the layer sizes of %s from %s", card.model_id, path)
        return 0
