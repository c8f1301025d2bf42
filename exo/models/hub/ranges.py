"""GGUF files by byte ranges: each split's header and small non-layer tensors, then the ranges
of whatever tensors a shard needs, into the file's sparse copy (``_PartialFile``); a transfer
cut after making progress resumes from its last byte."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from exo.models.hub.errors import DownloadError
from exo.models.hub.partial import _lock_for, _PartialFile, _Ranges, _sha256
from exo.models.hub.progress import _reporting_bar

if TYPE_CHECKING:
    from exo.models.hub.downloader import _Operation

logger = logging.getLogger(__name__)

#: First bytes of a GGUF fetched for its header; grown as ``GGUFTruncated.needed`` says.
HEADER_PROBE = 1 << 20
#: Missing GGUF ranges closer than this are fetched in one request.
COALESCE_GAP = 64 << 10
#: A range transfer records its progress in the sidecar (after an fdatasync) this often.
CHECKPOINT_BYTES = 32 << 20
CHECKPOINT_SECONDS = 5.0


class _TransferCut(Exception):
    """A range transfer stopped at byte ``pos`` because of ``cause`` (an httpx transport error)."""

    def __init__(self, pos: int, cause: Exception):
        super().__init__(f"cut at byte {pos}: {cause}")
        self.pos, self.cause = pos, cause


class _RangeFetching:
    """``HubDownloader``'s GGUF half: it uses the downloader's ``endpoint``, ``_token``,
    ``timeout``, ``offline``, ``verify``, ``resumes``, ``header_probe``, ``progress`` and
    ``_error``."""

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
            self.progress.set_file(model.model_id, name, need.total, (need & part.present).total, part.remote.sha256)
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
