"""A Hugging Face hub on 127.0.0.1 for the download tests: the part of the hub's HTTP API that
``huggingface_hub`` 2.4 uses for ``HfApi.model_info`` / ``HfApi.list_repo_tree`` and
``hf_hub_download``, serving the repos of a directory, with instrumentation.

Layout: ``<root>/<org>/<name>/<files>`` is the repo ``org/name``; every repo has one revision,
``main``, whose commit hash is derived from its files' names, sizes and mtimes (so editing a
repo makes a new commit). Files named ``*.gguf``, ``*.safetensors``, ``*.bin`` or larger than
10 MiB are served as Git LFS files (``lfs`` in listings, ``X-Linked-Etag`` / ``X-Linked-Size``
on ``resolve``: their sha256), the others as plain git blobs (ETag: the git blob sha1). There
is no redirect to a CDN and no xet header, so the library downloads over plain HTTP.

Routes (as huggingface.co answers them):
- ``GET /api/models/{org}/{name}[/revision/{rev}]`` (``?blobs=true``: sizes, blob ids, LFS info)
- ``GET /api/models/{org}/{name}/tree/{rev}[/{path}]`` (flat, unpaginated)
- ``HEAD|GET /{org}/{name}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag``, ``Content-Length``,
  ``Accept-Ranges: bytes``; a ``Range: bytes=a-b`` / ``bytes=a-`` answers 206 with ``Content-Range``.
Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``,
``GatedRepo``) the way the library expects. ``private`` repos answer 401 ``RepoNotFound`` to
anyone without their token; ``gated`` repos list their files to anyone but serve them only with
their token (401 ``GatedRepo`` without a token, 403 with a wrong one). With ``cdn`` set, LFS
files are not served by ``resolve`` but, as huggingface.co does, by a 302 to another origin
(``http://localhost:PORT/cdn/...``: the same server under another host name), so the client
must follow it and drop its Authorization header.

The server runs its own event loop in a daemon thread (``start`` / ``stop``), so tests drive the
synchronous downloader directly. Instrumentation (thread-safe): ``requests`` (one ``Served`` per
request), ``bytes_served(file)``, ``ranges(file)``, ``cut_next_transfer(after, file)`` (the
next body transfer of that file closes its connection after that many bytes), ``reset()``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")
LFS_MIN_SIZE = 10 << 20
CHUNK = 64 << 10
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Served:
    """One request: ``method``, ``repo`` (``org/name``), ``file`` (None for API calls), ``range``
    (the Range header), ``status``, ``authorization`` (the header, or None), ``sent`` (body bytes
    written), ``kind`` ("info", "tree", "redirect" (a 302 to the CDN) or "resolve" (a file's bytes))."""

    method: str
    repo: str
    file: str | None
    range: str | None
    status: int
    authorization: str | None
    sent: int
    kind: str


@dataclass(frozen=True)
class _Blob:
    size: int
    sha256: str
    git_sha1: str
    lfs: bool


class HubServer:
    """The hub of ``root``'s repos on ``127.0.0.1`` (a random port): ``start()`` returns the
    endpoint URL to put in ``HF_ENDPOINT``.

    Args:
        root: the directory of repos (``<root>/<org>/<name>/...``).
        private: repo id -> the token that may see it.
        gated: repo id -> the token that may download its files.
        cdn: redirect LFS files to another origin (can be switched later).
    """

    def __init__(self, root: Path, private: dict[str, str] | None = None, gated: dict[str, str] | None = None,
                 cdn: bool = False):
        self.root = Path(root)
        self.private = dict(private or {})
        self.gated = dict(gated or {})
        self.cdn = cdn
        self.url: str | None = None
        self._lock = threading.Lock()
        self._requests: list[Served] = []
        self._cut: tuple[int, str | None] | None = None  # (after bytes, only this file)
        self._blobs: dict[tuple[str, int, int], _Blob] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, port: int = 0) -> str:
        """Serve on ``127.0.0.1:port`` (0: a free port) from a new thread; returns the URL."""
        if self._thread is not None:
            raise RuntimeError("the hub server is already running")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hub-server", daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(port), self._loop).result(timeout=10)
        self.url = f"http://127.0.0.1:{self.port}"
        return self.url

    async def _start(self, port: int) -> int:
        self._runner = web.AppRunner(self.app(), shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        """Stop serving (connections to the port are refused from now on) and end the thread."""
        if self._thread is None:
            return
        assert self._loop is not None and self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._thread = self._loop = self._runner = None

    def __enter__(self) -> "HubServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ instrumentation

    @property
    def requests(self) -> list[Served]:
        with self._lock:
            return [dataclasses.replace(r) for r in self._requests]

    def reset(self) -> None:
        """Forget the requests served so far (and any pending cut)."""
        with self._lock:
            self._requests.clear()
            self._cut = None

    def bytes_served(self, file: str | None = None, repo: str | None = None) -> int:
        """Body bytes sent for ``file`` (any file when None) of ``repo`` (any repo when None)."""
        return sum(r.sent for r in self.requests if r.kind == "resolve" and (file is None or r.file == file)
                   and (repo is None or r.repo == repo))

    def ranges(self, file: str, repo: str | None = None) -> list[tuple[int, int]]:
        """``(start, end)`` byte ranges actually sent of ``file`` by GET, in order (end exclusive)."""
        out = []
        for r in self.requests:
            if r.kind == "resolve" and r.method == "GET" and r.file == file and (repo is None or r.repo == repo) \
                    and r.status in (200, 206):
                start = 0
                if r.range and (m := _RANGE.match(r.range)):
                    start = int(m[1])
                out.append((start, start + r.sent))
        return out

    def files_requested(self, repo: str | None = None) -> set[str]:
        """Names of the files any request (HEAD or GET) asked for."""
        return {r.file for r in self.requests if r.file is not None and (repo is None or r.repo == repo)}

    def cut_next_transfer(self, after: int, file: str | None = None) -> None:
        """Make the next GET of ``file`` (of any file when None) close its connection after
        ``after`` body bytes."""
        with self._lock:
            self._cut = (after, file)

    # ------------------------------------------------------------------ app

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}", self._info)
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self._info)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}", self._tree)
        app.router.add_get("/api/models/{org}/{name}/tree/{rev}/{path:.+}", self._tree)
        app.router.add_route("HEAD", "/{org}/{name}/resolve/{rev}/{path:.+}", self._resolve)
        app.router.add_get("/{org}/{name}/resolve/{rev}/{path:.+}", self._resolve, allow_head=False)
        app.router.add_route("HEAD", "/cdn/{org}/{name}/{rev}/{path:.+}", self._cdn)
        app.router.add_get("/cdn/{org}/{name}/{rev}/{path:.+}", self._cdn, allow_head=False)
        return app

    def _record(self, request: web.Request, repo: str, file: str | None, status: int, sent: int, kind: str) -> Served:
        entry = Served(request.method, repo, file, request.headers.get("Range"), status,
                       request.headers.get("Authorization"), sent, kind)
        with self._lock:
            self._requests.append(entry)
        return entry

    def _files(self, repo_dir: Path) -> list[Path]:
        return sorted(p for p in repo_dir.rglob("*") if p.is_file())

    def _commit(self, repo_dir: Path) -> str:
        h = hashlib.sha1()
        for p in self._files(repo_dir):
            st = p.stat()
            h.update(f"{p.relative_to(repo_dir).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def _blob(self, path: Path) -> _Blob:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._blobs:
                return self._blobs[key]
        sha256, git = hashlib.sha256(), hashlib.sha1(f"blob {st.st_size}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                sha256.update(chunk)
                git.update(chunk)
        blob = _Blob(st.st_size, sha256.hexdigest(), git.hexdigest(),
                     path.name.endswith(LFS_SUFFIXES) or st.st_size >= LFS_MIN_SIZE)
        with self._lock:
            self._blobs[key] = blob
        return blob

    @staticmethod
    def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
        return web.json_response({"error": message}, status=status,
                                 headers={"X-Error-Code": code, "X-Error-Message": message, **headers})

    def _check_repo(self, request: web.Request, files: bool) -> tuple[str, Path, str] | web.Response:
        """(repo id, its directory, its commit), or the error to answer."""
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        repo_dir = self.root / repo
        auth = request.headers.get("Authorization")
        if not repo_dir.is_dir():
            return self._error(404, "RepoNotFound", "Repository not found")
        if repo in self.private and auth != f"Bearer {self.private[repo]}":
            return self._error(401, "RepoNotFound", "Invalid username or password.")
        if files and repo in self.gated and auth != f"Bearer {self.gated[repo]}":
            status = 401 if auth is None else 403
            return self._error(status, "GatedRepo", f"Access to model {repo} is restricted. You must have access to it "
                                                    "and be authenticated to access it. Please log in.")
        commit = self._commit(repo_dir)
        rev = request.match_info.get("rev", "main")
        if rev not in ("main", commit):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo, repo_dir, commit

    async def _info(self, request: web.Request) -> web.Response:
        checked = self._check_repo(request, files=False)
        if isinstance(checked, web.Response):
            self._record(request, f"{request.match_info['org']}/{request.match_info['name']}", None, checked.status, 0, "info")
            return checked
        repo, repo_dir, commit = checked
        blobs = request.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for p in self._files(repo_dir):
            entry: dict = {"rfilename": p.relative_to(repo_dir).as_posix()}
            if blobs:
                b = self._blob(p)
                entry.update(size=b.size, blobId=b.git_sha1)
                if b.lfs:
                    entry["lfs"] = {"size": b.size, "sha256": b.sha256, "pointerSize": 134}
            siblings.append(entry)
        body = {"_id": commit[:24], "id": repo, "modelId": repo, "sha": commit, "private": repo in self.private,
                "gated": "manual" if repo in self.gated else False, "disabled": False, "tags": [], "siblings": siblings,
                "lastModified": "2026-01-01T00:00:00.000Z"}
        self._record(request, repo, None, 200, 0, "info")
        return web.json_response(body)

    async def _tree(self, request: web.Request) -> web.Response:
        checked = self._check_repo(request, files=False)
        if isinstance(checked, web.Response):
            self._record(request, f"{request.match_info['org']}/{request.match_info['name']}", None, checked.status, 0, "tree")
            return checked
        repo, repo_dir, _ = checked
        under = request.match_info.get("path", "").strip("/")
        out = []
        for p in self._files(repo_dir):
            rel = p.relative_to(repo_dir).as_posix()
            if under and not rel.startswith(under + "/"):
                continue
            b = self._blob(p)
            entry: dict = {"type": "file", "oid": b.git_sha1, "size": b.size, "path": rel}
            if b.lfs:
                entry["lfs"] = {"oid": b.sha256, "size": b.size, "pointerSize": 134}
            out.append(entry)
        self._record(request, repo, None, 200, 0, "tree")
        return web.json_response(out)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        file = request.match_info["path"]
        checked = self._check_repo(request, files=True)
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if isinstance(checked, web.Response):
            self._record(request, repo, file, checked.status, 0, "resolve")
            return checked
        repo, repo_dir, commit = checked
        path = repo_dir / file
        if ".." in Path(file).parts or not path.is_file():
            self._record(request, repo, file, 404, 0, "resolve")
            return self._error(404, "EntryNotFound", f"{file} does not exist on \"main\"", **{"X-Repo-Commit": commit})
        blob = self._blob(path)
        etag = blob.sha256 if blob.lfs else blob.git_sha1
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
            if self.cdn:  # as the hub does: a redirect to another host, which serves the bytes
                headers["Location"] = f"http://localhost:{self.port}/cdn/{repo}/{commit}/{file}"
                self._record(request, repo, file, 302, 0, "redirect")
                return web.Response(status=302, headers=headers)
        return await self._send(request, repo, file, path, blob, headers)

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        """The bytes of an LFS file, to anyone who has the URL (like a signed CDN URL)."""
        repo, file = f"{request.match_info['org']}/{request.match_info['name']}", request.match_info["path"]
        path = self.root / repo / file
        if ".." in Path(file).parts or not path.is_file() or request.match_info["rev"] != self._commit(self.root / repo):
            self._record(request, repo, file, 404, 0, "resolve")
            return web.Response(status=404)
        blob = self._blob(path)
        headers = {"ETag": f'"{blob.sha256}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        return await self._send(request, repo, file, path, blob, headers)

    async def _send(self, request: web.Request, repo: str, file: str, path: Path, blob: _Blob,
                    headers: dict[str, str]) -> web.StreamResponse:
        """``path``'s bytes (the Range asked for) with ``headers``, counted and maybe cut."""
        start, end, status = 0, blob.size, 200
        range_header = request.headers.get("Range")
        if range_header is not None:
            m = _RANGE.match(range_header.strip())
            if m is None or int(m[1]) >= blob.size or (m[2] and int(m[2]) < int(m[1])):
                self._record(request, repo, file, 416, 0, "resolve")
                return web.Response(status=416, headers={"Content-Range": f"bytes */{blob.size}"})
            start, end, status = int(m[1]), min(blob.size, int(m[2]) + 1 if m[2] else blob.size), 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start
        await response.prepare(request)
        if request.method == "HEAD":
            self._record(request, repo, file, status, 0, "resolve")
            return response
        cut = None
        with self._lock:
            if self._cut is not None and self._cut[1] in (None, file):
                cut, self._cut = self._cut[0], None
        limit = end - start if cut is None else min(cut, end - start)
        sent = 0
        entry = self._record(request, repo, file, status, 0, "resolve")
        with open(path, "rb") as f:
            f.seek(start)
            while sent < limit:
                chunk = f.read(min(CHUNK, limit - sent))
                if not chunk:
                    break
                with self._lock:  # counted before the client can have it
                    entry.sent += len(chunk)
                await response.write(chunk)
                sent += len(chunk)
        if sent < end - start:  # cut: drop the connection mid-body
            await asyncio.sleep(0.05)  # let the bytes written reach the client first
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError()
        await response.write_eof()
        return response


def make_repo(root: Path, repo_id: str, files: dict[str, Path | bytes | str]) -> Path:
    """Create (or add to) repo ``repo_id`` under ``root``: file name -> a path to hard-link or
    copy, or the content. Returns the repo directory."""
    import os
    import shutil

    repo_dir = Path(root) / repo_id
    for name, src in files.items():
        dst = repo_dir / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, Path):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        elif isinstance(src, bytes):
            dst.write_bytes(src)
        else:
            dst.write_text(src)
    return repo_dir


__all__ = ["HubServer", "Served", "make_repo"]


if __name__ == "__main__":  # serve a directory by hand: python test/hub_server.py ROOT
    import sys
    import time

    with HubServer(Path(sys.argv[1])) as server:
        print(json.dumps({"HF_ENDPOINT": server.url}), flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
