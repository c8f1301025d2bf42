"""The GGUF reader: ``GGUFWeights``, a GGUF file (or its splits) read through ``exo.models.gguf``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exo.models.architectures import GGUF_GLOBAL, GGUF_LAYER, architecture, layer_name
from exo.models.config_readers import args_from_gguf, embedding_config_from_gguf
from exo.models.gguf import GGUFModel, dequantize, open_gguf
from exo.models.weights.base import ModelWeights, WeightsError


class GGUFWeights(ModelWeights):
    """A GGUF model (a file or its splits), read through ``exo.models.gguf``.

    Raises (constructor):
        FileNotFoundError, GGUFError: as ``open_gguf``. UnsupportedModelError: an architecture
        exo does not implement. WeightsError: a tensor the architecture needs is missing.
    """

    format = "gguf"

    def __init__(self, path: str | Path):
        super().__init__()
        self.gguf: GGUFModel = open_gguf(path)
        self.path = self.gguf.paths[0]
        self.metadata = self.gguf.metadata
        names = set(self.gguf.tensors)
        small = {n: self._small(n) for n in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
                 if n in names}
        self.args = args_from_gguf(self.metadata, names, small)
        self.pooling, self.matryoshka = embedding_config_from_gguf(self.metadata)
        arch = architecture(self.args.architecture)
        a = self.args
        for i in range(a.n_layers):
            fused_keys = {k for keys in arch.gguf_fused.values() for k in keys}
            for key in a.block.layer_keys():
                if key in fused_keys:
                    continue
                permute = 0
                if arch.gguf_permuted_qk and key in ("q", "k"):
                    permute = a.n_heads if key == "q" else a.n_kv_heads
                self._map(layer_name(i, key), f"blk.{i}.{GGUF_LAYER[key]}", permute_heads=permute)
            for fused, keys in arch.gguf_fused.items():
                self._map_fused(i, f"blk.{i}.{fused}", keys)
        self._map("embed", GGUF_GLOBAL["embed"])
        self._map("output_norm", GGUF_GLOBAL["output_norm"])
        if not a.tie_word_embeddings:
            self._map("output", GGUF_GLOBAL["output"])
        self.check_types()

    def _map_fused(self, i: int, name: str, keys: tuple[str, ...]) -> None:
        rows = {"q": self.args.q_rows, "k": self.args.kv_rows, "v": self.args.kv_rows,
                "gate": self.args.intermediate_size, "up": self.args.intermediate_size}
        if name not in self.gguf.tensors:  # phi3 GGUFs name an unfused up projection ffn_up too
            raise WeightsError(f"{self.path}: tensor {name!r} is missing")
        total = self.gguf.tensors[name].shape[0]
        if total != sum(rows[k] for k in keys):  # not fused after all: each key by its own name
            for k in keys:
                self._map(layer_name(i, k), f"blk.{i}.{GGUF_LAYER[k]}")
            return
        first = 0
        for k in keys:
            self._map(layer_name(i, k), name, first, rows[k])
            first += rows[k]

    def _small(self, name: str) -> np.ndarray:
        t = self.gguf.tensors[name]
        return dequantize(self.gguf.raw(name), t.qtype, t.shape[-1]).reshape(-1)

    def _info(self, name: str) -> tuple[tuple[int, ...], int]:
        t = self.gguf.tensors[name]
        return t.shape, t.qtype

    def _raw_rows(self, name: str, first_row: int, n_rows: int) -> np.ndarray:
        return self.gguf.raw(name, first_row, n_rows)

    def _release(self, view: np.ndarray) -> None:
        self.gguf.drop_pages(view)

    def byte_ranges(self, canonical: list[str] | set[str]) -> list[tuple[int, int, int]]:
        """``(file index, start, end)`` byte ranges of the checkpoint tensors behind
        ``canonical`` names, merged where adjacent (what a shard needs of a remote file)."""
        spans = sorted({(t.file, t.offset, t.end) for n in self.checkpoint_names(canonical) for t in [self.gguf.tensors[n]]})
        merged: list[list[int]] = []
        for f, s, e in spans:
            if merged and merged[-1][0] == f and s <= merged[-1][2]:
                merged[-1][2] = max(merged[-1][2], e)
            else:
                merged.append([f, s, e])
        return [tuple(m) for m in merged]  # type: ignore[misc]
