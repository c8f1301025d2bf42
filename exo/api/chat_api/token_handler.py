"""From the node's stream of token ids to what a client sees.

* ``find_stop`` / ``stop_prefix_overlap``: pure stop-string helpers (the idea of mlx-lm's
  ``stopping_criteria`` and ``sequence_overlap``): a stop string may span tokens, so text that
  could be the start of a stop string is held back until the next token decides.
* ``ChoiceTextStream``: per choice, token ids -> text deltas that are UTF-8 safe
  (``IncrementalDetokenizer``), never contain a stop string or special tokens, with the
  log-probabilities of the tokens whose text was released.
* ``build_chunk`` / ``encode_sse``: the one function building every streamed chunk (chat and
  text completions) and its server-sent-event framing.
* ``TokenQueue``: per-request queue fed by one task per choice iterating ``Node.generate``;
  closing a choice (or the whole queue) closes its generator, which cancels the request on
  every node of the ring.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Literal, Sequence

from exo.api.chat_api.responses import (
    ChatChoiceLogprobs,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    TopLogprob,
    Usage,
)
from exo.inference.tokenizers import IncrementalDetokenizer, Tokenizer
from exo.orchestration.request import TokenResult

logger = logging.getLogger(__name__)

ChunkKind = Literal["chat", "completion"]


# ---------------------------------------------------------------------------- stop strings


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index in ``text`` where the earliest stop string begins, or None when none occurs."""
    best: int | None = None
    for s in stops:
        i = text.find(s)
        if i != -1 and (best is None or i < best):
            best = i
    return best


def stop_prefix_overlap(text: str, stops: Sequence[str]) -> int:
    """Length (characters) of the longest suffix of ``text`` that is a proper prefix of a stop string.

    That many trailing characters must be held back: the next token may complete the stop.
    """
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


# ---------------------------------------------------------------------------- token text / bytes


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The raw bytes of one token (a byte-level BPE token may hold part of a UTF-8 character)."""
    return tokenizer.token_bytes(token_id)


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """One token as text (invalid UTF-8 of a partial character shown as U+FFFD)."""
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------- per-choice text


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one released token, in the terms clients see.

    Attributes:
        token: the token's text.
        bytes: its raw bytes.
        logprob: natural-log probability of the token.
        top: alternatives as (text, bytes, logprob), most likely first.
        text_offset: characters of the choice's text before this token's text.
    """

    token: str
    bytes: bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...]
    text_offset: int


@dataclass
class TextDelta:
    """What one step of a choice releases.

    Attributes:
        text: new text for the client (may be empty).
        logprobs: log-probabilities of the tokens released with it.
        stopped: a stop string was found; the choice is over (finish_reason "stop").
    """

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    stopped: bool = False


@dataclass
class _PendingToken:
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]
    start: int  # characters of decoded text before this token
    end: int | None  # characters after it; None while its UTF-8 character is incomplete


class ChoiceTextStream:
    """Turns one choice's token ids into client text, honouring stop strings.

    Args:
        tokenizer: the model's tokenizer.
        stop_strings: strings that end the choice; neither they nor anything after them is
            released.
        want_logprobs: collect ``TokenLogprob`` entries (requires TokenResult.logprobs).

    Attributes:
        completion_tokens: tokens consumed so far (counted for usage).
        text: all text released so far.
        stopped: a stop string ended the choice.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = (), want_logprobs: bool = False):
        self._tokenizer = tokenizer
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = [s for s in stop_strings if s]
        self._want_logprobs = want_logprobs
        self._decoded = 0  # characters decoded so far (released + held)
        self._held = ""  # decoded text not yet released (a possible stop-string prefix)
        self._pending: list[_PendingToken] = []  # tokens whose log-probabilities are not released
        self.completion_tokens = 0
        self.text = ""
        self.stopped = False
        self.finished = False

    def add_result(self, result: TokenResult) -> TextDelta:
        """Feed a TokenResult's tokens; stops early (ignoring the rest) at a stop string."""
        delta = TextDelta()
        for i, tok in enumerate(result.tokens):
            if self.stopped:
                break
            lp = result.logprobs[i] if i < len(result.logprobs) else None
            top = result.top_logprobs[i] if i < len(result.top_logprobs) else []
            step = self.add_token(tok, lp, top)
            delta.text += step.text
            delta.logprobs.extend(step.logprobs)
            delta.stopped = step.stopped
        return delta

    def add_token(self, token_id: int, logprob: float | None = None, top: Sequence[tuple[int, float]] = ()) -> TextDelta:
        """Feed one token id (with its log-probability and alternatives when asked for)."""
        if self.stopped or self.finished:
            return TextDelta(stopped=self.stopped)
        self.completion_tokens += 1
        piece = self._detok.add(token_id)
        tok = _PendingToken(token_id, logprob, list(top), self._decoded, None)
        if self._want_logprobs:
            self._pending.append(tok)
        if piece:
            self._decoded += len(piece)
            for p in self._pending:
                if p.end is None:
                    p.end = self._decoded
            self._held += piece
        return self._release(final=False)

    def finish(self) -> TextDelta:
        """No more tokens: release the held text (checked for stop strings once more)."""
        if self.stopped or self.finished:
            return TextDelta(stopped=self.stopped)
        piece = self._detok.flush()
        if piece:
            self._decoded += len(piece)
            self._held += piece
        for p in self._pending:
            if p.end is None:
                p.end = self._decoded
        delta = self._release(final=True)
        self.finished = True
        return delta

    def _release(self, final: bool) -> TextDelta:
        stop_at = find_stop(self._held, self._stops) if self._stops else None
        if stop_at is not None:
            out = self._held[:stop_at]
            self._held = ""
            self.stopped = True
        else:
            keep = 0 if final else stop_prefix_overlap(self._held, self._stops)
            out = self._held[: len(self._held) - keep]
            self._held = self._held[len(self._held) - keep:]
        self.text += out
        released = len(self.text)
        delta = TextDelta(text=out, stopped=self.stopped)
        if self._want_logprobs:
            if self.stopped:
                # only tokens whose text lies wholly in the released text: a token that holds
                # the start of the stop string is part of the stop, even when its first
                # characters were released (its log-probability is of text the client never sees)
                done = [p for p in self._pending if p.end is not None and p.end <= released]
                self._pending = []
            elif final:
                done, self._pending = self._pending, []
            else:
                done = [p for p in self._pending if p.end is not None and p.end <= released]
                self._pending = [p for p in self._pending if not (p.end is not None and p.end <= released)]
            delta.logprobs = [self._to_logprob(p) for p in done if p.logprob is not None]
        return delta

    def _to_logprob(self, p: _PendingToken) -> TokenLogprob:
        t = self._tokenizer
        b = token_bytes(t, p.token_id)
        top = tuple((token_text(t, tid), token_bytes(t, tid), float(lp)) for tid, lp in p.top)
        return TokenLogprob(b.decode("utf-8", errors="replace"), b, float(p.logprob), top, min(p.start, len(self.text)))


# ---------------------------------------------------------------------------- chunks


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
    """

    index: int
    text: str | None = None
    role: Literal["assistant"] | None = None
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    text_offset_base: int = 0


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
                    delta=ChatDelta(role=u.role, content=u.text),
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


def encode_sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>\\n\\n`` (a str payload such as "[DONE]" as is)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode("utf-8")


# ---------------------------------------------------------------------------- per-request queue


@dataclass
class ChoiceEvent:
    """An item of a TokenQueue: a result, an error, or the end of a choice's generator.

    Attributes:
        index: choice index.
        result: a TokenResult, or None.
        error: the exception the generator raised, or None.
        done: the generator ended.
    """

    index: int
    result: TokenResult | None = None
    error: BaseException | None = None
    done: bool = False


GeneratorFactory = Callable[[], Any]  # -> AsyncIterator[TokenResult] (or an awaitable of one)


class TokenQueue:
    """One request's queue of results, fed by one task per choice.

    Use as ``async with TokenQueue(factories) as q: ev = await q.get(timeout)``. Leaving the
    block (normally, on error or on cancellation, e.g. a client disconnect) cancels every
    feeding task, whose ``finally`` closes its generator: the node then ends the request on
    every node of the ring.

    Args:
        factories: one per choice; each returns the choice's ``Node.generate(...)`` iterator.
        name: prefix of the tasks' names (for logs).
    """

    def __init__(self, factories: Sequence[GeneratorFactory], name: str = "request"):
        self._factories = list(factories)
        self._queue: asyncio.Queue[ChoiceEvent] = asyncio.Queue()
        self._tasks: dict[int, asyncio.Task] = {}
        self._name = name

    async def __aenter__(self) -> "TokenQueue":
        for i, make in enumerate(self._factories):
            self._tasks[i] = asyncio.create_task(self._feed(i, make), name=f"{self._name}-choice-{i}")
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def _feed(self, index: int, make: GeneratorFactory) -> None:
        gen: AsyncIterator[TokenResult] | None = None
        try:
            gen = make()
            if inspect.isawaitable(gen):
                gen = await gen
            async for result in gen:  # type: ignore[union-attr]
                self._queue.put_nowait(ChoiceEvent(index, result=result))
            self._queue.put_nowait(ChoiceEvent(index, done=True))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # handed to the consumer, which answers the client
            self._queue.put_nowait(ChoiceEvent(index, error=e))
        finally:
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    logger.exception("closing the generator of %s choice %d failed", self._name, index)

    async def get(self, timeout: float | None) -> ChoiceEvent:
        """The next event of any choice.

        Raises:
            asyncio.TimeoutError: nothing arrived within ``timeout`` seconds (None: no limit).
            asyncio.CancelledError: the reader was cancelled, even in the loop turn an event
                arrived (Python 3.11's ``wait_for`` returned the event then, and a request
                whose client had gone ran on); the event stays queued.
        """
        async with asyncio.timeout(timeout):
            return await self._queue.get()

    def cancel_choice(self, index: int) -> None:
        """Stop choice ``index`` (e.g. at a stop string): its generator is closed in the
        background; ``aclose`` waits for it."""
        task = self._tasks.get(index)
        if task is not None and not task.done():
            task.cancel()

    async def aclose(self) -> None:
        """Cancel every feeding task and wait until all generators are closed."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        for t in tasks:
            if not t.cancelling():
                t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
