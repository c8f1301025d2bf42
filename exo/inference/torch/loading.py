"""Loading a shard's weights into a ``ShardedTransformer`` for the torch engine.

``ShardLoader`` holds the model of the shard loaded last. It reads a checkpoint through
``exo.models.sources.open_model`` (GGUF or safetensors, by shard), keeps each matrix in the
checkpoint's own GGML type where the native CPU kernels can (``native_weight_types``) or
dequantizes it, and on a re-partition keeps the layers the old and the new shard share, reading
only the missing runs of layers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time

import torch

from exo.inference.shard import Shard
from exo.inference.torch.kernels import gguf_kernels_error
from exo.inference.torch.model import ShardedTransformer, native_weight_types
from exo.inference.torch.quantize import quantize_weights
from exo.models.architectures import ModelArgs
from exo.models.gguf import F32
from exo.models.sources import open_model
from exo.models.weights import ModelWeights

logger = logging.getLogger(__name__)


class ShardLoader:
    """Builds shards' models on one device and dtype (the engine's).

    Args:
        device: where the weights go.
        dtype: the compute dtype of dense weights.
        requested_weights: "auto", "gguf", "dense" or "int4" (see ``TorchInferenceEngine``).

    Attributes:
        model: the model of the shard loaded last, or None.
        weights: what that shard's weights use ("gguf", "dense", "int4"; "auto" until a load).
        last_load: what the latest load did: {"shard": [start, end], "loaded_layers": [...],
            "reused_layers": [...], "seconds": s}; layers kept from the previous shard are not re-read.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, requested_weights: str):
        self.device, self.dtype = device, dtype
        self.requested_weights = self.weights = requested_weights
        self.model: ShardedTransformer | None = None
        self.last_load: dict | None = None

    def load(self, shard: Shard, batch_invariant: bool = True) -> ShardedTransformer:
        """Build and hold ``shard``'s model (``self.model``), reusing the layers the model held
        now shares with it; the previous model is dropped.

        Raises:
            ValueError: the shard's layer count is not the model's, or its weights are in GGML
                types the kernels cannot hold with weights="gguf".
            RuntimeError: weights="gguf" but the native kernels cannot be built.
        """
        model = self._load_model(shard)
        model.batch_invariant = batch_invariant
        if self.weights == "int4":
            quantize_weights(model)  # layers kept from the previous shard are int4 already
            release_freed_memory()
        self.model = model
        return model

    def _weight_types(self, weights: ModelWeights, shard: Shard) -> dict[str, int]:
        """The GGML type each matrix of ``shard`` is held in by the native kernels (see
        ``native_weight_types``), or {} for dense weights; sets ``weights`` to the choice.

        Raises:
            RuntimeError: weights="gguf" but the kernels cannot be built (why in the message).
        """
        if self.requested_weights not in ("gguf", "auto"):
            return {}
        if self.requested_weights == "auto" and (self.device.type != "cpu" or self.dtype != torch.float32):
            self.weights = "dense"
            return {}
        why = gguf_kernels_error()
        if why is not None:
            if self.requested_weights == "gguf":
                raise RuntimeError(f"weights='gguf' cannot run here: {why}")
            logger.warning("holding %s as dense %s weights: %s", shard.model_id, self.dtype, why)
            self.weights = "dense"
            return {}
        self.weights = "gguf"
        stored = {name: info.qtype for name, info in weights.tensor_info().items()}
        return native_weight_types(weights.args, shard, stored)

    def _new_model(self, args: ModelArgs, shard: Shard, weight_types: dict[str, int]) -> ShardedTransformer:
        """The shard's model with uninitialised weights, in the final dtype and place."""
        with torch.device("meta"):
            model = ShardedTransformer(args, shard, weight_types).to(dtype=self.dtype)
        model = model.to_empty(device=self.device)
        model.tie_weights()
        return model

    @staticmethod
    def _chunks(weights: ModelWeights, shard: Shard, weight_types: dict[str, int]):
        """The shard's tensors: as the file's blocks where they are held natively in their own
        (or a wider) type, dequantized otherwise."""
        stored = weights.tensor_info()
        raw = {n for n, held in weight_types.items() if held != F32 or stored[n].qtype == F32}
        if "embed" in raw and weights.args.tie_word_embeddings:
            raw.add("output")  # a last shard's tied head reads the embedding
        return weights.iter_shard(shard.start_layer, shard.end_layer, raw=raw)

    def _load_model(self, shard: Shard) -> ShardedTransformer:
        t0 = time.perf_counter()
        weights = open_model(shard.model_id)
        args = weights.args
        if args.n_layers != shard.n_layers:
            raise ValueError(f"shard says {shard.n_layers} layers but {shard.model_id} has {args.n_layers}")
        weight_types = self._weight_types(weights, shard)
        reused = self._load_reusing(shard, args, weights, weight_types)
        if reused is not None:
            return reused
        self.model = None  # drop the previous shard's weights before loading the next
        model = self._new_model(args, shard, weight_types)
        model.load_weights(self._chunks(weights, shard, weight_types))
        model.eval()
        release_freed_memory()
        logger.info("loaded %s layers %d-%d on %s (%s, %s weights) in %.1f s, %.1f MiB of weights",
                    shard.model_id, shard.start_layer, shard.end_layer, self.device, self.dtype, self.weights,
                    time.perf_counter() - t0, weight_bytes(model) / 2**20)
        self.last_load = {"shard": [shard.start_layer, shard.end_layer], "seconds": time.perf_counter() - t0,
                          "loaded_layers": list(range(shard.start_layer, shard.end_layer + 1)), "reused_layers": []}
        return model

    def _load_reusing(self, shard: Shard, args: ModelArgs, weights: ModelWeights, weight_types: dict[str, int]) -> ShardedTransformer | None:
        """Build ``shard`` from the model held now, reading only the layers it lacks.

        When the ring re-partitions, a node's new layer range usually overlaps its old one: the
        common transformer blocks (and the embedding / output head when the shard still holds
        layer 0 / the last layer) move to the new model as they are, already in place, and each
        run of missing layers is loaded like a shard of its own (a run starting at layer 0 brings
        the embedding, one ending at the last layer the final norm and head). None when nothing
        can be reused (no model held, another model, no common layer) or the assembled model
        would lack a tensor: the caller then loads the shard in full.
        """
        old = self.model
        if old is None or old.shard.model_id != shard.model_id or old.shard.n_layers != shard.n_layers or old.args != args:
            return None
        if any(old.weight_types.get(k) != t for k, t in weight_types.items() if k in old.weight_types):
            return None
        keep = range(max(old.shard.start_layer, shard.start_layer), min(old.shard.end_layer, shard.end_layer) + 1)
        if not keep:
            return None
        t0 = time.perf_counter()
        loaded = [i for i in range(shard.start_layer, shard.end_layer + 1) if i not in keep]
        donors = [(old.shard.start_layer, old)]
        self.model = old = None  # free the blocks that are not kept before reading new ones
        for start, end in _runs(loaded):
            part = Shard(shard.model_id, start, end, shard.n_layers)
            piece = self._new_model(args, part, weight_types)
            piece.load_weights(self._chunks(weights, part, weight_types))
            donors.append((start, piece))
        with torch.device("meta"):
            model = ShardedTransformer(args, shard, weight_types).to(dtype=self.dtype)
        for first, donor in donors:
            for j, block in enumerate(donor.layers):
                if shard.start_layer <= first + j <= shard.end_layer:
                    model.layers[first + j - shard.start_layer] = block
            if model.embed_tokens is not None and donor.embed_tokens is not None:
                model.embed_tokens = donor.embed_tokens
            if model.lm_head is not None and donor.lm_head is not None:
                model.norm, model.lm_head = donor.norm, donor.lm_head
        model.tie_weights()
        del donors
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            logger.warning("could not reuse the layers held for %s; loading it in full", shard)
            return None
        model.eval()
        release_freed_memory()
        self.last_load = {"shard": [shard.start_layer, shard.end_layer], "seconds": time.perf_counter() - t0,
                          "loaded_layers": loaded, "reused_layers": list(keep)}
        logger.info("loaded %s layers %d-%d on %s in %.1f s: read layers %s, kept layers %d-%d",
                    shard.model_id, shard.start_layer, shard.end_layer, self.device, time.perf_counter() - t0,
                    _runs(loaded) or "none", keep.start, keep.stop - 1)
        return model


def _runs(layers: list[int]) -> list[tuple[int, int]]:
    """Sorted layer indices as inclusive contiguous ranges: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    for i in layers:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def release_freed_memory() -> None:
    """Hand memory freed by the allocator (loading temporaries) back to the OS (glibc only)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (quantized weights are buffers), each
    storage counted once (tied weights)."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
