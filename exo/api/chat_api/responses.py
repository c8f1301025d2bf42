"""Response data models of the OpenAI-compatible API (pydantic v2): what the handlers send.

Chat completions (``ChatCompletion``) and their streamed chunks (``ChatCompletionChunk``),
completions (``Completion``, also the shape of their chunks), token counts (``Usage``),
log-probabilities in both formats, and ``GET /v1/models`` entries (``ModelObject``). The request
models and their validation are in ``models``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

class PromptTokensDetails(BaseModel):
    """``usage.prompt_tokens_details``: of the prompt tokens, those the prompt cache served."""

    cached_tokens: int


class Usage(BaseModel):
    """Token counts of one request (prompt counted once, completion over all choices)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


def _is_none(v: Any) -> bool:
    return v is None


class FunctionCall(BaseModel):
    """A call's function: its name and its arguments as JSON text."""

    name: str
    arguments: str


class ToolCallObject(BaseModel):
    """``message.tool_calls[i]`` of a chat completion."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    """The answer's message: content (null when the answer is only calls), its calls and, for
    a thinking model, its reasoning (``reasoning_content``, as vLLM and DeepSeek send it)."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallObject] | None = Field(None, exclude_if=_is_none)
    reasoning_content: str | None = Field(None, exclude_if=_is_none)


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    """A non-streamed chat completion (``object == "chat.completion"``)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionCallDelta(BaseModel):
    """A streamed piece of a call's function: its name on the first piece, more arguments."""

    name: str | None = Field(None, exclude_if=_is_none)
    arguments: str


class ToolCallDeltaObject(BaseModel):
    """A streamed piece of a call: the first has ``id``, ``type`` and the function's name;
    later ones only ``index`` and more ``arguments`` (as OpenAI streams them)."""

    index: int
    id: str | None = Field(None, exclude_if=_is_none)
    type: Literal["function"] | None = Field(None, exclude_if=_is_none)
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    """The new part of a streamed message; absent fields are left out of the JSON."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_is_none)
    content: str | None = Field(None, exclude_if=_is_none)
    reasoning_content: str | None = Field(None, exclude_if=_is_none)
    tool_calls: list[ToolCallDeltaObject] | None = Field(None, exclude_if=_is_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    """Legacy completions log-probabilities; ``text_offset`` in characters of the choice text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(BaseModel):
    """A completion (``object == "text_completion"``); streamed chunks have the same shape."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


ModelState = Literal["ready", "loading", "downloading", "available", "not downloaded"]


class DownloadInfo(BaseModel):
    """How far a model's download has come on the answering node (bytes; ``percent`` 0-100)."""

    bytes_done: int
    bytes_total: int
    percent: float


class ModelObject(BaseModel):
    """An entry of ``GET /v1/models`` (OpenAI's fields plus exo's).

    ``state``, as the answering node sees it: "ready" (its shard of the current ring is
    loaded), "loading" (being loaded), "downloading" (its files are coming; ``download``
    says how far), "available" (weights present, loaded on first use), "not downloaded".
    ``source``: "catalogue", "path" or "hub"; ``size``: bytes of its weights, when known.
    ``kind``: "text" (chat, completions, embeddings) or "image" (``/v1/images/*``).
    """

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "exo"
    name: str
    n_layers: int
    context_length: int
    architecture: str
    state: ModelState
    source: str
    size: int | None = None
    download: DownloadInfo | None = None
    kind: Literal["text", "image"] = "text"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
