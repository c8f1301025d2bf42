"""``HubDownloader``: resolves hub models and downloads what a node needs of them into the HF
cache: whole files through ``hf_hub_download`` here, GGUF byte ranges in ``ranges``."""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from exo.models.hub.cache import HEADER_FILES, INDEX_FILE, _CachedFiles
from exo.models.hub.errors import DownloadError, hub_error
from exo.models.hub.names import PARTIAL_DIR, HubModel, HubRef, RemoteFile, _choose, parse_hub_name
from exo.models.hub.partial import _PartialFile, _Ranges, _sha256
from exo.models.hub.progress import PROGRESS, DownloadProgress, _reporting_bar
from exo.models.hub.ranges import HEADER_PROBE, _RangeFetching

logger = logging.getLogger(__name__)

#: Seconds to wait for the hub to connect or answer (each request).
TIMEOUT = 10.0
#: Times a cut GGUF range transfer that made progress is resumed within one call.
RESUMES = 3


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


@dataclass
class _Operation:
    """One ensure_* call: the bytes it needs per file (for its progress)."""

    model: HubModel
    need: dict[str, _Ranges] = field(default_factory=dict)


class HubDownloader(_CachedFiles, _RangeFetching):
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

    def ensure_all(self, model: HubModel, on_header: Callable[[Path], None] | None = None) -> Path:
        """Download the whole model (``exo pull``), header first (then ``on_header(path)`` is
        called, while the rest comes); returns ``model.local_path``.

        Raises:
            DownloadError: as ``ensure_shard``.
        """
        with self._operation(model) as op:
            self._announce(op)
            path = self._header(op)
            if on_header is not None:
                on_header(path)
            if model.kind == "diffusers":
                self._fetch_files(op, list(model.files))
            elif model.kind == "safetensors":
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

    def _announce(self, op: _Operation) -> None:
        """Every weight file's size in ``op``'s progress up front (with what is present), so that
        its total is the whole model's from the start, not the header's first."""
        model = op.model
        for name in model.files:
            remote = model.remote[name]
            if remote.size is None:
                continue
            if model.kind == "gguf":
                path = model.partial_dir / name
                present = _PartialFile(path, remote, model.repo_id, model.commit, create=False).present \
                    if path.is_file() else _Ranges()
                op.need[name] = _Ranges([(0, remote.size)])
                self.progress.set_file(model.model_id, name, remote.size, present.total, remote.sha256)
            else:
                done = remote.size if (model.snapshot / name).exists() else 0
                self.progress.set_file(model.model_id, name, remote.size, done, remote.sha256)

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
        if model.kind == "diffusers":  # model_index.json and the components' configs, not their weights
            self._fetch_files(op, [f for f in model.files if not f.endswith((".safetensors", ".bin"))])
            return model.snapshot
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
            self.progress.set_file(model.model_id, name, size, size if present else 0, model.remote[name].sha256)
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
        self.progress.set_file(model.model_id, name, remote.size or size, remote.size or size, remote.sha256)

    @staticmethod
    def _discard(pointer: Path) -> None:
        blob = Path(os.path.realpath(pointer))
        for p in (pointer, blob):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def _error(self, e: BaseException, model_id: str, repo_id: str, file: str | None = None,
               revision: str | None = None) -> DownloadError:
        return hub_error(e, model_id, repo_id, file, revision, endpoint=self.endpoint, token_given=bool(self._token),
                         timeout=self.timeout)
