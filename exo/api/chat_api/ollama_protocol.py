"""The Ollama API's request bodies (https://github.com/ollama/ollama/blob/main/docs/api.md) and
their ``options``, validated as Ollama does (unknown fields and options ignored), translated
into the serving layer's terms. The handlers and the NDJSON framing are in ``ollama_endpoints``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import BaseModel, Field

from exo.api.chat_api.ollama_models import LENIENT
from exo.api.chat_api.parsing import MAX_STOP_STRINGS
from exo.api.chat_api.utils import APIError
from exo.api.serving.request import ResponseFormat, Sampling
from exo.inference.generation import SEED_MAX

logger = logging.getLogger(__name__)


# options that cannot change the answer (memory, threads, devices, batching): ignored
_RUNTIME_OPTIONS = frozenset({
    "numa", "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only",
    "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep",
})
# sampling options of Ollama that exo does not implement: ignored with a warning
_UNIMPLEMENTED_OPTIONS = frozenset({
    "tfs_z", "typical_p", "repeat_last_n", "repeat_penalty", "mirostat", "mirostat_tau", "mirostat_eta",
    "penalize_newline", "min_p",
})


# ---------------------------------------------------------------------------- requests


class OllamaFunctionCall(BaseModel):
    """A call's function: ``name`` and ``arguments`` as an object."""

    model_config = LENIENT
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(BaseModel):
    """An assistant message's call: ``{"function": {...}}``."""

    model_config = LENIENT
    function: OllamaFunctionCall


class OllamaMessage(BaseModel):
    """One message of ``/api/chat``; a ``tool`` message names its function in ``tool_name``."""

    model_config = LENIENT
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    thinking: str | None = None
    tool_name: str | None = None


class OllamaFunction(BaseModel):
    """A tool's function: name, description, JSON Schema of its parameters."""

    model_config = LENIENT
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class OllamaTool(BaseModel):
    """``{"type": "function", "function": {...}}``."""

    model_config = LENIENT
    type: Literal["function"] = "function"
    function: OllamaFunction


class OllamaRequestBase(BaseModel):
    """Fields ``/api/chat`` and ``/api/generate`` share: model, streaming, options, output format,
    thinking, log-probabilities."""

    model_config = LENIENT
    model: str = Field(min_length=1)
    stream: bool = True
    options: dict[str, Any] | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: str | int | float | None = None  # models stay loaded; accepted and ignored
    think: bool | Literal["low", "medium", "high"] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def response_format(self) -> ResponseFormat:
        """``format``: "json" (any JSON object), a JSON Schema, or nothing.

        Raises:
            APIError: 400 naming ``format`` for any other value.
        """
        if self.format in (None, ""):
            return ResponseFormat()
        if self.format == "json":
            return ResponseFormat("json_object")
        if isinstance(self.format, dict):
            return ResponseFormat("json_schema", self.format)
        raise APIError(400, f"Invalid value for 'format': {self.format!r} is neither \"json\" nor a JSON Schema",
                       param="format", code="invalid_value")

    def thinking(self) -> bool | None:
        """``think`` as the serving layer's switch: None (the model's default), on or off."""
        return None if self.think is None else self.think is not False


class OllamaChatRequest(OllamaRequestBase):
    """``POST /api/chat`` body."""

    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[OllamaTool] | None = None


class OllamaGenerateRequest(OllamaRequestBase):
    """``POST /api/generate`` body."""

    prompt: str = ""
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[Any] | None = None


# ---------------------------------------------------------------------------- options


def _bad_option(name: str, message: str) -> APIError:
    return APIError(400, f"Invalid value for 'options.{name}': {message}", param=f"options.{name}", code="invalid_value")


def _number(options: dict[str, Any], name: str, lo: float | None, hi: float | None, *, lo_open: bool = False,
            integer: bool = False) -> float | int | None:
    if name not in options or options[name] is None:
        return None
    v = options[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise _bad_option(name, f"must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}")
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        raise _bad_option(name, f"must be in {left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}], got {v}")
    return v


def ollama_stops(options: dict[str, Any]) -> list[str]:
    """The ``stop`` option as a list of non-empty strings.

    Raises:
        APIError: 400 naming ``options.stop``.
    """
    stop = options.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad_option("stop", "must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad_option("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    if any(s == "" for s in stops):
        raise _bad_option("stop", "stop strings must not be empty")
    return list(stops)


def ollama_sampling(req: OllamaRequestBase) -> tuple[Sampling, int | None, list[str]]:
    """Ollama ``options`` (and ``logprobs``) -> (sampling, tokens to generate at most or None
    for the default, stop strings). ``num_predict`` -1 / -2 ask for the whole context.

    Raises:
        APIError: 400 naming ``options.<name>`` for a bad value.
    """
    options = dict(req.options or {})
    for name in sorted(set(options) - {"temperature", "top_p", "top_k", "seed", "num_predict", "stop",
                                       "presence_penalty", "frequency_penalty"}):
        if name in _UNIMPLEMENTED_OPTIONS:
            logger.warning("Ollama option %s is not implemented by exo; ignored", name)
        elif name not in _RUNTIME_OPTIONS:
            logger.warning("unknown Ollama option %s; ignored", name)
    temperature = _number(options, "temperature", 0.0, 2.0)
    top_p = _number(options, "top_p", 0.0, 1.0, lo_open=True)
    top_k = _number(options, "top_k", 0, None, integer=True)
    seed = _number(options, "seed", None, SEED_MAX, integer=True)
    presence = _number(options, "presence_penalty", -2.0, 2.0)
    frequency = _number(options, "frequency_penalty", -2.0, 2.0)
    num_predict = _number(options, "num_predict", -2, None, integer=True)
    if num_predict == 0:
        raise _bad_option("num_predict", "must be >= 1, or -1 / -2 for no limit but the context length")
    max_tokens = 2**62 if num_predict in (-1, -2) else num_predict  # clamped to the context's room
    sampling = Sampling(
        temperature=float(temperature) if temperature is not None else None,
        top_p=float(top_p) if top_p is not None else None,
        top_k=int(top_k) if top_k is not None else None,
        seed=int(seed) if seed is not None and seed >= 0 else None,
        presence_penalty=float(presence or 0.0), frequency_penalty=float(frequency or 0.0),
        logprobs=bool(req.logprobs), top_logprobs=int(req.top_logprobs or 0),
    )
    return sampling, int(max_tokens) if max_tokens is not None else None, ollama_stops(options)


