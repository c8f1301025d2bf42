"""Request data models of the OpenAI-compatible API (pydantic v2); responses are in ``responses``.

Requests are validated strictly: wrong types, out-of-range values and unknown fields are
rejected with a 400 that names the parameter (``parse_request``). A few fields that the
official OpenAI clients may send and that cannot change our answer (``user``, ``metadata``,
``store``, ...) are accepted and ignored; fields that would change the answer but that exo does
not support (``suffix``, ``modalities`` other than text ...) are rejected with code
``"unsupported_parameter"`` rather than silently ignored. ``to_generate_request`` translates a
chat request into the serving layer's dialect-neutral ``GenerateRequest``.

Generation options resolve as request value > server default > OpenAI's default (in the serving
layer, ``exo.api.serving.pipeline``), the layering of vLLM's ``to_sampling_params``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from exo.api.chat_api.parsing import MAX_STOP_STRINGS, STRICT, RequestParamError, unsupported
from exo.api.serving.request import (
    GenerateRequest, ResponseFormat, Sampling, ToolCall, ToolChoice, ToolSpec, Turn,
)
from exo.inference.generation import LOGIT_BIAS_MAX, SEED_MAX, SEED_MIN

# OpenAI's API defaults (https://platform.openai.com/docs/api-reference)
OPENAI_DEFAULT_TEMPERATURE = 1.0
OPENAI_DEFAULT_TOP_P = 1.0
OPENAI_DEFAULT_COMPLETIONS_MAX_TOKENS = 16
MAX_N = 16  # most choices per request (each is a full generation on the ring)


# ---------------------------------------------------------------------------- requests


class TextContentPart(BaseModel):
    """``{"type": "text", "text": ...}``, the only content part our text models take."""

    model_config = STRICT
    type: Literal["text"]
    text: str


class FunctionCallParam(BaseModel):
    """``{"name", "arguments"}`` of a call in the history (arguments: JSON text)."""

    model_config = STRICT
    name: str
    arguments: str


class ToolCallParam(BaseModel):
    """A call an assistant message made: ``{"id", "type": "function", "function"}``."""

    model_config = STRICT
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ChatMessage(BaseModel):
    """One message of a conversation.

    ``developer`` is OpenAI's newer name for ``system`` and is rendered as ``system``. Content
    is a string or a list of text parts; it may be null only for an assistant message. An
    assistant message may carry ``tool_calls`` (and ``reasoning_content``, its earlier
    reasoning); a ``tool`` message answers the call ``tool_call_id``.
    """

    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None  # accepted in the history, not rendered

    @model_validator(mode="after")
    def _content_required(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise RequestParamError("content", f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise RequestParamError("tool_calls", "only an assistant message can carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise RequestParamError("tool_call_id", "a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self) -> str:
        """The message's text (text parts concatenated; null content is the empty string)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def to_turn(self, index: int) -> Turn:
        """The message as the serving layer's ``Turn``."""
        role = "system" if self.role == "developer" else self.role
        calls = [ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or []]
        return Turn(role, self.text(), calls, self.tool_call_id, self.name if role == "tool" else None,  # type: ignore[arg-type]
                    self.reasoning_content, f"messages[{index}]")


class FunctionDefinition(BaseModel):
    """A tool's function: name, description, JSON Schema of its parameters."""

    model_config = STRICT
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments always follow the schema here


class ToolParam(BaseModel):
    """A tool: ``{"type": "function", "function": {...}}``."""

    model_config = STRICT
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    """``{"name": ...}`` of a named tool choice."""

    model_config = STRICT
    name: str


class NamedToolChoice(BaseModel):
    """``{"type": "function", "function": {"name": ...}}``: call this function."""

    model_config = STRICT
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    """``json_schema`` of a response format: ``name``, ``schema`` (``strict`` accepted: answers always follow it)."""

    model_config = STRICT
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # answers always follow the schema here


class ResponseFormatJsonSchema(BaseModel):
    """``{"type": "json_schema", "json_schema": {...}}``: JSON valid for the schema."""

    model_config = STRICT
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


class ResponseFormatJsonObject(BaseModel):
    """``{"type": "json_object"}``: any JSON object."""

    model_config = STRICT
    type: Literal["json_object"]


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False
    include_obfuscation: bool | None = None  # sent by newer clients; nothing to obfuscate here


class ResponseFormatText(BaseModel):
    model_config = STRICT
    type: Literal["text"]


class SamplingRequest(BaseModel):
    """Fields shared by chat completions and completions.

    Attributes (all optional):
        model: model id; the server's default model when missing.
        temperature: [0, 2], default 1.0 (0 is greedy).
        top_p: (0, 1], default 1.0.
        top_k: >= -1; 0 and -1 disable it (an extension beyond OpenAI, as in vLLM).
        seed: seed of the sampler, a signed 64-bit integer (negative ones too, as vLLM takes
            them); choice ``i`` of ``n`` uses ``seed + i`` (wrapping around within 64 bits).
        stop: a string or up to 16 strings ending generation; never part of the output.
        n: number of choices, 1-16.
        presence_penalty, frequency_penalty: [-2, 2].
        stream: answer with server-sent events.
        stream_options: ``{"include_usage": bool}``, only with ``stream``.
    """

    model_config = STRICT

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, int | float] | None = None  # token id (as text) -> bias in [-100, 100]
    # accepted and ignored: they cannot change the answer
    user: str | None = None

    @model_validator(mode="after")
    def _check_shared(self) -> "SamplingRequest":
        if isinstance(self.stop, list):
            if len(self.stop) > MAX_STOP_STRINGS:
                raise RequestParamError("stop", f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop_strings():
            if s == "":
                raise RequestParamError("stop", "stop strings must not be empty")
        if self.stream_options is not None and not self.stream:
            raise RequestParamError("stream_options", "stream_options is only allowed when stream is true")
        for key, bias in (self.logit_bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise RequestParamError("logit_bias", f"keys must be token ids, got {key!r}")
            if not -LOGIT_BIAS_MAX <= bias <= LOGIT_BIAS_MAX:
                raise RequestParamError("logit_bias", f"the bias of token {key} must be in [-{LOGIT_BIAS_MAX:g}, "
                                                      f"{LOGIT_BIAS_MAX:g}], got {bias}")
        return self

    def sampling(self) -> Sampling:
        """The sampling options for the serving layer."""
        logprobs, top = self._logprob_options()
        return Sampling(self.temperature, self.top_p, self.top_k, self.seed, self.presence_penalty or 0.0,
                        self.frequency_penalty or 0.0, {int(k): float(v) for k, v in (self.logit_bias or {}).items()},
                        logprobs, top)

    def stop_strings(self) -> list[str]:
        """The stop strings as a list (empty when none)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)

    def _logprob_options(self) -> tuple[bool, int]:
        """(logprobs wanted, number of alternatives per token)."""
        return False, 0


class GenerationDefaults(BaseModel):
    """Server-side defaults for fields a request leaves out (OpenAI's defaults unless configured).

    Attributes:
        temperature: default sampling temperature.
        top_p: default nucleus mass.
        top_k: default top-k (0 disables it).
        max_tokens: default cap of generated tokens for chat, or None for "the rest of the
            model's context" (OpenAI's behaviour).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    temperature: float = OPENAI_DEFAULT_TEMPERATURE
    top_p: float = OPENAI_DEFAULT_TOP_P
    top_k: int = 0
    max_tokens: int | None = None


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions`` body.

    Attributes (beyond SamplingRequest):
        messages: the conversation, at least one message.
        max_tokens, max_completion_tokens: cap of generated tokens (>= 1); the latter wins
            when both are given.
        logprobs: return the chosen tokens' log-probabilities.
        top_logprobs: 0-20 alternatives per token; requires ``logprobs``.
        tools, tool_choice, parallel_tool_calls: functions the model may call and how.
        response_format: text, ``json_object`` or ``json_schema``.
        reasoning_effort: "none" switches a thinking model's reasoning off, any other value on.
        chat_template_kwargs: extra template variables (vLLM's), e.g. ``enable_thinking``.
    """

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # accepted and ignored: they cannot change the answer
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    modalities: list[Literal["text"]] | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestParamError("top_logprobs", "top_logprobs requires logprobs to be true")
        return self

    def to_generate_request(self) -> GenerateRequest:
        """The request for the serving layer."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            tool_choice = ToolChoice("function", choice.function.name)
        else:
            tool_choice = ToolChoice(choice or "auto")
        rf = self.response_format
        if isinstance(rf, ResponseFormatJsonSchema):
            response_format = ResponseFormat("json_schema", rf.json_schema.schema_ if rf.json_schema.schema_ is not None else {})
        elif isinstance(rf, ResponseFormatJsonObject):
            response_format = ResponseFormat("json_object")
        else:
            response_format = ResponseFormat()
        thinking = (self.chat_template_kwargs or {}).get("enable_thinking")
        if self.reasoning_effort is not None:
            thinking = self.reasoning_effort != "none"
        return GenerateRequest(
            model=self.model, turns=[m.to_turn(i) for i, m in enumerate(self.messages)], n=self.num_choices,
            max_tokens=self.requested_max_tokens, stop=self.stop_strings(), sampling=self.sampling(),
            tools=[ToolSpec(t.function.name, t.function.description or "",
                            t.function.parameters if t.function.parameters is not None else {"type": "object", "properties": {}},
                            f"tools[{i}].function")
                   for i, t in enumerate(self.tools or [])],
            tool_choice=tool_choice, parallel_tool_calls=self.parallel_tool_calls is not False,
            response_format=response_format, thinking=bool(thinking) if thinking is not None else None,
        )

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _logprob_options(self) -> tuple[bool, int]:
        return bool(self.logprobs), (self.top_logprobs or 0) if self.logprobs else 0


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions`` body.

    Attributes (beyond SamplingRequest):
        prompt: a string, a list of strings, a list of token ids or a list of such lists; each
            prompt gets ``n`` choices (choice index = prompt index * n + i).
        max_tokens: >= 1, default 16 (OpenAI's default for this endpoint).
        echo: prepend the prompt to each choice's text.
        logprobs: 0-5 alternatives per token (0: only the chosen token's log-probability).
        suffix: not supported (must be null); best_of: must equal ``n`` when given.
    """

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=1)
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    @model_validator(mode="after")
    def _check_completion(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise RequestParamError("prompt", "prompt must not be an empty list")
        if isinstance(self.prompt, list) and any(isinstance(p, list) and not p for p in self.prompt):
            raise RequestParamError("prompt", "prompt token lists must not be empty")
        if self.suffix:
            raise unsupported("suffix", "suffix is not supported")
        if self.best_of is not None and self.best_of != self.num_choices:
            raise unsupported("best_of", "best_of other than n is not supported")
        if self.echo and self.logprobs is not None:
            raise unsupported("echo", "echo together with logprobs is not supported (no prompt log-probabilities)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt as text or as token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def _logprob_options(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0

    def to_generate_request(self) -> GenerateRequest:
        """The request for the serving layer (each prompt gets ``n`` choices)."""
        return GenerateRequest(
            model=self.model, prompts=self.prompts(), n=self.num_choices, max_tokens=self.max_tokens,
            default_max_tokens=OPENAI_DEFAULT_COMPLETIONS_MAX_TOKENS, stop=self.stop_strings(),
            sampling=self.sampling(), echo=bool(self.echo), param="prompt",
        )
