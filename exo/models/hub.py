"""Downloads from the Hugging Face hub, by shard: a node fetches only what its own layers need.

A model on the hub is named ``org/name`` (a safetensors repo, or a GGUF repo: its default quant
file), ``org/name:FILE.gguf`` or ``org/name:Q4_K_M`` (a GGUF file by quant tag), with Ollama's
``hf.co/`` / ``huggingface.co/`` prefixes (``parse_hub_name``). ``HubDownloader`` then:

1. ``resolve``: lists the repo's files (sizes, LFS sha256) at a commit through
   ``huggingface_hub.HfApi`` and decides what the model is: ``"safetensors"`` or ``"gguf"``
   (which file, all its splits).
2. ``ensure_header``: a local path ``open_weights`` can open to learn the architecture and the
   layer count. Safetensors: the snapshot directory with config.json, the tokenizer files and
   model.safetensors.index.json (``hf_hub_download`` into the standard cache). GGUF: a sparse
   local file of the remote file's full size (one per split) holding the header, fetched by
   HTTP ``Range`` requests, and every small non-layer tensor (norms, rope factors), which the
   reader reads when it opens.
3. ``ensure_shard``: the safetensors files holding a shard's tensors, or only the byte ranges
   of a GGUF's shard tensors (what is already there is never fetched again: a re-partition
   fetches only what is missing, and a cut transfer resumes from its last byte written).
4. ``ensure_all``: everything (``exo pull``).

Cache layout (``$HF_HOME/hub``, or ``$HF_HUB_CACHE``), as ``huggingface_hub`` keeps it, plus one
directory of exo's own::

    models--org--name/
      refs/main                        commit hash of the revision
      blobs/<etag>                     files fetched whole (safetensors, config, tokenizer)
      snapshots/<commit>/<file>        -> ../../blobs/<etag>
      exo-partial/<commit>/
        listing.json                   the repo's files at the commit (for offline resolves)
        <file>.gguf                    sparse copy of a remote GGUF (split), its full size
        <file>.gguf.exo.json           sidecar: byte ranges present, remote size/sha256/commit

A GGUF stays in ``exo-partial`` even once every byte is present (and its sha256 checked): it
is a complete GGUF file there, and the same path serves every later shard.

Environment (read when a ``HubDownloader`` is made; arguments override): ``HF_ENDPOINT``,
``HF_TOKEN`` (sent as ``Authorization: Bearer``, never logged), ``HF_HOME`` / ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE`` (resolve and load from the cache only; no request is made). Note that
``huggingface_hub`` itself reads ``HF_HUB_OFFLINE`` once, at import: when it is on there, this
module is offline too.

Failing fast: every request has a timeout (``timeout``, 10 s); connection errors are not
retried in a loop (each file is checked with one HEAD before ``hf_hub_download``, whose own
retries after a failed HEAD would otherwise back off for ~23 s); a GGUF range transfer cut
after making progress resumes at once, at most ``resumes`` times. Errors reach the caller as
``DownloadError``, whose message names the model, the repo or file, and what to do.

Progress: ``DownloadProgress`` (``PROGRESS`` by default) holds per model id (the name the user
gave) the state, bytes needed / present, files and speed; ``snapshot()`` is JSON-able (the
shape is documented there). tqdm bars show each transfer in a terminal.

Everything here is synchronous, blocking I/O: the node calls it from a thread.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The GGUF quant picked from a repo when the name gives none (Ollama's default too).
DEFAULT_QUANT = "Q4_K_M"
#: Files fetched with a safetensors model's header, those the repo has.
HEADER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
                "model.safetensors.index.json")
INDEX_FILE = "model.safetensors.index.json"
#: First bytes of a GGUF fetched for its header; grown as ``GGUFTruncated.needed`` says.
HEADER_PROBE = 1 << 20
#: Missing GGUF ranges closer than this are fetched in one request.
COALESCE_GAP = 64 << 10
#: A range transfer records its progress in the sidecar (after an fdatasync) this often.
CHECKPOINT_BYTES = 32 << 20
CHECKPOINT_SECONDS = 5.0
#: Seconds to wait for the hub to connect or answer (each request).
TIMEOUT = 10.0
#: Times a cut GGUF range transfer that made progress is resumed within one call.
RESUMES = 3
#: Directory of exo's own files in a repo's cache folder.
PARTIAL_DIR = "exo-partial"
SIDECAR_SUFFIX = ".exo.json"

_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_NAME_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_NAME_PART}/{_NAME_PART}$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_FILE = re.compile(r"^[A-Za-z0-9_.-][A-Za-z0-9_./+-]*\.gguf$", re.IGNORECASE)
_HUB_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "https://hf.co/", "http://hf.co/",
                 "huggingface.co/", "hf.co/")


class DownloadError(Exception):
    """A model could not be resolved or downloaded. The message is written for users: it names
    the model, the repo or file, and what to do (set HF_TOKEN, go online, check the name)."""


# ---------------------------------------------------------------------------------------- names


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


# ---------------------------------------------------------------------------------------- models


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
        kind: "gguf" or "safetensors".
        files: the weight files: a GGUF's splits in order, or the repo's safetensors files.
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
        return self.snapshot if self.kind == "safetensors" else self.partial_dir / self.files[0]


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
            raise DownloadError(f"{model_id}: {ref.repo_id} lacks {len(missing)} split(s) of {name}: {', '.join(missing)}")
        return tuple(splits)

    if ref.filename is not None:
        if ref.filename not in remote:
            raise DownloadError(f"{model_id}: {ref.repo_id} has no file {ref.filename} (its GGUF files: {available})")
        return "gguf", group(ref.filename)
    if ref.quant is not None:
        matching = [n for n in models if _quant_matches(ref.quant, n)]
        if not matching:
            matching = [n for n in models if ref.quant.lower() in n.rsplit("/", 1)[-1].lower()]
        if not matching:
            raise DownloadError(f"{model_id}: {ref.repo_id} has no GGUF file for quant {ref.quant} "
                                f"(its GGUF files: {available})")
        return "gguf", group(matching[0])
    safetensors = [n for n in names if n.endswith(".safetensors") and "/" not in n]
    if safetensors and "config.json" in remote:
        preferred = [n for n in safetensors if not n.startswith("consolidated")] or safetensors
        return "safetensors", tuple(preferred)
    if models:
        default = [n for n in models if _quant_matches(DEFAULT_QUANT, n)]
        return "gguf", group((default or models)[0])
    raise DownloadError(f"{model_id}: {ref.repo_id} holds no model exo can read (neither safetensors weights with a "
                        f"config.json nor a .gguf file)")


# ---------------------------------------------------------------------------------------- progress


class DownloadProgress:
    """Download progress of the models of this process, by model id (the name the user gave).
    Thread-safe; ``snapshot()`` is what ``GET /v1/download/progress`` serves."""

    WINDOW_S = 5.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, dict[str, Any]] = {}

    def start(self, model_id: str, repo_id: str) -> None:
        """A download of ``model_id`` begins (its earlier totals are forgotten)."""
        now = time.time()
        with self._lock:
            self._models[model_id] = {"repo_id": repo_id, "state": "downloading", "files": {}, "error": None,
                                      "started_at": now, "updated_at": now, "fetched": 0, "speed": 0.0,
                                      "samples": collections.deque([(time.monotonic(), 0)])}

    def set_file(self, model_id: str, file: str, total: int, done: int) -> None:
        """``file`` needs ``total`` bytes for this download, ``done`` of them present."""
        with self._lock:
            m = self._models.get(model_id)
            if m is not None:
                m["files"][file] = {"bytes_total": int(total), "bytes_done": int(min(done, total))}
                m["updated_at"] = time.time()

    def advance(self, model_id: str, file: str, n: int) -> None:
        """``n`` more bytes of ``file`` arrived (negative: discarded)."""
        with self._lock:
            m = self._models.get(model_id)
            if m is None:
                return
            f = m["files"].setdefault(file, {"bytes_total": 0, "bytes_done": 0})
            f["bytes_done"] = max(0, min(f["bytes_done"] + n, f["bytes_total"] or f["bytes_done"] + n))
            m["fetched"] += n
            now = time.monotonic()
            samples = m["samples"]
            if now - samples[-1][0] >= 0.2:
                samples.append((now, m["fetched"]))
                while len(samples) > 2 and now - samples[0][0] > self.WINDOW_S:
                    samples.popleft()
                t0, b0 = samples[0]
                m["speed"] = (m["fetched"] - b0) / (now - t0) if now > t0 else 0.0
            m["updated_at"] = time.time()

    def finish(self, model_id: str) -> None:
        """The download is complete: every file's bytes are done."""
        with self._lock:
            m = self._models.get(model_id)
            if m is None:
                return
            for f in m["files"].values():
                f["bytes_done"] = f["bytes_total"]
            m["state"] = "done"
            m["updated_at"] = time.time()
            elapsed = m["updated_at"] - m["started_at"]
            m["speed"] = m["fetched"] / elapsed if elapsed > 0 else 0.0

    def fail(self, model_id: str, message: str) -> None:
        with self._lock:
            m = self._models.get(model_id)
            if m is None:
                return
            m["state"], m["error"], m["updated_at"] = "error", message, time.time()

    def get(self, model_id: str) -> dict[str, Any] | None:
        """``model_id``'s entry of ``snapshot()``, or None."""
        return self.snapshot().get(model_id)

    def forget(self, model_id: str) -> None:
        with self._lock:
            self._models.pop(model_id, None)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every model's progress, JSON-able::

            {"<model id>": {
                "repo_id": "org/name",
                "state": "downloading" | "done" | "error",
                "bytes_total": int,        # bytes this node needs (header + its shard, or all)
                "bytes_done": int,         # of those, present now
                "speed": float,            # bytes/s (last 5 s; the average once done)
                "files": {"<file>": {"bytes_total": int, "bytes_done": int}},
                "error": str | None,       # the DownloadError's message
                "started_at": float, "updated_at": float}}   # unix seconds
        """
        with self._lock:
            out = {}
            for model_id, m in self._models.items():
                files = {name: dict(f) for name, f in m["files"].items()}
                out[model_id] = {"repo_id": m["repo_id"], "state": m["state"],
                                 "bytes_total": sum(f["bytes_total"] for f in files.values()),
                                 "bytes_done": sum(f["bytes_done"] for f in files.values()),
                                 "speed": round(float(m["speed"]), 1), "files": files, "error": m["error"],
                                 "started_at": m["started_at"], "updated_at": m["updated_at"]}
            return out


#: This process's download progress.
PROGRESS = DownloadProgress()


@functools.cache
def _reporting_bar():
    """A huggingface_hub tqdm class whose ``update`` also calls ``report(n)``."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class ReportingBar(hf_tqdm):
        def __init__(self, *args, report=None, **kwargs):
            self._report = report
            kwargs.setdefault("disable", None)  # a bar on a terminal only
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if self._report is not None and n:
                self._report(n)
            return super().update(n)

    return ReportingBar


# ---------------------------------------------------------------------------------------- byte ranges


class _Ranges:
    """A set of byte ranges ``[start, end)``, kept sorted, disjoint and merged."""

    def __init__(self, spans=()):
        self.spans: list[tuple[int, int]] = []
        for s, e in spans:
            self.add(s, e)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        out, placed = [], False
        for s, e in self.spans:
            if e < start or s > end:
                if s > end and not placed:
                    out.append((start, end))
                    placed = True
                out.append((s, e))
            else:
                start, end = min(s, start), max(e, end)
        if not placed:
            out.append((start, end))
        self.spans = sorted(out)

    def __or__(self, other: "_Ranges") -> "_Ranges":
        return _Ranges(self.spans + other.spans)

    def __sub__(self, other: "_Ranges") -> "_Ranges":
        out = []
        for s, e in self.spans:
            cur = s
            for os_, oe in other.spans:
                if oe <= cur or os_ >= e:
                    continue
                if os_ > cur:
                    out.append((cur, os_))
                cur = max(cur, oe)
                if cur >= e:
                    break
            if cur < e:
                out.append((cur, e))
        return _Ranges(out)

    def __and__(self, other: "_Ranges") -> "_Ranges":
        return self - (self - other)

    @property
    def total(self) -> int:
        return sum(e - s for s, e in self.spans)

    def covers(self, start: int, end: int) -> bool:
        return not (_Ranges([(start, end)]) - self).spans

    def prefix(self) -> int:
        """End of the range that starts at byte 0 (0 if none)."""
        return self.spans[0][1] if self.spans and self.spans[0][0] == 0 else 0

    def coalesced(self, gap: int) -> list[tuple[int, int]]:
        out: list[list[int]] = []
        for s, e in self.spans:
            if out and s - out[-1][1] <= gap:
                out[-1][1] = e
            else:
                out.append([s, e])
        return [(s, e) for s, e in out]


_file_locks: dict[str, threading.Lock] = {}
_file_locks_guard = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    with _file_locks_guard:
        return _file_locks.setdefault(str(path), threading.Lock())


class _PartialFile:
    """A local sparse copy of a remote file, its full size, and the sidecar saying which byte
    ranges of it are present. The sidecar never claims bytes not yet synced to disk."""

    def __init__(self, path: Path, remote: RemoteFile, repo_id: str, commit: str, create: bool):
        self.path, self.remote, self.repo_id, self.commit = path, remote, repo_id, commit
        self.sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
        if remote.size is None:
            raise DownloadError(f"{repo_id}: the hub gave no size for {remote.name}")
        self.size = remote.size
        self.present = _Ranges()
        self.verified = False
        self.fd: int | None = None
        state = None
        if self.sidecar.is_file() and path.is_file():
            try:
                state = json.loads(self.sidecar.read_text())
            except ValueError:
                state = None
        # no sidecar, or one for other bytes (another size or etag): nothing is known present
        if state and state.get("size") == self.size and state.get("etag") == remote.etag \
                and path.stat().st_size == self.size:
            self.present = _Ranges(tuple(r) for r in state.get("ranges", []))
            self.verified = bool(state.get("verified"))
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size != self.size:
                    os.ftruncate(fd, self.size)  # sparse: holes take no disk space
                    self.present = _Ranges()
            finally:
                os.close(fd)

    def open(self) -> None:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def read(self, start: int, end: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def write(self, pos: int, data: bytes) -> None:
        assert self.fd is not None
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n

    def checkpoint(self, start: int, end: int) -> None:
        """Bytes ``[start, end)`` are written: sync them, then record them in the sidecar."""
        if end > start:
            if self.fd is not None:
                os.fdatasync(self.fd)
            self.present.add(start, end)
        self.save()

    def save(self) -> None:
        state = {"version": 1, "repo_id": self.repo_id, "file": self.remote.name, "commit": self.commit,
                 "size": self.size, "etag": self.remote.etag, "sha256": self.remote.sha256,
                 "ranges": [list(r) for r in self.present.spans], "verified": self.verified}
        tmp = self.sidecar.with_name(self.sidecar.name + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.sidecar)

    @property
    def complete(self) -> bool:
        return self.present.covers(0, self.size)


# ---------------------------------------------------------------------------------------- downloader


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


class _TransferCut(Exception):
    """A range transfer stopped at byte ``pos`` because of ``cause`` (an httpx transport error)."""

    def __init__(self, pos: int, cause: Exception):
        super().__init__(f"cut at byte {pos}: {cause}")
        self.pos, self.cause = pos, cause


@dataclass
class _Operation:
    """One ensure_* call: the bytes it needs per file (for its progress)."""

    model: HubModel
    need: dict[str, _Ranges] = field(default_factory=dict)


class HubDownloader:
    """Resolves hub models and downloads what a node needs of them, into the HF cache.

    Args:
        endpoint: the hub (default ``HF_ENDPOINT``, else huggingface.co).
        token: the access token (default ``HF_TOKEN``; None: huggingface_hub's own lookup).
        cache_dir: the hub cache (default ``HF_HUB_CACHE``, else ``$HF_HOME/hub``).
        offline: resolve and load from the cache only (default ``HF_HUB_OFFLINE``).
        progress: where progress goes (default ``PROGRESS``).
        header_probe: first bytes of a GGUF fetched for its header.
        resumes: times a cut GGUF range transfer is resumed within one call.
        verify: check the sha256 of whole files the hub gives one for.
        timeout: seconds to wait for the hub to connect or answer.
    """

    def __init__(self, endpoint: str | None = None, token: str | None = None, cache_dir: str | Path | None = None,
                 offline: bool | None = None, progress: DownloadProgress | None = None,
                 header_probe: int = HEADER_PROBE, resumes: int = RESUMES, verify: bool = True,
                 timeout: float = TIMEOUT):
        from huggingface_hub import constants

        env = os.environ
        self.endpoint = (endpoint or env.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        self._token = token if token is not None else (env.get("HF_TOKEN") or None)
        if cache_dir is None:
            home = env.get("HF_HOME")
            cache_dir = env.get("HF_HUB_CACHE") or (Path(home) / "hub" if home else constants.HF_HUB_CACHE)
        self.cache_dir = Path(cache_dir).expanduser()
        if offline is None:
            offline = _truthy(env.get("HF_HUB_OFFLINE")) or constants.is_offline_mode()
        self.offline = offline
        self.progress = progress if progress is not None else PROGRESS
        self.header_probe = max(64, int(header_probe))
        self.resumes = int(resumes)
        self.verify = verify
        self.timeout = float(timeout)

    def __repr__(self) -> str:  # never shows the token
        return f"HubDownloader(endpoint={self.endpoint!r}, cache_dir={str(self.cache_dir)!r}, offline={self.offline})"

    # ------------------------------------------------------------------------------ resolve

    def storage(self, repo_id: str) -> Path:
        """The cache folder of ``repo_id``."""
        return self.cache_dir / ("models--" + repo_id.replace("/", "--"))

    def resolve(self, ref: HubRef | str, model_id: str | None = None) -> HubModel:
        """List ``ref``'s repo at its revision and decide what to download.

        Args:
            ref: a ``HubRef`` or a hub name (``parse_hub_name``).
            model_id: the name progress is kept under (default: ``ref`` as given).

        Raises:
            DownloadError: not a hub name; the repo, revision, file or quant is missing; the
                repo is gated or private (HF_TOKEN needed); the hub cannot be reached; offline
                with nothing cached.
        """
        if isinstance(ref, str):
            parsed = parse_hub_name(ref)
            if parsed is None:
                raise DownloadError(f"{ref!r} is not a Hugging Face model name (org/name, org/name:FILE.gguf, "
                                    f"org/name:Q4_K_M, hf.co/org/name:TAG)")
            model_id, ref = model_id or ref, parsed
        model_id = model_id or str(ref)
        if self.offline:
            commit, remote = self._listing_offline(ref, model_id)
        else:
            commit, remote = self._listing_online(ref, model_id)
        kind, files = _choose(ref, remote, model_id)
        model = HubModel(model_id, ref, commit, kind, files, remote, self.storage(ref.repo_id))
        logger.info("%s: %s at %s, %s %s%s", model_id, ref.repo_id, commit[:12], kind, ", ".join(files[:4]),
                    " ..." if len(files) > 4 else "")
        return model

    def _listing_online(self, ref: HubRef, model_id: str) -> tuple[str, dict[str, RemoteFile]]:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self._token, library_name="exo")
        try:
            info = api.model_info(ref.repo_id, revision=ref.revision, files_metadata=True, timeout=self.timeout)
        except Exception as e:
            raise self._error(e, model_id, ref.repo_id, revision=ref.revision) from e
        if not info.sha:
            raise DownloadError(f"{model_id}: the hub at {self.endpoint} gave no commit for {ref.repo_id}")
        remote = {}
        for s in info.siblings or []:
            sha = s.lfs.sha256 if s.lfs else None
            size = s.lfs.size if s.lfs else s.size
            remote[s.rfilename] = RemoteFile(s.rfilename, size, sha, sha or s.blob_id)
        storage = self.storage(ref.repo_id)
        try:  # the listing, for offline resolves; the ref, as huggingface_hub keeps it
            listing = storage / PARTIAL_DIR / info.sha / "listing.json"
            listing.parent.mkdir(parents=True, exist_ok=True)
            tmp = listing.with_name("listing.json.tmp")
            tmp.write_text(json.dumps({"repo_id": ref.repo_id, "commit": info.sha, "files": {
                n: {"size": f.size, "sha256": f.sha256, "etag": f.etag} for n, f in remote.items()}}))
            os.replace(tmp, listing)
            if ref.revision != info.sha:
                (storage / "refs").mkdir(parents=True, exist_ok=True)
                (storage / "refs" / ref.revision).write_text(info.sha)
            (storage / "snapshots").mkdir(exist_ok=True)  # `hf cache scan` wants one, even for a GGUF
        except OSError as e:
            raise DownloadError(f"{model_id}: cannot write to the Hugging Face cache {self.cache_dir}: {e}") from e
        return info.sha, remote

    def _listing_offline(self, ref: HubRef, model_id: str) -> tuple[str, dict[str, RemoteFile]]:
        storage = self.storage(ref.repo_id)
        wanted = (f" and {ref.filename}" if ref.filename else f" and its {ref.quant} GGUF file" if ref.quant
                  else " and every file of the model")
        commit = ref.revision if _COMMIT.match(ref.revision) else None
        ref_file = storage / "refs" / ref.revision
        if commit is None and ref_file.is_file():
            commit = ref_file.read_text().strip()
        if not commit:
            raise DownloadError(f"{model_id}: offline (HF_HUB_OFFLINE is set) and {ref.repo_id} is not in the Hugging Face "
                                f"cache {self.cache_dir}: missing {ref_file}{wanted}. Download it while online (exo pull).")
        remote: dict[str, RemoteFile] = {}
        listing = storage / PARTIAL_DIR / commit / "listing.json"
        if listing.is_file():
            for n, f in json.loads(listing.read_text())["files"].items():
                remote[n] = RemoteFile(n, f.get("size"), f.get("sha256"), f.get("etag"))
        else:  # a cache filled by other tools: what the snapshot holds
            snapshot = storage / "snapshots" / commit
            if snapshot.is_dir():
                for p in sorted(snapshot.rglob("*")):
                    if p.is_file():
                        n = p.relative_to(snapshot).as_posix()
                        remote[n] = RemoteFile(n, p.stat().st_size)
        if not remote:
            raise DownloadError(f"{model_id}: offline (HF_HUB_OFFLINE is set) and nothing of {ref.repo_id} at commit "
                                f"{commit[:12]} is in the Hugging Face cache ({storage}): missing its listing{wanted}.")
        return commit, remote

    # ------------------------------------------------------------------------------ ensure

    def ensure_header(self, model: HubModel) -> Path:
        """Make ``model.local_path`` openable by ``open_weights`` (architecture, layer count);
        returns it. Safetensors: config, tokenizer files and the index (a model without an
        index: its weights file). GGUF: each split's header and small non-layer tensors.

        Raises:
            DownloadError: as ``resolve``; offline with the header not cached (files named).
        """
        with self._operation(model) as op:
            return self._header(op)

    def ensure_shard(self, model: HubModel, start_layer: int, end_layer: int) -> Path:
        """Download what layers ``[start_layer, end_layer]`` need (and the header); returns
        ``model.local_path``, from which ``open_weights`` reads that shard.

        Raises:
            DownloadError: as ``ensure_header``; a transfer failed (or was cut more than
                ``resumes`` times); a size or sha256 check failed; offline and missing files.
            ValueError: the layers are not within the model's.
            WeightsError, GGUFError, UnsupportedModelError: a model exo cannot read.
        """
        with self._operation(model) as op:
            path = self._header(op)
            from exo.models.weights import open_weights

            w = open_weights(path)
            n = w.args.n_layers
            if not 0 <= start_layer <= end_layer < n:
                raise ValueError(f"layers [{start_layer}, {end_layer}] are not within {model.model_id}'s {n} layers")
            names = set(w.shard_tensor_names(start_layer, end_layer))
            if end_layer == n - 1 and w.args.tie_word_embeddings:
                names.add("embed")  # the tied head reads the embedding
            logger.info("%s: layers %d-%d of %d", model.model_id, start_layer, end_layer, n)
            if model.kind == "safetensors":
                self._fetch_files(op, sorted(w.files_for(names)))
            else:
                by_file: dict[int, list[tuple[int, int]]] = {}
                for f, s, e in w.byte_ranges(names):
                    by_file.setdefault(f, []).append((s, e))
                for i, name in enumerate(model.files):
                    if i in by_file:
                        self._fetch_ranges(op, name, by_file[i])
            return path

    def is_complete(self, model: HubModel) -> bool:
        """Whether every weight file of ``model`` is in the cache, whole (no I/O but the cache's).

        A GGUF is complete when its sparse copies hold every byte; safetensors when the
        snapshot has every file its index names (or its one weights file)."""
        if model.kind == "safetensors":
            index = model.snapshot / INDEX_FILE
            files = (sorted(set((json.loads(index.read_text()).get("weight_map") or {}).values()))
                     if index.is_file() else list(model.files))
            return bool(files) and all((model.snapshot / f).is_file() for f in files)
        for name in model.files:
            path = model.partial_dir / name
            if not path.is_file() or not _PartialFile(path, model.remote[name], model.repo_id, model.commit, create=False).complete:
                return False
        return True

    def ensure_all(self, model: HubModel) -> Path:
        """Download the whole model (``exo pull``); returns ``model.local_path``.

        Raises:
            DownloadError: as ``ensure_shard``.
        """
        with self._operation(model) as op:
            path = self._header(op)
            if model.kind == "safetensors":
                index = model.snapshot / INDEX_FILE
                if index.is_file():
                    files = sorted(set((json.loads(index.read_text()).get("weight_map") or {}).values()))
                else:
                    files = list(model.files)
                self._fetch_files(op, files)
            else:
                for name in model.files:
                    self._fetch_ranges(op, name, [(0, model.remote[name].size or 0)])
            return path

    @contextmanager
    def _operation(self, model: HubModel) -> Iterator[_Operation]:
        self.progress.start(model.model_id, model.repo_id)
        try:
            yield _Operation(model)
        except DownloadError as e:
            self.progress.fail(model.model_id, str(e))
            raise
        except OSError as e:  # the local disk: full, read-only, ... (the message names the path)
            err = DownloadError(f"{model.model_id}: {e}")
            self.progress.fail(model.model_id, str(err))
            raise err from e
        except Exception as e:
            self.progress.fail(model.model_id, str(e))
            raise
        self.progress.finish(model.model_id)

    def _header(self, op: _Operation) -> Path:
        model = op.model
        if model.kind == "safetensors":
            if "config.json" not in model.remote:
                raise DownloadError(f"{model.model_id}: {model.repo_id} has no config.json")
            files = [f for f in HEADER_FILES if f in model.remote]
            if INDEX_FILE not in model.remote:
                files += list(model.files)  # no index: the weights file says which tensors it holds
            self._fetch_files(op, files)
            return model.snapshot
        for i, name in enumerate(model.files):
            self._gguf_header(op, name, i)
        return model.local_path

    # ------------------------------------------------------------------------------ whole files

    def _fetch_files(self, op: _Operation, names: list[str]) -> None:
        """Files of the model into the snapshot, through ``hf_hub_download``."""
        model = op.model
        missing = [n for n in names if n not in model.remote]
        if missing:
            raise DownloadError(f"{model.model_id}: {model.repo_id} has no file {', '.join(missing)}")
        todo = []
        for name in names:
            size = model.remote[name].size or 0
            present = (model.snapshot / name).exists()
            self.progress.set_file(model.model_id, name, size, size if present else 0)
            if not present:
                todo.append(name)
        if not todo:
            return
        if self.offline:
            raise DownloadError(f"{model.model_id}: offline (HF_HUB_OFFLINE is set) and {len(todo)} file(s) of "
                                f"{model.repo_id} are not in the cache ({model.snapshot}): {', '.join(todo)}")
        logger.info("%s: downloading %s (%d bytes)", model.model_id, ", ".join(todo),
                    sum(model.remote[n].size or 0 for n in todo))
        for name in todo:
            self._fetch_file(op, name)

    def _fetch_file(self, op: _Operation, name: str) -> None:
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

        model, remote = op.model, op.model.remote[name]
        url = hf_hub_url(model.repo_id, name, revision=model.commit, endpoint=self.endpoint)
        try:
            # One HEAD, no retries: fail fast where the library would back off for ~23 s.
            meta = get_hf_file_metadata(url, token=self._token, timeout=self.timeout, endpoint=self.endpoint,
                                        library_name="exo")
            if meta.size is not None and remote.size is not None and meta.size != remote.size:
                raise DownloadError(f"{model.model_id}: {model.repo_id}/{name} is {meta.size} bytes on the hub, its "
                                    f"listing said {remote.size}; try again")
            bar = functools.partial(_reporting_bar(), report=lambda n: self.progress.advance(model.model_id, name, n))
            local = Path(hf_hub_download(model.repo_id, name, revision=model.commit, cache_dir=self.cache_dir,
                                         endpoint=self.endpoint, token=self._token, etag_timeout=self.timeout,
                                         tqdm_class=bar, library_name="exo"))
        except DownloadError:
            raise
        except Exception as e:
            raise self._error(e, model.model_id, model.repo_id, file=name, revision=model.commit) from e
        size = local.stat().st_size
        if remote.size is not None and size != remote.size:
            self._discard(local)
            raise DownloadError(f"{model.model_id}: {model.repo_id}/{name} arrived with {size} bytes, expected "
                                f"{remote.size}; discarded, try again")
        if self.verify and remote.sha256 and _sha256(local) != remote.sha256:
            self._discard(local)
            raise DownloadError(f"{model.model_id}: {model.repo_id}/{name} does not match its sha256 "
                                f"{remote.sha256}; discarded, try again")
        self.progress.set_file(model.model_id, name, remote.size or size, remote.size or size)

    @staticmethod
    def _discard(pointer: Path) -> None:
        blob = Path(os.path.realpath(pointer))
        for p in (pointer, blob):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------------------ GGUF ranges

    def _gguf_header(self, op: _Operation, name: str, index: int) -> None:
        from exo.models.gguf import GGUFError, GGUFTruncated, parse_header

        model = op.model
        n = self.header_probe
        while True:
            part = self._fetch_ranges(op, name, [(0, n)])
            n = min(part.size, max(n, part.present.prefix()))  # parse all that is there
            try:
                header = parse_header(part.read(0, n), source=f"{model.repo_id}/{name}", file=index)
                break
            except GGUFTruncated as e:
                if n >= part.size:
                    raise DownloadError(f"{model.model_id}: {model.repo_id}/{name} is not a whole GGUF file: {e}") from None
                n = min(part.size, max(e.needed, 2 * n))
            except GGUFError as e:
                raise DownloadError(f"{model.model_id}: {model.repo_id}/{name} is not a GGUF model: {e}") from None
        small = [(t.offset, t.end) for t in header.tensors
                 if not t.name.startswith("blk.") and t.name not in ("token_embd.weight", "output.weight")]
        self._fetch_ranges(op, name, [(0, header.data_offset)] + small)  # the header itself: present, counted

    def _fetch_ranges(self, op: _Operation, name: str, ranges: list[tuple[int, int]]) -> _PartialFile:
        """Bytes ``ranges`` of GGUF file ``name`` into its sparse copy, fetching only those not
        present; checks the sha256 once every byte is present. Returns the file's state."""
        model = op.model
        path = model.partial_dir / name
        with _lock_for(path):
            if self.offline and not path.is_file():
                raise DownloadError(f"{model.model_id}: offline (HF_HUB_OFFLINE is set) and {model.repo_id}/{name} is "
                                    f"not in the cache (no {path})")
            part = _PartialFile(path, model.remote[name], model.repo_id, model.commit, create=not self.offline)
            want = _Ranges((max(0, s), min(part.size, e)) for s, e in ranges)
            need = op.need.setdefault(name, _Ranges())
            need.spans = (need | want).spans
            self.progress.set_file(model.model_id, name, need.total, (need & part.present).total)
            missing = want - part.present
            if missing.spans:
                if self.offline:
                    raise DownloadError(f"{model.model_id}: offline (HF_HUB_OFFLINE is set) and {missing.total} bytes of "
                                        f"{model.repo_id}/{name} this node needs are not in the cache ({path})")
                part.open()
                try:
                    self._download_ranges(op, part, missing.coalesced(COALESCE_GAP))
                finally:
                    part.close()
            if part.complete and self.verify and part.remote.sha256 and not part.verified:
                if _sha256(path) != part.remote.sha256:
                    part.present = _Ranges()
                    part.save()
                    raise DownloadError(f"{model.model_id}: {model.repo_id}/{name} does not match its sha256 "
                                        f"{part.remote.sha256}; its bytes were discarded, try again")
                part.verified = True
                part.save()
            return part

    def _download_ranges(self, op: _Operation, part: _PartialFile, spans: list[tuple[int, int]]) -> None:
        """GET each of ``spans`` into ``part``; a transfer cut after making progress resumes
        from its last byte (at most ``resumes`` times a span), anything else fails at once."""
        import httpx2
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session

        model = op.model
        name = part.remote.name
        url = hf_hub_url(model.repo_id, name, revision=model.commit, endpoint=self.endpoint)
        headers = build_hf_headers(token=self._token, library_name="exo")
        headers["Accept-Encoding"] = "identity"
        timeout = httpx2.Timeout(self.timeout)
        total = sum(e - s for s, e in spans)
        logger.info("%s: fetching %d bytes of %s in %d range(s)", model.model_id, total, name, len(spans))
        bar = _reporting_bar()(total=total, unit="B", unit_scale=True, desc=name[-40:],
                               report=lambda n: self.progress.advance(model.model_id, name, n))
        try:
            for start, end in spans:
                pos, resumes = start, self.resumes
                while pos < end:
                    try:
                        pos = self._stream_range(get_session(), url, headers, timeout, part, pos, end, bar)
                    except _TransferCut as cut:
                        resumable = cut.pos > pos and not isinstance(cut.cause, httpx2.ConnectError)
                        if resumable and resumes > 0:
                            logger.warning("%s: the transfer of %s was cut at byte %d (%s); resuming", model.model_id,
                                           name, cut.pos, cut.cause)
                            pos, resumes = cut.pos, resumes - 1
                            continue
                        raise self._error(cut.cause, model.model_id, model.repo_id, file=name,
                                          revision=model.commit) from cut.cause
                    except DownloadError as e:
                        raise DownloadError(f"{model.model_id}: {e}") from None
                    except Exception as e:
                        raise self._error(e, model.model_id, model.repo_id, file=name, revision=model.commit) from e
        finally:
            bar.close()

    @staticmethod
    def _stream_range(session, url: str, headers: dict[str, str], timeout, part: _PartialFile, start: int, end: int,
                      bar) -> int:
        """GET bytes ``[start, end)`` into ``part``; returns ``end``. Whatever happens, the bytes
        written are recorded in the sidecar first.

        Raises:
            _TransferCut: the connection failed or ended early (``pos``: the byte reached).
            DownloadError: the answer is not the range asked for. HfHubHTTPError: an HTTP error.
        """
        import httpx2
        from huggingface_hub.utils import hf_raise_for_status

        pos = last_checkpoint = start
        last_time = time.monotonic()
        try:
            with session.stream("GET", url, headers={**headers, "Range": f"bytes={start}-{end - 1}"}, timeout=timeout,
                                follow_redirects=True) as response:
                hf_raise_for_status(response)
                if response.status_code == 206:
                    content_range = response.headers.get("Content-Range", "")
                    expected = f"bytes {start}-{end - 1}/{part.size}"
                    if content_range.strip() != expected:
                        raise DownloadError(f"{part.repo_id}/{part.remote.name}: asked for {expected}, the hub sent "
                                            f"{content_range or 'no Content-Range'} (the file changed?)")
                elif response.status_code == 200 and start == 0:  # no range support: the first bytes will do
                    length = response.headers.get("Content-Length")
                    if length is not None and int(length) != part.size:
                        raise DownloadError(f"{part.repo_id}/{part.remote.name} is {length} bytes on the hub, its "
                                            f"listing said {part.size}")
                else:
                    raise DownloadError(f"{part.repo_id}/{part.remote.name}: the hub answered HTTP "
                                        f"{response.status_code} to a range request")
                for chunk in response.iter_bytes():  # as it arrives: a cut loses nothing received
                    chunk = chunk[:end - pos]
                    part.write(pos, chunk)
                    pos += len(chunk)
                    bar.update(len(chunk))
                    if pos - last_checkpoint >= CHECKPOINT_BYTES or time.monotonic() - last_time >= CHECKPOINT_SECONDS:
                        part.checkpoint(last_checkpoint, pos)
                        last_checkpoint, last_time = pos, time.monotonic()
                    if pos >= end:
                        break
        except httpx2.TransportError as e:
            part.checkpoint(last_checkpoint, pos)
            raise _TransferCut(pos, e) from e
        except BaseException:
            part.checkpoint(last_checkpoint, pos)
            raise
        part.checkpoint(last_checkpoint, pos)
        if pos < end:
            raise _TransferCut(pos, httpx2.RemoteProtocolError(f"the transfer ended at byte {pos}, before byte {end}"))
        return pos

    # ------------------------------------------------------------------------------ errors

    def _error(self, e: BaseException, model_id: str, repo_id: str, file: str | None = None,
               revision: str | None = None) -> DownloadError:
        """A ``DownloadError`` for users, from what huggingface_hub or httpx raised."""
        import httpx2
        from huggingface_hub.errors import (
            GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, RemoteEntryNotFoundError,
            RepositoryNotFoundError, RevisionNotFoundError,
        )

        what = f"{repo_id}/{file}" if file else repo_id
        token_hint = "set HF_TOKEN to a token of an account that has access"
        if self._token:
            token_hint += " (the one given was refused)"
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, DownloadError):
            return e
        if isinstance(e, OfflineModeIsEnabled):
            return DownloadError(f"{model_id}: huggingface_hub is in offline mode (HF_HUB_OFFLINE) and {what} is not cached")
        if isinstance(e, GatedRepoError):
            return DownloadError(f"{model_id}: {repo_id} is a gated repo (HTTP {status}): accept its conditions on its "
                                 f"hub page, then {token_hint}")
        if isinstance(e, RepositoryNotFoundError):
            if status in (401, 403):
                return DownloadError(f"{model_id}: {repo_id} is private or gated, or does not exist (HTTP {status}): "
                                     f"{token_hint}")
            return DownloadError(f"{model_id}: repository {repo_id} not found on {self.endpoint} (HTTP {status})")
        if isinstance(e, RevisionNotFoundError):
            if file:
                return DownloadError(f"{model_id}: {what}: the hub has no revision {revision} (HTTP {status}); the repo "
                                     f"changed since it was listed: resolve it again")
            return DownloadError(f"{model_id}: {repo_id} has no revision {revision} (HTTP {status})")
        if isinstance(e, RemoteEntryNotFoundError):
            return DownloadError(f"{model_id}: {repo_id} has no file {file} (HTTP {status})")
        if isinstance(e, HfHubHTTPError):
            if status in (401, 403):
                return DownloadError(f"{model_id}: {what} is gated or private (HTTP {status}): {token_hint}")
            if status == 404:
                return DownloadError(f"{model_id}: {what} not found on {self.endpoint} (HTTP 404)")
            return DownloadError(f"{model_id}: the hub at {self.endpoint} answered HTTP {status} for {what}")
        if isinstance(e, LocalEntryNotFoundError) and e.__cause__ is not None:
            return self._error(e.__cause__, model_id, repo_id, file, revision)
        if isinstance(e, httpx2.TimeoutException):
            return DownloadError(f"{model_id}: the hub at {self.endpoint} did not answer within {self.timeout:g} s "
                                 f"({what})")
        if isinstance(e, (httpx2.ConnectError, LocalEntryNotFoundError)):
            return DownloadError(f"{model_id}: cannot reach the hub at {self.endpoint} ({e}) for {what}")
        if isinstance(e, httpx2.TransportError):
            return DownloadError(f"{model_id}: the transfer of {what} from {self.endpoint} failed ({e}); what arrived "
                                 f"is kept, try again")
        if isinstance(e, OSError):
            return DownloadError(f"{model_id}: {what}: {e}")
        return DownloadError(f"{model_id}: {what}: {type(e).__name__}: {e}")


__all__ = ["DownloadError", "HubRef", "HubModel", "RemoteFile", "HubDownloader", "DownloadProgress", "PROGRESS",
           "parse_hub_name", "DEFAULT_QUANT", "HEADER_FILES"]
