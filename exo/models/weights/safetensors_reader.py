"""The safetensors reader: ``SafetensorsWeights``, a Hugging Face model directory, and
``read_safetensors_header``."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from exo.models.architectures import HF_GLOBAL, ModelArgs, architecture, layer_name, parse_layer_name
from exo.models.config_readers import args_from_hf_config, embedding_config_from_hf_dir
from exo.models.gguf import BF16, F16, F32
from exo.models.weights.base import ModelWeights, WeightsError, _Source


_ST_DTYPES = {"F32": F32, "F16": F16, "BF16": BF16}
_ST_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")


def read_safetensors_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset its data starts at.

    Format: an 8-byte little-endian header length, the JSON header (tensor name ->
    ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the data), the data.

    Raises:
        WeightsError: not a safetensors file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path} is not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if n > 100 << 20:
            raise WeightsError(f"{path} is not a safetensors file (header of {n} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError:
        raise WeightsError(f"{path} is not a safetensors file (its header is not JSON)") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsWeights(ModelWeights):
    """A Hugging Face model directory: ``config.json`` and ``*.safetensors`` (one file, or
    several named by ``model.safetensors.index.json``). Files a shard does not need may be
    absent (download by shard): a missing one fails only when a tensor in it is read.

    Raises (constructor):
        FileNotFoundError: no ``config.json``, or no safetensors file and no index.
        UnsupportedModelError: a model type exo does not implement.
        WeightsError: a tensor the architecture needs is missing from every file.
    """

    format = "safetensors"

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{self.path} has no config.json")
        try:
            self.config = json.loads(config_path.read_text())
        except ValueError as e:
            raise WeightsError(f"{config_path} is not valid JSON: {e}") from None
        self.args = args_from_hf_config(self.config)
        self.pooling, self.matryoshka = embedding_config_from_hf_dir(self.path, self.config)
        self._files: dict[str, Path] = {}  # tensor -> file
        self._headers: dict[Path, tuple[dict[str, Any], int]] = {}
        self._maps: dict[Path, np.ndarray] = {}
        self._lock = threading.Lock()
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            self._files = {name: self.path / file for name, file in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.path} has no *.safetensors file")
            for f in files:
                for name in self._header(f)[0]:
                    self._files[name] = f
        prefix = next((p for p in _ST_PREFIXES if f"{p}layers.0.{_first_hf_key(self.args)}" in self._files), None)
        if prefix is None:
            raise WeightsError(f"{self.path}: no layer 0 tensors found (looked for "
                               f"{[p + 'layers.0.' + _first_hf_key(self.args) for p in _ST_PREFIXES]})")
        self.prefix = prefix
        arch = architecture(self.args.architecture)
        fused_keys = {k for keys in arch.hf_fused.values() for k in keys}
        for i in range(self.args.n_layers):
            for key in self.args.block.layer_keys():
                if key in fused_keys and f"{prefix}layers.{i}.{arch.hf_layer[key]}" not in self._files:
                    continue
                offset = arch.hf_norm_offset if key.endswith("norm") else 0.0
                self._map(layer_name(i, key), f"{prefix}layers.{i}.{arch.hf_layer[key]}", offset=offset)
            for fused, keys in arch.hf_fused.items():
                name = f"{prefix}layers.{i}.{fused}"
                if name in self._files:
                    first = 0
                    for k in keys:
                        n = self.args.q_rows if k == "q" else self.args.kv_rows if k in ("k", "v") else self.args.intermediate_size
                        self._map(layer_name(i, k), name, first, n)
                        first += n
        self._map("embed", f"{prefix}{HF_GLOBAL['embed']}")
        self._map("output_norm", f"{prefix}{HF_GLOBAL['output_norm']}", offset=arch.hf_norm_offset)
        if not self.args.tie_word_embeddings:
            head = HF_GLOBAL["output"]
            name = next((n for n in (head, f"{prefix}{head}", f"language_model.{head}") if n in self._files), head)
            self._map("output", name)

    def files_for(self, canonical: list[str] | set[str]) -> set[str]:
        """Names (relative to the directory) of the safetensors files holding ``canonical``."""
        return {self._files[n].name for n in self.checkpoint_names(canonical)}

    def _header(self, file: Path) -> tuple[dict[str, Any], int]:
        with self._lock:
            if file not in self._headers:
                if not file.is_file():
                    raise FileNotFoundError(f"{file} is missing (the shard's tensors are in it)")
                self._headers[file] = read_safetensors_header(file)
            return self._headers[file]

    def _entry(self, name: str) -> tuple[Path, dict[str, Any], int]:
        file = self._files[name]  # KeyError: absent
        header, data_start = self._header(file)
        if name not in header:
            raise WeightsError(f"{file} does not hold {name!r}, though the index says it does")
        return file, header[name], data_start

    def _info(self, name: str) -> tuple[tuple[int, ...], int]:
        if name not in self._files:
            raise KeyError(name)
        try:
            _, entry, _ = self._entry(name)
        except FileNotFoundError:
            return self._shape_from_config(name)
        dtype = entry["dtype"]
        if dtype not in _ST_DTYPES:
            raise WeightsError(f"{self.path}: tensor {name!r} is {dtype}; only F32, F16 and BF16 safetensors are supported")
        return tuple(int(d) for d in entry["shape"]), _ST_DTYPES[dtype]

    def _shape_from_config(self, name: str, canonical: str | None = None) -> tuple[tuple[int, ...], int]:
        """Shape and (assumed from the config's dtype, else BF16) type of a tensor whose file is
        not here (not downloaded): from the config, for byte counts only. ``canonical``: the
        canonical tensor it holds, when it is not mapped yet."""
        dtype = {"float32": F32, "float16": F16}.get(str(self.config.get("torch_dtype") or self.config.get("dtype")), BF16)
        a = self.args
        if canonical is None:
            canonical = next((c for c, src in self._sources.items() if src.name == name), None)
        if canonical is None:
            return (a.hidden_size,), dtype
        parsed = parse_layer_name(canonical)
        if parsed is None:
            return ((a.vocab_size, a.hidden_size) if canonical != "output_norm" else (a.hidden_size,)), dtype
        return a.layer_shapes()[parsed[1]], dtype

    def _raw_rows(self, name: str, first_row: int, n_rows: int) -> np.ndarray:
        file, entry, data_start = self._entry(name)
        shape = [int(d) for d in entry["shape"]]
        cols = shape[-1] if len(shape) > 1 else (shape[0] if shape else 1)
        rb = cols * {"F32": 4, "F16": 2, "BF16": 2}[entry["dtype"]]
        begin, end = entry["data_offsets"]
        with self._lock:
            if file not in self._maps:
                self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
            m = self._maps[file]
        start = data_start + begin + first_row * rb
        if data_start + end > m.shape[0]:
            raise WeightsError(f"{file} is truncated: {name!r} ends at byte {data_start + end}, the file has {m.shape[0]}")
        return m[start:start + n_rows * rb].reshape(n_rows, rb)

    def _map(self, canonical: str, name: str, first_row: int = 0, rows: int | None = None, permute_heads: int = 0,
             offset: float = 0.0, required: bool = True) -> None:
        if name not in self._files:
            if required:
                raise WeightsError(f"{self.path}: tensor {name!r} ({canonical}) is missing")
            return
        # a file not downloaded (yet): the shape the config implies for ``canonical``
        shape = self._info(name)[0] if self._files[name].is_file() else self._shape_from_config(name, canonical)[0]
        n = shape[0] if len(shape) > 1 else 1
        self._sources[canonical] = _Source(name, first_row, n - first_row if rows is None else rows, permute_heads, offset)


def _first_hf_key(args: ModelArgs) -> str:
    return architecture(args.architecture).hf_layer["attn_norm"]
