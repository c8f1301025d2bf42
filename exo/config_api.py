"""The HTTP API's sections of the settings (``exo.config.Settings``): ``generation`` (server
defaults of sampling options), ``auth`` (API keys), ``rate_limit`` (per-client rate, the bounded
generation queue, the work one request may ask for) and ``cors``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

_SECTION = ConfigDict(extra="forbid")


class GenerationConfig(BaseModel):
    """``generation``: server defaults for sampling options a request leaves out (every
    dialect). A request's own value always wins.

    Attributes:
        temperature: [0, 2] (0 is greedy).
        top_p: (0, 1].
        top_k: >= 0 (0 disables it).
        max_tokens: default cap of generated tokens, or None for "the rest of the context".
    """

    model_config = _SECTION
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    max_tokens: int | None = Field(None, ge=1)

    def to_defaults(self):
        """The API's ``GenerationDefaults``."""
        from exo.api.chat_api.models import GenerationDefaults

        return GenerationDefaults(**{k: getattr(self, k) for k in self.model_fields_set})


DEFAULT_PUBLIC_PATHS = ("/health", "/health/*", "/healthcheck")


class AuthConfig(BaseModel):
    """``auth``: API keys. With no keys every path is open; with keys, a request must carry
    one (``Authorization: Bearer KEY`` or ``x-api-key: KEY``) unless its path is public.

    Attributes:
        api_keys: accepted keys (env ``EXO_API_KEYS``, a comma list, replaces this list).
        public_paths: paths that never need a key; a trailing ``*`` matches any suffix
            (default: the health checks ``/health``, ``/health/{model}`` and ``/healthcheck``;
            add ``/metrics`` for a scraper without credentials).
        web_ui_public: the web page and its files (every path outside ``/v1/``, ``/api/``, the
            completions paths, ``/metrics`` and the health checks) need no key. The page's own
            API calls still do: tinychat must then send a key.
    """

    model_config = _SECTION
    api_keys: list[str] = Field(default_factory=list)
    public_paths: list[str] = Field(default_factory=lambda: list(DEFAULT_PUBLIC_PATHS))
    web_ui_public: bool = True

    @field_validator("api_keys", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        return [k for k in v.split(",") if k.strip()] if isinstance(v, str) else v

    @field_validator("api_keys")
    @classmethod
    def _keys_not_empty(cls, keys: list[str]) -> list[str]:
        for i, k in enumerate(keys):
            if not k.strip():
                raise ValueError(f"api_keys[{i}] is empty")
        return [k.strip() for k in keys]

    @field_validator("public_paths")
    @classmethod
    def _paths_absolute(cls, paths: list[str]) -> list[str]:
        for p in paths:
            if not p.startswith("/"):
                raise ValueError(f"public path {p!r} must start with '/'")
        return paths

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys)


class RateLimitConfig(BaseModel):
    """``rate_limit``: per-client request rate, and the bound on generations in progress.

    The rate is a token bucket per client (Turner's token bucket, as in RFC 2697's committed
    burst): ``burst`` requests at once, refilled at ``requests_per_minute``; a request finding
    the bucket empty gets 429 with ``Retry-After`` (seconds). A client is its API key when the
    request carried a valid one, else its address (``X-Forwarded-For``'s first address when
    ``trust_forwarded_for``, for a node behind a reverse proxy).

    Generations (chat, completions, messages, generate) run at most ``max_concurrent_requests``
    at once per node of the cluster (a ring of more nodes holds more streams); up to ``max_queued_requests`` more wait for a slot (at most ``queue_timeout``
    seconds); beyond that a request gets 503 at once instead of the queue growing without limit.
    One request may ask for at most ``max_generations_per_request`` generations (its prompts
    times ``n``); more is a 400 before anything runs.

    Attributes:
        requests_per_minute: refill rate of each bucket; None or 0 disables rate limiting.
        burst: bucket size (default: requests_per_minute / 6, at least 1).
        trust_forwarded_for: identify clients by ``X-Forwarded-For``.
        max_concurrent_requests: generations in progress at once, per node of the cluster
            (None: no limit).
        max_queued_requests: generations waiting for a slot.
        queue_timeout: seconds a request may wait for a slot before 503.
        max_generations_per_request: prompts x ``n`` of one request, at most (OpenAI's
            completions take a list of prompts, each with ``n`` choices).
        max_clients: buckets kept (least recently seen dropped first).
    """

    model_config = _SECTION
    requests_per_minute: float | None = Field(None, ge=0)
    burst: int | None = Field(None, ge=1)
    trust_forwarded_for: bool = False
    max_concurrent_requests: int | None = Field(16, ge=1)
    max_queued_requests: int = Field(64, ge=0)
    queue_timeout: float = Field(120.0, gt=0)
    max_generations_per_request: int = Field(16, ge=1)
    max_clients: int = Field(10_000, ge=1)

    @property
    def rate_enabled(self) -> bool:
        return bool(self.requests_per_minute)

    @property
    def bucket_size(self) -> int:
        if self.burst is not None:
            return self.burst
        return max(1, int((self.requests_per_minute or 0) / 6))


class CORSConfig(BaseModel):
    """``cors``: browsers' cross-origin access.

    Attributes:
        allow_origin: ``Access-Control-Allow-Origin`` of every response ("*": any origin).
    """

    model_config = _SECTION
    allow_origin: str = "*"
