"""Partial files: a local sparse copy of a remote GGUF (split) and its sidecar, which says
which byte ranges are present (``_Ranges``, ``_PartialFile``; one lock per file)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from exo.models.hub.errors import DownloadError
from exo.models.hub.names import RemoteFile

SIDECAR_SUFFIX = ".exo.json"


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()
