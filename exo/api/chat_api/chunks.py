"""OpenAI's streamed chunks and their server-sent-event framing.

``build_chunk`` is the one function building every streamed chunk (chat and text completions)
from ``ChoiceUpdate`` values; ``encode_sse`` frames it as a server-sent event.
``chat_logprobs`` / ``completion_logprobs`` write ``TokenLogprob`` entries in the two OpenAI
log-probability formats, for chunks and whole responses alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from exo.api.chat_api.responses import (
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    FunctionCallDelta,
    ToolCallDeltaObject,
    TopLogprob,
    Usage,
)
from exo.api.serving.token_handler import TokenLogprob
from exo.api.serving.tool_parser import ToolCallDelta

ChunkKind = Literal["chat", "completion"]

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@dataclass(frozen=True)
class StreamMeta:
    """What every chunk of one response repeats.

    Attributes:
        kind: "chat" (``chat.completion.chunk``) or "completion" (``text_completion``).
        id: the response id.
        created: Unix seconds.
        model: model id.
        include_usage: ``stream_options.include_usage``: chunks carry ``"usage": null`` and a
            last chunk with empty ``choices`` carries the usage.
    """

    kind: ChunkKind
    id: str
    created: int
    model: str
    include_usage: bool = False


@dataclass
class ChoiceUpdate:
    """One choice's part of a chunk.

    Attributes:
        index: choice index.
        text: new text, or None (e.g. the role-only first chat chunk).
        role: "assistant" on the first chat chunk of a choice.
        finish_reason: "stop" or "length" on the choice's last chunk.
        logprobs: log-probabilities of the tokens of ``text``, or None when not asked for.
        text_offset_base: characters before the choice's generated text (the echoed prompt of a
            completion), added to each token's ``text_offset``.
        reasoning: new reasoning text (chat), or None.
        tool_calls: new pieces of calls (chat), or None.
    """

    index: int
    text: str | None = None
    role: Literal["assistant"] | None = None
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    text_offset_base: int = 0
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


def chat_logprobs(entries: Sequence[TokenLogprob]) -> ChatChoiceLogprobs:
    """Chat-format log-probabilities (``{"content": [{token, logprob, bytes, top_logprobs}]}``)."""
    return ChatChoiceLogprobs(content=[
        ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=list(e.bytes),
                         top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(b)) for t, b, lp in e.top])
        for e in entries
    ])


def completion_logprobs(entries: Sequence[TokenLogprob], text_offset_base: int = 0) -> CompletionLogprobs:
    """Legacy completions log-probabilities (tokens, token_logprobs, top_logprobs, text_offset)."""
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{t: lp for t, _, lp in e.top} for e in entries],
        text_offset=[text_offset_base + e.text_offset for e in entries],
    )


def build_chunk(meta: StreamMeta, updates: Sequence[ChoiceUpdate], usage: Usage | None = None) -> dict[str, Any]:
    """The JSON object of one streamed chunk (chat or text completion).

    An empty ``updates`` with ``usage`` builds the final usage chunk of ``include_usage``.
    """
    if meta.kind == "chat":
        chunk = ChatCompletionChunk(
            id=meta.id, created=meta.created, model=meta.model, usage=usage,
            choices=[
                ChatChunkChoice(
                    index=u.index,
                    delta=ChatDelta(role=u.role, content=u.text, reasoning_content=u.reasoning,
                                    tool_calls=_tool_call_deltas(u.tool_calls)),
                    logprobs=chat_logprobs(u.logprobs) if u.logprobs is not None else None,
                    finish_reason=u.finish_reason,  # type: ignore[arg-type]
                )
                for u in updates
            ],
        ).model_dump(mode="json")
    else:
        chunk = Completion(
            id=meta.id, created=meta.created, model=meta.model, usage=usage,
            choices=[
                CompletionChoice(
                    index=u.index,
                    text=u.text or "",
                    logprobs=completion_logprobs(u.logprobs, u.text_offset_base) if u.logprobs is not None else None,
                    finish_reason=u.finish_reason,  # type: ignore[arg-type]
                )
                for u in updates
            ],
        ).model_dump(mode="json")
    if not meta.include_usage:
        chunk.pop("usage", None)
    return chunk


def _tool_call_deltas(pieces: Sequence[ToolCallDelta] | None) -> list[ToolCallDeltaObject] | None:
    if not pieces:
        return None
    return [ToolCallDeltaObject(index=p.index, id=p.id, type="function" if p.id is not None else None,
                                function=FunctionCallDelta(name=p.name, arguments=p.arguments)) for p in pieces]


def encode_sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>\\n\\n`` (a str payload such as "[DONE]" as is)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode("utf-8")
