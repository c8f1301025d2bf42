"""What a hub model has in the cache, read without a request: the listing kept for offline
resolves, whether every weight file is whole, and removing a model's files."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from exo.models.hub.errors import DownloadError
from exo.models.hub.names import PARTIAL_DIR, HubModel, HubRef, RemoteFile
from exo.models.hub.partial import SIDECAR_SUFFIX, _lock_for, _PartialFile

#: Files fetched with a safetensors model's header, those the repo has.
HEADER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
                "model.safetensors.index.json")
INDEX_FILE = "model.safetensors.index.json"

logger = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class _CachedFiles:
    """``HubDownloader``'s cache half (no request is made here): it uses the downloader's
    ``cache_dir`` and ``storage``."""

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

    def is_complete(self, model: HubModel) -> bool:
        """Whether every weight file of ``model`` is in the cache, whole (no I/O but the cache's).

        A GGUF is complete when its sparse copies hold every byte; safetensors when the
        snapshot has every file its index names (or its one weights file)."""
        if model.kind == "diffusers":
            return all((model.snapshot / f).is_file() for f in model.files)
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

    def delete(self, model: HubModel) -> list[Path]:
        """Remove ``model``'s files from the cache (no request is made): its sparse GGUF copies
        and their sidecars, at every commit; its files in every snapshot, and the blobs no
        snapshot links to any more; then the repo's whole folder once no model file of it is
        left (another quant of the same repo keeps it). Returns the files removed (empty:
        nothing of it was here).

        Raises:
            OSError: a file could not be removed (the message names it).
        """
        storage = model.storage
        names = set(model.files)
        if model.kind == "safetensors":
            names |= set(HEADER_FILES)
        removed: list[Path] = []

        def unlink(p: Path) -> None:
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass

        partial = storage / PARTIAL_DIR
        for commit_dir in sorted(partial.iterdir()) if partial.is_dir() else []:
            for name in model.files:
                path = commit_dir / name
                with _lock_for(path):  # not while a transfer writes it
                    for p in (path, path.with_name(path.name + SIDECAR_SUFFIX),
                              path.with_name(path.name + SIDECAR_SUFFIX + ".tmp")):
                        unlink(p)
        snapshots = storage / "snapshots"
        blobs: set[Path] = set()
        for snap in sorted(snapshots.iterdir()) if snapshots.is_dir() else []:
            index = snap / INDEX_FILE
            if model.kind == "safetensors" and index.is_file():
                try:
                    names |= set((json.loads(index.read_text()).get("weight_map") or {}).values())
                except ValueError:
                    pass
            for name in sorted(names):
                p = snap / name
                if p.is_symlink():
                    blobs.add(Path(os.path.realpath(p)))
                if p.is_symlink() or p.is_file():
                    unlink(p)
        if blobs:
            linked = {Path(os.path.realpath(p)) for p in snapshots.rglob("*") if p.is_symlink()}
            for blob in sorted(blobs - linked):
                if blob.is_relative_to(storage):
                    unlink(blob)
        left = (any(p.is_file() for p in snapshots.rglob("*")) if snapshots.is_dir() else False) or \
            (any(partial.rglob("*.gguf")) if partial.is_dir() else False)
        if removed and not left:  # nothing of the repo is left: its refs, listings and locks go too
            shutil.rmtree(storage, ignore_errors=True)
            shutil.rmtree(self.cache_dir / ".locks" / storage.name, ignore_errors=True)
        logger.info("%s: removed %d file(s) from %s", model.model_id, len(removed), storage)
        return removed
