"""Errors of hub downloads: ``DownloadError`` and ``NotOnHub``, and ``hub_error``, which turns
what huggingface_hub or httpx raised into one whose message is written for users."""

from __future__ import annotations


class DownloadError(Exception):
    """A model could not be resolved or downloaded. The message is written for users: it names
    the model, the repo or file, and what to do (set HF_TOKEN, go online, check the name)."""


class NotOnHub(DownloadError):
    """The hub answered that the repo, revision, file or quant does not exist (not that it
    could not be reached)."""


def hub_error(e: BaseException, model_id: str, repo_id: str, file: str | None = None, revision: str | None = None, *,
              endpoint: str, token_given: bool, timeout: float) -> DownloadError:
    """A ``DownloadError`` for users, from what huggingface_hub or httpx raised while talking to the
    hub at ``endpoint`` (``token_given``: a token was sent; ``timeout``: the seconds waited)."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, RemoteEntryNotFoundError,
        RepositoryNotFoundError, RevisionNotFoundError,
    )

    what = f"{repo_id}/{file}" if file else repo_id
    token_hint = "set HF_TOKEN to a token of an account that has access"
    if token_given:
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
        return NotOnHub(f"{model_id}: repository {repo_id} not found on {endpoint} (HTTP {status})")
    if isinstance(e, RevisionNotFoundError):
        if file:
            return DownloadError(f"{model_id}: {what}: the hub has no revision {revision} (HTTP {status}); the repo "
                                 f"changed since it was listed: resolve it again")
        return NotOnHub(f"{model_id}: {repo_id} has no revision {revision} (HTTP {status})")
    if isinstance(e, RemoteEntryNotFoundError):
        return NotOnHub(f"{model_id}: {repo_id} has no file {file} (HTTP {status})")
    if isinstance(e, HfHubHTTPError):
        if status in (401, 403):
            return DownloadError(f"{model_id}: {what} is gated or private (HTTP {status}): {token_hint}")
        if status == 404:
            return NotOnHub(f"{model_id}: {what} not found on {endpoint} (HTTP 404)")
        return DownloadError(f"{model_id}: the hub at {endpoint} answered HTTP {status} for {what}")
    if isinstance(e, LocalEntryNotFoundError) and e.__cause__ is not None:
        return hub_error(e.__cause__, model_id, repo_id, file, revision, endpoint=endpoint, token_given=token_given,
                         timeout=timeout)
    if isinstance(e, httpx2.TimeoutException):
        return DownloadError(f"{model_id}: the hub at {endpoint} did not answer within {timeout:g} s "
                             f"({what})")
    if isinstance(e, (httpx2.ConnectError, LocalEntryNotFoundError)):
        return DownloadError(f"{model_id}: cannot reach the hub at {endpoint} ({e}) for {what}")
    if isinstance(e, httpx2.TransportError):
        return DownloadError(f"{model_id}: the transfer of {what} from {endpoint} failed ({e}); what arrived "
                             f"is kept, try again")
    if isinstance(e, OSError):
        return DownloadError(f"{model_id}: {what}: {e}")
    return DownloadError(f"{model_id}: {what}: {type(e).__name__}: {e}")
