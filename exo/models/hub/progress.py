"""Download progress: ``DownloadProgress`` (``PROGRESS``, this process's), which
``GET /v1/download/progress`` serves, and the tqdm bar that feeds it from each transfer."""

from __future__ import annotations

import collections
import functools
import threading
import time
from typing import Any

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

    def set_file(self, model_id: str, file: str, total: int, done: int, sha256: str | None = None) -> None:
        """``file`` needs ``total`` bytes for this download, ``done`` of them present; its
        content's ``sha256`` when the hub gave one."""
        with self._lock:
            m = self._models.get(model_id)
            if m is not None:
                m["files"][file] = {"bytes_total": int(total), "bytes_done": int(min(done, total)), "sha256": sha256}
                m["updated_at"] = time.time()

    def advance(self, model_id: str, file: str, n: int) -> None:
        """``n`` more bytes of ``file`` arrived (negative: discarded)."""
        with self._lock:
            m = self._models.get(model_id)
            if m is None:
                return
            f = m["files"].setdefault(file, {"bytes_total": 0, "bytes_done": 0, "sha256": None})
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
                "files": {"<file>": {"bytes_total": int, "bytes_done": int,
                                     "sha256": str | None}},   # the file's content hash (LFS files)
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
