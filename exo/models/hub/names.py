"""Hub model names and what they pick: ``HubRef`` / ``parse_hub_name`` (the names users give),
``RemoteFile`` and ``HubModel`` (a repo's files at a commit, resolved), and ``_choose`` (which
weight files of a repo a name means)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from exo.models.hub.errors import DownloadError, NotOnHub

#: The GGUF quant picked from a repo when the name gives none (Ollama's default too).
DEFAULT_QUANT = "Q4_K_M"
#: Directory of exo's own files in a repo's cache folder.
PARTIAL_DIR = "exo-partial"

_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_NAME_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_NAME_PART}/{_NAME_PART}$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_FILE = re.compile(r"^[A-Za-z0-9_.-][A-Za-z0-9_./+-]*\.gguf$", re.IGNORECASE)
_HUB_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "https://hf.co/", "http://hf.co/",
                 "huggingface.co/", "hf.co/")


@dataclass(frozen=True)
class HubRef:
    """A model on the hub, as a user names it.

    Attributes:
        repo_id: ``org/name``.
        filename: a GGUF file of the repo (any split of a split model: all its splits).
        quant: a quant tag (``Q4_K_M``) picking the GGUF file whose name holds it.
        revision: branch, tag or commit.
    """

    repo_id: str
    filename: str | None = None
    quant: str | None = None
    revision: str = "main"

    def __str__(self) -> str:
        tag = self.filename or self.quant
        return f"{self.repo_id}:{tag}" if tag else self.repo_id


def parse_hub_name(name: str) -> HubRef | None:
    """The hub model ``name`` names, or None when it is not a hub name.

    Accepted: ``org/name``, ``org/name:FILE.gguf``, ``org/name:Q4_K_M`` (any quant tag, any
    case; ``latest`` means the default), each optionally prefixed by ``hf.co/``,
    ``huggingface.co/`` or ``https://huggingface.co/``. Not hub names: local paths (absolute,
    ``./``/``../``/``~`` relative, or anything that exists on disk), names without exactly one
    ``/``, invalid repo ids, empty tags, repo ids ending in ``.gguf``.
    """
    if not isinstance(name, str):
        return None
    s = name.strip()
    if not s or s.startswith(("/", "./", "../", "~", ".\\")) or "\\" in s or any(c.isspace() for c in s):
        return None
    try:
        if Path(s).expanduser().exists():
            return None
    except OSError:
        pass
    for prefix in _HUB_PREFIXES:
        if s.lower().startswith(prefix):
            s = s[len(prefix):]
            break
    repo, sep, tag = s.partition(":")
    if sep and not tag:
        return None
    if not _REPO_ID.match(repo) or "--" in repo or ".." in repo or repo.lower().endswith(".gguf"):
        return None
    if not tag or tag.lower() == "latest":
        return HubRef(repo)
    if tag.lower().endswith(".gguf"):
        if not _FILE.match(tag) or ".." in tag.split("/") or "//" in tag:
            return None
        return HubRef(repo, filename=tag)
    if _TAG.match(tag):
        return HubRef(repo, quant=tag.upper())
    return None


def _split_group(name: str) -> list[str] | None:
    """All splits of ``name`` (``X-0000K-of-0000N.gguf``) in order, or None when it is no split."""
    m = _SPLIT.match(name)
    if m is None:
        return None
    count = int(m["count"])
    return [f"{m['stem']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def _quant_matches(quant: str, filename: str) -> bool:
    base = filename.rsplit("/", 1)[-1]
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9])", base, re.IGNORECASE) is not None


@dataclass(frozen=True)
class RemoteFile:
    """A file of a repo at a commit: ``size`` (bytes; None when the hub did not say), ``sha256``
    (LFS files) and ``etag`` (the LFS sha256, or the git blob id)."""

    name: str
    size: int | None
    sha256: str | None = None
    etag: str | None = None


@dataclass(frozen=True)
class HubModel:
    """A resolved hub model.

    Attributes:
        model_id: the name the user gave (the key of its progress).
        ref: what it names.
        commit: the commit every file is fetched at.
        kind: "gguf", "safetensors" or "diffusers" (a pipeline: model_index.json and component folders).
        files: the weight files: a GGUF's splits in order, or the repo's safetensors files;
            a pipeline's every file it needs (``diffusers_files``).
        remote: every file of the repo at ``commit``.
        storage: the repo's folder in the cache (``.../models--org--name``).
    """

    model_id: str
    ref: HubRef
    commit: str
    kind: str
    files: tuple[str, ...]
    remote: Mapping[str, RemoteFile] = field(repr=False, compare=False)
    storage: Path

    @property
    def repo_id(self) -> str:
        return self.ref.repo_id

    @property
    def snapshot(self) -> Path:
        """The snapshot directory of ``commit`` (safetensors models open from it)."""
        return self.storage / "snapshots" / self.commit

    @property
    def partial_dir(self) -> Path:
        """exo's directory for ``commit``: sparse GGUF files, their sidecars, the listing."""
        return self.storage / PARTIAL_DIR / self.commit

    @property
    def local_path(self) -> Path:
        """What ``open_weights`` opens: the snapshot directory, or the first GGUF split."""
        return self.snapshot if self.kind in ("safetensors", "diffusers") else self.partial_dir / self.files[0]


def _choose(ref: HubRef, remote: Mapping[str, RemoteFile], model_id: str) -> tuple[str, tuple[str, ...]]:
    """(kind, weight files) of ``ref`` among the repo's files.

    Raises:
        DownloadError: the file or quant is not in the repo, or the repo holds no model.
    """
    names = sorted(remote)
    ggufs = [n for n in names if n.lower().endswith(".gguf")]
    models = [n for n in ggufs if "mmproj" not in n.lower().rsplit("/", 1)[-1]]
    available = ", ".join(models[:20]) or "none"

    def group(name: str) -> tuple[str, ...]:
        splits = _split_group(name)
        if splits is None:
            return (name,)
        missing = [s for s in splits if s not in remote]
        if missing:
            raise NotOnHub(f"{model_id}: {ref.repo_id} lacks {len(missing)} split(s) of {name}: {', '.join(missing)}")
        return tuple(splits)

    if ref.filename is not None:
        if ref.filename not in remote:
            raise NotOnHub(f"{model_id}: {ref.repo_id} has no file {ref.filename} (its GGUF files: {available})")
        return "gguf", group(ref.filename)
    if ref.quant is not None:
        matching = [n for n in models if _quant_matches(ref.quant, n)]
        if not matching:
            matching = [n for n in models if ref.quant.lower() in n.rsplit("/", 1)[-1].lower()]
        if not matching:
            raise NotOnHub(f"{model_id}: {ref.repo_id} has no GGUF file for quant {ref.quant} "
                                f"(its GGUF files: {available})")
        return "gguf", group(matching[0])
    if "model_index.json" in remote:
        return "diffusers", diffusers_files(remote)
    safetensors = [n for n in names if n.endswith(".safetensors") and "/" not in n]
    if safetensors and "config.json" in remote:
        preferred = [n for n in safetensors if not n.startswith("consolidated")] or safetensors
        return "safetensors", tuple(preferred)
    if models:
        default = [n for n in models if _quant_matches(DEFAULT_QUANT, n)]
        return "gguf", group((default or models)[0])
    raise DownloadError(f"{model_id}: {ref.repo_id} holds no model exo can read (neither safetensors weights with a "
                        f"config.json, a .gguf file, nor a diffusers pipeline's model_index.json)")


#: The folders of a diffusers pipeline exo runs (``exo.inference.diffusion.pipeline_dir``);
#: the safety checker and feature extractor are not used.
PIPELINE_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
_WEIGHTS = re.compile(r"^(diffusion_pytorch_model|model)(\.fp16)?\.(safetensors|bin)$")


def diffusers_files(remote: Mapping[str, RemoteFile]) -> tuple[str, ...]:
    """The files of a diffusers repo a node needs, sorted: ``model_index.json``, the configs and
    tokenizer files of ``PIPELINE_FOLDERS``, and one weights file per component folder: the
    fp16 safetensors where the repo has them (half the bytes; loaded at the node's own dtype),
    else the full-precision safetensors, else a ``.bin``. Root-level single-file checkpoints
    and sharded or other variants are never fetched."""
    out = {"model_index.json"}
    for folder in PIPELINE_FOLDERS:
        inside = [n for n in remote if n.startswith(folder + "/") and n.count("/") == 1]
        weights = {n.split("/")[1]: n for n in inside if _WEIGHTS.match(n.split("/")[1])}
        out |= {n for n in inside if not n.split("/")[1].endswith((".safetensors", ".bin", ".ckpt", ".msgpack",
                                                                   ".onnx", ".pb", ".h5", ".onnx_data"))}
        for stem in ("diffusion_pytorch_model", "model"):
            pick = next((weights[f] for f in (f"{stem}.fp16.safetensors", f"{stem}.safetensors", f"{stem}.fp16.bin",
                                              f"{stem}.bin") if f in weights), None)
            if pick is not None:
                out.add(pick)
                break
    return tuple(sorted(out))
