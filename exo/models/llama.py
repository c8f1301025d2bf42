"""Llama hyper-parameters, independent of any ML framework (every engine builds its model from them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LlamaArgs:
    """Llama hyper-parameters, read from the checkpoint's own config.

    ``head_dim`` is derived: ``hidden_size // n_heads``; ``max_seq_len`` is in tokens.
    """

    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "LlamaArgs":
        """Build from GGUF metadata keys ``<arch>.*`` (raises KeyError naming a missing key)."""
        arch = meta["general.architecture"]
        vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
        return cls(
            hidden_size=int(meta[f"{arch}.embedding_length"]),
            intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
            n_layers=int(meta[f"{arch}.block_count"]),
            n_heads=int(meta[f"{arch}.attention.head_count"]),
            n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", meta[f"{arch}.attention.head_count"])),
            vocab_size=int(vocab),
            rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            max_seq_len=int(meta.get(f"{arch}.context_length", 8192)),
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> "LlamaArgs":
        """Read the hyper-parameters of the GGUF file at ``path`` (metadata cached per process)."""
        from exo.models.gguf import gguf_metadata

        return cls.from_gguf_metadata(gguf_metadata(path))
