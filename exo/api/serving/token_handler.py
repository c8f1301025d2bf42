"""From one choice's token ids to the text a client sees, whatever the dialect.

* ``find_stop`` / ``stop_prefix_overlap``: pure stop-string helpers (the idea of mlx-lm's
  ``stopping_criteria`` and ``sequence_overlap``): a stop string may span tokens, so text that
  could be the start of a stop string is held back until the next token decides.
* ``ChoiceTextStream``: per choice, token ids -> text deltas that are UTF-8 safe
  (``IncrementalDetokenizer``), never contain a stop string or special tokens, with the
  log-probabilities (``TokenLogprob``) of the tokens whose text was released.

The OpenAI framing of those deltas is in ``chunks``; the per-request queue feeding them from
``Node.generate`` is in ``token_queue``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from exo.inference.tokenizers import IncrementalDetokenizer, Tokenizer
from exo.orchestration.request import TokenResult


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
        show_tokens: special tokens whose text the client must see although decoding drops
            special tokens (a tool-call trigger such as Mistral's ``[TOOL_CALLS]``).

    Attributes:
        completion_tokens: tokens consumed so far (counted for usage).
        token_ids: those tokens' ids.
        text: all text released so far.
        stopped: a stop string ended the choice.
        stop_string: the stop string that ended it (the earliest in the text; the first listed
            on a tie), or None.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = (), want_logprobs: bool = False,
                 show_tokens: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = [s for s in stop_strings if s]
        self._want_logprobs = want_logprobs
        # the ones decoding drops, with their text
        self._shown = {t: tokenizer.id_to_token(t) or "" for t in show_tokens if tokenizer.decode([t]) == ""}
        self._decoded = 0  # characters decoded so far (released + held)
        self._held = ""  # decoded text not yet released (a possible stop-string prefix)
        self._pending: list[_PendingToken] = []  # tokens whose log-probabilities are not released
        self.completion_tokens = 0
        self.text = ""
        self.stopped = False
        self.stop_string: str | None = None
        self.finished = False
        self.token_ids: list[int] = []  # every token consumed

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
        self.token_ids.append(token_id)
        piece = self._detok.add(token_id) + self._shown.get(token_id, "")
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
            self.stop_string = next(s for s in self._stops if self._held.startswith(s, stop_at))
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
