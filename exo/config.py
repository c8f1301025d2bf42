"""A node's configuration file (``config.yaml``), its sections, and how it meets the command line.

Precedence, highest first: a flag given on the command line > its environment variable
(``EXO_INTERFACES``, ``EXO_LOG_LEVEL``, ``EXO_CLUSTER_SECRET``, ``EXO_MEMORY_BYTES``,
``EXO_API_KEYS``) > the configuration file (``--config PATH`` or ``EXO_CONFIG``) > built-in
defaults. ``config.example.yaml`` at the top of the repository documents every field.

Sections (each a pydantic model; unknown keys are rejected with an error naming them):
``server`` (HTTP API), ``node`` (identity, gRPC, discovery), ``model``, ``generation`` (server
defaults of sampling options), ``auth`` (API keys), ``rate_limit``, ``cors``, ``logging``.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

logger = logging.getLogger(__name__)

_SECTION = ConfigDict(extra="forbid")

ENV_CONFIG = "EXO_CONFIG"
ENV_API_KEYS = "EXO_API_KEYS"
# argparse destinations whose default comes from an environment variable: a set variable counts
# as given on the command line (it beats the configuration file)
ENV_FLAGS = {
    "interfaces": "EXO_INTERFACES",
    "log_level": "EXO_LOG_LEVEL",
    "cluster_secret": "EXO_CLUSTER_SECRET",
    "memory": "EXO_MEMORY_BYTES",
}


class ConfigError(ValueError):
    """The configuration file cannot be read or has a bad value (the message names the field)."""


# ---------------------------------------------------------------------------- sections


class ServerConfig(BaseModel):
    """``server``: the HTTP API (OpenAI, Ollama and Anthropic dialects, web UI, health, metrics).

    Attributes:
        host: address the API binds (default: loopback when the node's interfaces are
            loopback-only, else 0.0.0.0). Flag ``--api-host``.
        port: TCP port of the API and web UI (0: any free port). Flag ``--chatgpt-api-port``.
        response_timeout: seconds to wait for each next token before failing a request.
            Flag ``--response-timeout``.
    """

    model_config = _SECTION
    host: str | None = None
    port: int = Field(52415, ge=0, le=65535)
    response_timeout: float = Field(60.0, gt=0)


class NodeSection(BaseModel):
    """``node``: identity, gRPC server and discovery of this node (flags of the same names).

    Attributes:
        id: unique node id (default: a random UUID).
        host, port: gRPC bind address and port (0: any free port).
        discovery_module: "mdns", "manual" or "none".
        discovery_config_path: JSON peer list for "manual".
        interfaces: addresses or interface names discovery may use; "all" or a list.
        wait_for_peers: peers to wait for before serving.
        cluster_secret: shared key; only nodes with the same key join.
        memory: bytes this node offers for weights (default: detected).
    """

    model_config = _SECTION
    id: str | None = None
    host: str | None = None
    port: int = Field(0, ge=0, le=65535)
    discovery_module: Literal["mdns", "manual", "none"] = "mdns"
    discovery_config_path: str | None = None
    interfaces: str | list[str] | None = None
    wait_for_peers: int = Field(0, ge=0)
    cluster_secret: str | None = None
    memory: int | None = Field(None, gt=0)


class ModelConfig(BaseModel):
    """``model``: what this node serves.

    Attributes:
        default: model used when a request names none (flag ``--default-model``): a catalogue
            id, a local GGUF file or Hugging Face directory, or a Hugging Face repo.
        inference_engine: "torch", "tinygrad", "mlx" or "dummy" (default: the best installed).
        max_models: models whose shards the node holds at once (flag ``--max-models``).
        idle_ttl: seconds an unused model's shard stays loaded (flag ``--model-idle-ttl``).
        chat_templates: model id -> the chat template to use when the model has none (a base
            model): a built-in name ("chatml"), a path to a Jinja file, or the Jinja source.
        fallbacks: model id -> the models that answer its generation requests, in order, when
            the cluster cannot serve it now (its ring cannot form with the nodes present or does
            not fit their memory, or its download failed): the first that can serve answers,
            and the response says so (``model`` is the fallback's id, header
            ``X-Exo-Fallback`` the requested one). A fallback's own fallbacks are tried after
            every listed one; cycles are ignored. Example: ``{llama-3.1-70b: [llama-3.1-8b]}``.
        batch_invariant: torch engine: a request's logits are the same, bit for bit, alone or
            decoded in a batch with other requests, so a seeded request gives the same answer
            at any load (default true; flag ``--batch-invariant`` / ``--no-batch-invariant``).
            False lets batched products take faster paths (Intel AMX from 8 concurrent
            requests; one BLAS call per batch for dense weights), whose last bits depend on
            the batch.
    """

    model_config = _SECTION
    default: str = "smollm2-135m"
    inference_engine: Literal["torch", "tinygrad", "mlx", "dummy"] | None = None
    max_models: int = Field(3, ge=1)
    idle_ttl: float = Field(300.0, gt=0)
    chat_templates: dict[str, str] = Field(default_factory=dict)
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    batch_invariant: bool = True

    @field_validator("fallbacks")
    @classmethod
    def _fallbacks(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        out = {}
        for model, chain in v.items():
            if not model.strip():
                raise ValueError("a model id is empty")
            names = [name.strip() for name in chain]
            if any(not name for name in names):
                raise ValueError(f"{model}: a fallback's model id is empty")
            if model.strip() in names:
                raise ValueError(f"{model} names itself as a fallback")
            out[model.strip()] = names
        return out


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
    at once; up to ``max_queued_requests`` more wait for a slot (at most ``queue_timeout``
    seconds); beyond that a request gets 503 at once instead of the queue growing without limit.
    One request may ask for at most ``max_generations_per_request`` generations (its prompts
    times ``n``); more is a 400 before anything runs.

    Attributes:
        requests_per_minute: refill rate of each bucket; None or 0 disables rate limiting.
        burst: bucket size (default: requests_per_minute / 6, at least 1).
        trust_forwarded_for: identify clients by ``X-Forwarded-For``.
        max_concurrent_requests: generations in progress at once (None: no limit).
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


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class LoggingConfig(BaseModel):
    """``logging``: console logging, and rotating log files split by level.

    Attributes:
        level: least severe level logged (flag ``--log-level``, env ``EXO_LOG_LEVEL``).
        format: ``logging`` format string of every handler.
        dir: when set, one rotating file per level in ``file_levels`` is written there,
            ``exo.<level>.log`` holding the records of that level (``exo.error.log`` also
            holds CRITICAL); the directory is created.
        file_levels: levels that get a file.
        max_bytes: size (bytes) at which a file is rotated.
        backup_count: rotated files kept per level.
    """

    model_config = _SECTION
    level: str = "INFO"
    format: str = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    dir: Path | None = None
    file_levels: list[str] = Field(default_factory=lambda: ["DEBUG", "INFO", "WARNING", "ERROR"])
    max_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    backup_count: int = Field(5, ge=0)

    @field_validator("level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in LOG_LEVELS:
            raise ValueError(f"level must be one of {', '.join(LOG_LEVELS)}, got {v!r}")
        return v

    @field_validator("file_levels")
    @classmethod
    def _file_levels(cls, v: list[str]) -> list[str]:
        out = [x.upper() for x in v]
        for x in out:
            if x not in LOG_LEVELS[:-1]:
                raise ValueError(f"file_levels entries must be one of DEBUG, INFO, WARNING, ERROR, got {x!r}")
        return out


class ExoConfig(BaseModel):
    """The whole configuration file; every section is optional."""

    model_config = _SECTION
    server: ServerConfig = Field(default_factory=ServerConfig)
    node: NodeSection = Field(default_factory=NodeSection)
    model: ModelConfig = Field(default_factory=ModelConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    cors: CORSConfig = Field(default_factory=CORSConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="before")
    @classmethod
    def _null_sections(cls, data: Any) -> Any:
        # an empty section in YAML ("auth:") is null: treat it as {}
        if isinstance(data, dict):
            return {k: ({} if v is None else v) for k, v in data.items()}
        return data

    def api_options(self) -> dict[str, Any]:
        """Keyword arguments of ``ChatAPI`` (``NodeConfig.api_options``)."""
        return {
            "auth": self.auth,
            "rate_limit": self.rate_limit,
            "defaults": self.generation.to_defaults(),
            "cors_allow_origin": self.cors.allow_origin,
            "fallbacks": dict(self.model.fallbacks),
        }


# ---------------------------------------------------------------------------- loading


def _loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_config(data: Any, source: str = "config") -> ExoConfig:
    """Validate decoded YAML (None: an empty file).

    Raises:
        ConfigError: naming the source and the first bad field, e.g.
            ``config.yaml: auth.api_keys: Input should be a valid list``.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return ExoConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = _loc(err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        raise ConfigError(f"{source}: {where}: {msg}") from None


def load_config(path: str | os.PathLike) -> ExoConfig:
    """Read and validate a YAML configuration file.

    Raises:
        ConfigError: the file is missing, is not YAML, or has a bad field (named).
    """
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read the configuration file {p}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return parse_config(data, str(p))


def api_keys_from_env(environ: dict[str, str] | None = None) -> list[str] | None:
    """Keys of ``EXO_API_KEYS`` (comma list), or None when the variable is unset or empty."""
    value = (os.environ if environ is None else environ).get(ENV_API_KEYS, "")
    keys = [k.strip() for k in value.split(",") if k.strip()]
    return keys or None


# ---------------------------------------------------------------------------- command line


# (section, field) of the file -> argparse destination of exo.main's flag
FLAG_FIELDS: dict[tuple[str, str], str] = {
    ("server", "host"): "api_host",
    ("server", "port"): "chatgpt_api_port",
    ("server", "response_timeout"): "response_timeout",
    ("node", "id"): "node_id",
    ("node", "host"): "node_host",
    ("node", "port"): "node_port",
    ("node", "discovery_module"): "discovery_module",
    ("node", "discovery_config_path"): "discovery_config_path",
    ("node", "interfaces"): "interfaces",
    ("node", "wait_for_peers"): "wait_for_peers",
    ("node", "cluster_secret"): "cluster_secret",
    ("node", "memory"): "memory",
    ("model", "default"): "default_model",
    ("model", "inference_engine"): "inference_engine",
    ("model", "max_models"): "max_models",
    ("model", "idle_ttl"): "model_idle_ttl",
    ("model", "batch_invariant"): "batch_invariant",
    ("logging", "level"): "log_level",
}


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """Destinations of the optional flags actually present in ``argv`` (None: ``sys.argv[1:]``),
    whatever their value (a flag given with its default value still counts)."""
    saved = [(a, a.default) for a in parser._actions if a.option_strings]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        ns, _ = parser.parse_known_args(list(argv) if argv is not None else None)
    finally:
        for a, d in saved:
            a.default = d
    return set(vars(ns))


def apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> ExoConfig:
    """Load the configuration file named by ``args.config`` (or ``EXO_CONFIG``) and write its
    values into ``args`` wherever the flag was not given (nor its environment variable set).

    The returned config is the effective one: its fields that have a flag are updated from
    ``args``, and ``auth.api_keys`` is replaced by ``EXO_API_KEYS`` when that is set.

    Raises:
        ConfigError: an unreadable or invalid file.
    """
    env = os.environ if environ is None else environ
    path = getattr(args, "config", None) or env.get(ENV_CONFIG) or None
    cfg = load_config(path) if path else ExoConfig()
    given = explicit_dests(parser, argv) | {dest for dest, var in ENV_FLAGS.items() if env.get(var)}
    for (section, name), dest in FLAG_FIELDS.items():
        sec = getattr(cfg, section)
        if not hasattr(args, dest):
            continue
        if dest not in given and name in sec.model_fields_set:
            value = getattr(sec, name)
            if dest == "interfaces" and isinstance(value, list):
                value = ",".join(value)
            setattr(args, dest, value)
    if hasattr(args, "log_level"):  # the effective level (flag, env or file)
        try:
            level = args.log_level or cfg.logging.level  # EXO_LOG_LEVEL set but empty: the file's or INFO
            cfg.logging = cfg.logging.model_validate({**cfg.logging.model_dump(), "level": level})
        except ValidationError as e:
            raise ConfigError(f"--log-level: {e.errors(include_url=False)[0]['msg']}") from None
    keys = api_keys_from_env(dict(env))
    if keys is not None:
        cfg.auth = cfg.auth.model_copy(update={"api_keys": keys})
    if path:
        logger.debug("configuration from %s", path)
    return cfg


# ---------------------------------------------------------------------------- logging

_HANDLER_TAG = "_exo_config_handler"
_NEXT_LEVEL = {"DEBUG": logging.INFO, "INFO": logging.WARNING, "WARNING": logging.ERROR, "ERROR": logging.CRITICAL + 1}


class _LevelBand(logging.Filter):
    """Passes records with ``low <= levelno < high``."""

    def __init__(self, low: int, high: int):
        super().__init__()
        self.low, self.high = low, high

    def filter(self, record: logging.LogRecord) -> bool:
        return self.low <= record.levelno < self.high


def setup_logging(cfg: LoggingConfig, root: logging.Logger | None = None) -> list[logging.Handler]:
    """Configure the root logger: a console handler (stderr) and, when ``cfg.dir`` is set, one
    ``RotatingFileHandler`` per level of ``cfg.file_levels``. Handlers a previous call installed
    are removed first (calling it twice does not duplicate lines); others are left alone.

    Returns:
        the handlers installed.

    Raises:
        OSError: the log directory cannot be created.
    """
    root = root or logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_TAG, False):
            root.removeHandler(h)
            h.close()
    fmt = logging.Formatter(cfg.format)
    console = logging.StreamHandler(sys.stderr)
    handlers: list[logging.Handler] = [console]
    if cfg.dir is not None:
        cfg.dir.mkdir(parents=True, exist_ok=True)
        for name in cfg.file_levels:
            h = logging.handlers.RotatingFileHandler(cfg.dir / f"exo.{name.lower()}.log", maxBytes=cfg.max_bytes,
                                                     backupCount=cfg.backup_count, encoding="utf-8")
            h.addFilter(_LevelBand(logging.getLevelName(name), _NEXT_LEVEL[name]))
            handlers.append(h)
    for h in handlers:
        h.setFormatter(fmt)
        setattr(h, _HANDLER_TAG, True)
        root.addHandler(h)
    root.setLevel(cfg.level)
    return handlers
