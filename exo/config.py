"""The settings of a node: one pydantic object (``Settings``), built once by ``load_settings`` in
``exo.main`` and handed down; nothing below the launcher reads the environment.

Precedence, highest first: a flag given on the command line > its environment variable
(``ENVIRONMENT``: one table from each ``EXO_*`` variable to its field) > the configuration file
(``--config PATH`` or ``EXO_CONFIG``) > the defaults below. ``config.example.yaml`` at the top of
the repository lists every field with its default (a test holds it to the schema).

Sections (each a pydantic model; unknown keys are rejected with an error naming them):
``server`` (HTTP API), ``node`` (identity, gRPC, discovery), ``model``, ``engine`` (options of
the inference engine), ``generation`` (server defaults of sampling options), ``auth`` (API keys),
``rate_limit``, ``cors``, ``logging``. The API's sections are in ``exo.config_api``, logging's in
``exo.config_logging``; every name is importable from here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from exo.config_api import DEFAULT_PUBLIC_PATHS, AuthConfig, CORSConfig, GenerationConfig, RateLimitConfig
from exo.config_logging import LOG_LEVELS, LoggingConfig, setup_logging

logger = logging.getLogger(__name__)

_SECTION = ConfigDict(extra="forbid")

# Defaults used in more than one place: defined here only.
DEFAULT_MODEL = "smollm2-135m"  # the model served when a request names none
DEFAULT_API_PORT = 52415  # TCP port of the HTTP API and web UI
DEFAULT_RESPONSE_TIMEOUT = 60.0  # seconds to wait for each next token of a request
DEFAULT_MAX_MODELS = 3  # models whose shards a node holds at once
DEFAULT_IDLE_TTL = 300.0  # seconds an unused model's shard stays loaded

ENV_CONFIG = "EXO_CONFIG"  # the configuration file's path (``--config`` beats it)
# Each environment variable exo reads -> the field it sets (a dotted path). A set, non-empty
# variable beats the file and loses to the field's flag. Comma lists split for list fields.
ENVIRONMENT: dict[str, str] = {
    "EXO_INTERFACES": "node.interfaces",
    "EXO_CLUSTER_SECRET": "node.cluster_secret",
    "EXO_MEMORY_BYTES": "node.memory",
    "EXO_LOG_LEVEL": "logging.level",
    "EXO_API_KEYS": "auth.api_keys",
    "EXO_TORCH_WEIGHTS": "engine.weights",
    "EXO_TORCH_DTYPE": "engine.dtype",
    "EXO_MLX_BLAS": "engine.mlx_blas",
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
        response_timeout: seconds to wait for each next token before failing a request (the
            API and the node's origin requests). Flag ``--response-timeout``.
        enabled: serve the API at all (``exo run`` turns it off: it prints one answer).
        web_ui_dir: directory of the web UI's files (default: the bundled tinychat); a
            directory that does not exist serves no web UI.
    """

    model_config = _SECTION
    host: str | None = None
    port: int = Field(DEFAULT_API_PORT, ge=0, le=65535)
    response_timeout: float = Field(DEFAULT_RESPONSE_TIMEOUT, gt=0)
    enabled: bool = True
    web_ui_dir: Path | None = None


def parse_interfaces(value: str | list[str] | None) -> list[str] | None:
    """A comma list (or a list) of addresses or interface names; None, "" or "all" means every
    interface (None)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip() in ("", "all"):
            return None
        value = value.split(",")
    out = [v.strip() for v in value if v.strip()]
    return None if out in ([], ["all"]) else out


class NodeSection(BaseModel):
    """``node``: identity, gRPC server and discovery of this node (flags of the same names).

    Attributes:
        id: unique node id (default: a random UUID, drawn when the node starts).
        host, port: gRPC bind address (default: as ``server.host``) and port (0: any free port).
        discovery_module: "mdns", "manual" or "none".
        discovery_config_path: JSON peer list for "manual".
        interfaces: addresses or interface names discovery may use; None (or "all", or a comma
            list in a flag or ``EXO_INTERFACES``) for every interface.
        wait_for_peers: peers to wait for before serving.
        cluster_secret: the cluster's secret (env ``EXO_CLUSTER_SECRET``): nodes talk mutual TLS
            under a CA derived from it, so only nodes with the same secret join and nothing
            crosses the wire in clear (``exo.networking.grpc.tls``); None: plaintext, unauthenticated.
        memory: bytes this node offers for weights (default: detected; env ``EXO_MEMORY_BYTES``).
        health_check_interval: seconds between discovery's health checks of each peer.
    """

    model_config = _SECTION
    id: str | None = None
    host: str | None = None
    port: int = Field(0, ge=0, le=65535)
    discovery_module: Literal["mdns", "manual", "none"] = "mdns"
    discovery_config_path: str | None = None
    interfaces: list[str] | None = None
    wait_for_peers: int = Field(0, ge=0)
    cluster_secret: str | None = None
    memory: int | None = Field(None, gt=0)
    health_check_interval: float = Field(1.0, gt=0)

    @field_validator("interfaces", mode="before")
    @classmethod
    def _interfaces(cls, v: Any) -> Any:
        return parse_interfaces(v) if isinstance(v, (str, list)) else v


class ModelConfig(BaseModel):
    """``model``: what this node serves.

    Attributes:
        default: model used when a request names none (flag ``--default-model``): a catalogue
            id, a local GGUF file or Hugging Face directory, or a Hugging Face repo.
        inference_engine: "torch", "tinygrad", "mlx" or "dummy" (default: the best installed).
        max_models: models whose shards the node holds at once (flag ``--max-models``).
        idle_ttl: seconds an unused model's shard stays loaded (flag ``--model-idle-ttl``).
        image_threads: torch threads while this node draws images on the CPU (flag
            ``--image-threads``; default: torch's own, one per core).
        chat_templates: model id -> the chat template to use when the model has none (a base
            model): a built-in name ("chatml"), a path to a Jinja file, or the Jinja source.
        fallbacks: model id -> the models that answer its generation requests, in order, when
            the cluster cannot serve it now (its ring cannot form with the nodes present or does
            not fit their memory, or its download failed): the first that can serve answers,
            and the response says so (``model`` is the fallback's id, header
            ``X-Exo-Fallback`` the requested one). A fallback's own fallbacks are tried after
            every listed one; cycles are ignored. Example: ``{llama-3.1-70b: [llama-3.1-8b]}``.
    """

    model_config = _SECTION
    default: str = DEFAULT_MODEL
    inference_engine: Literal["torch", "tinygrad", "mlx", "dummy"] | None = None
    max_models: int = Field(DEFAULT_MAX_MODELS, ge=1)
    idle_ttl: float = Field(DEFAULT_IDLE_TTL, gt=0)
    image_threads: int | None = Field(None, ge=1)
    chat_templates: dict[str, str] = Field(default_factory=dict)
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)

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


class EngineConfig(BaseModel):
    """``engine``: options the launcher passes to the inference engine (the engine itself is
    ``model.inference_engine``). Each is None for the engine's own default.

    Attributes:
        weights: the torch engine's weight format: "auto", "gguf", "dense" or "int4" (env
            ``EXO_TORCH_WEIGHTS``; see ``TorchInferenceEngine``).
        dtype: the torch engine's compute dtype: "float32", "bfloat16" or "float16" (env
            ``EXO_TORCH_DTYPE``; default bfloat16 on CUDA, else float32).
        mlx_blas: the MLX engine's BLAS on Linux: a library path, or "none" for mlx's bundled
            one (env ``EXO_MLX_BLAS``; default: the system OpenBLAS).
        batch_invariant: the torch engine: a request's logits are the same, bit for bit, alone
            or decoded in a batch with other requests, so a seeded request gives the same answer
            at any load (default true; flag ``--batch-invariant`` / ``--no-batch-invariant``).
            False lets batched products take faster paths (Intel AMX from 8 concurrent
            requests; one BLAS call per batch for dense weights), whose last bits depend on the
            batch.
        prompt_cache_mb: the torch engine's prompt cache: MiB for the KV caches of finished
            requests, kept for later requests that share their prefix (a chat's next turn);
            0 turns it off (default 512).
        options: further keyword arguments of the engine's constructor (e.g. the dummy
            engine's ``token_delay``, seconds); the fields above beat the same keys here.
    """

    model_config = _SECTION
    weights: Literal["auto", "gguf", "dense", "int4"] | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    mlx_blas: str | None = None
    batch_invariant: bool = True
    prompt_cache_mb: int | None = Field(None, ge=0)
    options: dict[str, Any] = Field(default_factory=dict)

    def constructor_options(self, engine_name: str) -> dict[str, Any]:
        """Keyword arguments of the named engine's constructor."""
        out = dict(self.options)
        if engine_name == "torch":  # the one engine that batches requests' decode steps
            out.update({k: v for k, v in (("weights", self.weights), ("dtype", self.dtype)) if v is not None})
            out["batch_invariant"] = self.batch_invariant
            if self.prompt_cache_mb is not None:
                out["prompt_cache_bytes"] = self.prompt_cache_mb * 2**20
        return out


class Settings(BaseModel):
    """All settings of a node (the configuration file's schema); every section is optional."""

    model_config = _SECTION
    server: ServerConfig = Field(default_factory=ServerConfig)
    node: NodeSection = Field(default_factory=NodeSection)
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
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
        """Keyword arguments of ``ChatAPI`` beyond the ``server`` section's."""
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


def parse_config(data: Any, source: str = "config") -> Settings:
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
        return Settings.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = _loc(err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        raise ConfigError(f"{source}: {where}: {msg}") from None


def _read_yaml(path: str | os.PathLike) -> Any:
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read the configuration file {p}: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None


def load_config(path: str | os.PathLike) -> Settings:
    """Read and validate a YAML configuration file (the file alone: no environment, no flags).

    Raises:
        ConfigError: the file is missing, is not YAML, or has a bad field (named).
    """
    return parse_config(_read_yaml(path), str(Path(path)))


def load_settings(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
                  config_path: str | os.PathLike | None = None) -> Settings:
    """The settings: defaults < the configuration file < the environment < ``flags``.

    Args:
        flags: dotted field path -> value: the flags given on the command line (``exo.main``),
            or a program's own values (tests, benchmarks). A path names a field
            (``"server.port"``) or a whole section (``"auth"``, a dict or the section's model).
        environ: the process environment (``exo.main`` passes its own; None: empty).
            Only ``EXO_CONFIG`` and the variables of ``ENVIRONMENT`` are read; empty ones are unset.
        config_path: the configuration file (``--config``); beats ``EXO_CONFIG``.

    Raises:
        ConfigError: an unreadable or invalid file, or a bad value; the message names where
            the value came from (the file and field, the environment variable, or the field).
    """
    env = environ or {}
    path = config_path or env.get(ENV_CONFIG) or None
    data: dict[str, Any] = {}
    if path:
        raw = _read_yaml(path)
        parse_config(raw, str(path))  # the file's own errors name the file
        data = {k: ({} if v is None else dict(v)) for k, v in (raw or {}).items()}
    overrides = [(field, value, f"{var} ({field})") for var, field in ENVIRONMENT.items() if (value := env.get(var))]
    overrides += [(field, value, field) for field, value in (flags or {}).items()]
    for field, value, _ in overrides:
        section, _, name = field.partition(".")
        if not name:
            data[section] = value
            continue
        current = data.get(section) or {}
        if isinstance(current, BaseModel):
            current = current.model_dump(exclude_unset=True)
        data[section] = {**current, name: value}
    try:
        settings = Settings.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = _loc(err["loc"])
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        source = next((label for field, _, label in reversed(overrides)
                       if where == field or where.startswith(field + ".") or where.startswith(field + "[")),
                      f"{path}: {where}" if path else where)
        raise ConfigError(f"{source}: {msg}") from None
    if path:
        logger.debug("configuration from %s", path)
    return settings


__all__ = [
    "DEFAULT_API_PORT", "DEFAULT_IDLE_TTL", "DEFAULT_MAX_MODELS", "DEFAULT_MODEL", "DEFAULT_PUBLIC_PATHS",
    "DEFAULT_RESPONSE_TIMEOUT", "ENVIRONMENT", "LOG_LEVELS", "AuthConfig", "CORSConfig", "ConfigError", "EngineConfig",
    "GenerationConfig", "LoggingConfig", "ModelConfig", "NodeSection", "RateLimitConfig", "ServerConfig", "Settings",
    "load_config", "load_settings", "parse_config", "parse_interfaces", "setup_logging",
]
