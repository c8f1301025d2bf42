"""Small helpers shared by the API modules: ids, timestamps, OpenAI-format errors, download progress."""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp import web


def new_id(prefix: str) -> str:
    """A fresh random id such as ``chatcmpl-3f2a...`` (``prefix``, a dash, 24 hex digits)."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def unix_time() -> int:
    """Current time in whole seconds since the Unix epoch (OpenAI's ``created`` field)."""
    return int(time.time())


# HTTP status -> OpenAI error "type"
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def error_type_for(status: int) -> str:
    """OpenAI error ``type`` for an HTTP status."""
    return _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The body OpenAI's API answers errors with: ``{"error": {message, type, param, code}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """An error to answer a client with, in OpenAI's format.

    Args:
        status: HTTP status (400, 404, 413, 500, 503, 504 ...).
        message: human-readable explanation (names the parameter when one is at fault).
        param: the request parameter at fault, or None.
        code: machine-readable code (e.g. "model_not_found", "context_length_exceeded"), or None.
        type: OpenAI error type; derived from ``status`` when None.
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or error_type_for(status)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> web.Response:
        """A JSON ``web.Response`` carrying this error."""
        return web.json_response(self.body(), status=self.status)


def percent(done: int, total: int) -> float:
    """``done`` of ``total`` in percent, one decimal (100 for nothing to do)."""
    return round(100.0 * done / total, 1) if total > 0 else 100.0


def download_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """One model's download as ``GET /v1/download/progress`` shows it, from its
    ``exo.models.hub.DownloadProgress`` entry: ``state`` ("downloading", "done", "error"),
    ``bytes_total``, ``bytes_done``, ``percent``, ``speed`` (bytes/s), ``files`` (name ->
    bytes_total, bytes_done, percent, sha256), ``error``, ``repo_id``, ``started_at``,
    ``updated_at`` (unix seconds)."""
    files = {name: {"bytes_total": f["bytes_total"], "bytes_done": f["bytes_done"],
                    "percent": percent(f["bytes_done"], f["bytes_total"]), "sha256": f.get("sha256")}
             for name, f in entry.get("files", {}).items()}
    return {"state": entry["state"], "bytes_total": entry["bytes_total"], "bytes_done": entry["bytes_done"],
            "percent": percent(entry["bytes_done"], entry["bytes_total"]), "speed": entry["speed"], "files": files,
            "error": entry["error"], "repo_id": entry.get("repo_id"), "started_at": entry.get("started_at"),
            "updated_at": entry.get("updated_at")}
