"""Grammars for constrained sampling (structured output, tool arguments): the one place they live.

A grammar is llguidance's serialized grammar string (https://github.com/guidance-ai/llguidance,
syntax: https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md): built here from a
JSON Schema (``json_schema_grammar``) or from Lark source that may embed ``%json {schema}``
(``lark_grammar``), validated without a tokenizer, carried in ``GenerationOptions.grammar``
around the ring, and turned into a ``GrammarMatcher`` on the node holding the last layer, whose
mask the ``Sampler`` applies to the logits before it samples. Because the mask lives in the
sampler, every engine (torch, tinygrad, mlx, dummy) gets it.

Why llguidance: it takes JSON Schema, Lark with embedded JSON schemas and lazy lexemes
(``StructTag`` tool-call triggers), supports recursive schemas, and needs neither torch nor
transformers (xgrammar needs torch, transformers and triton). Measured against outlines-core on
SmolLM2's 49,152-token vocabulary (``bench/grammar_libraries.py``, ``bench/results.md``, 2 vCPU
AMD EPYC): llguidance compiles a schema in 1-1.6 ms, outlines-core builds its index in 60-770 ms
(growing with the schema: paid by every request with a new schema); outlines-core's precomputed
mask is faster per token (4-6 us against llguidance's 30-45 us median, both far below a ~15 ms
decode step), but it has no recursion (its regex unrolls a recursive schema to a fixed depth),
no Lark and no tool-call triggers.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable

import llguidance
import llguidance.numpy
import numpy as np

from exo.inference.tokenizers import Tokenizer

logger = logging.getLogger(__name__)

#: LLTokenizers kept at once (one per model's tokenizer; building one takes 0.3-1 s).
_MAX_CACHED_TOKENIZERS = 8
_cache: OrderedDict[tuple, tuple[object, llguidance.LLTokenizer]] = OrderedDict()
_cache_lock = threading.Lock()
#: llguidance's JSON compile options under a schema's own ``"x-guidance"``: between two tokens of
#: the JSON, nothing, one space, or one or two newlines and up to 20 spaces or tabs of indent (the
#: gap llama.cpp's JSON-schema grammars allow). llguidance's default, any whitespace, lets a
#: sampled model emit whitespace until its token budget runs out; this still pretty-prints.
JSON_DEFAULTS = {"whitespace_pattern": r"(?:\x20|\n{1,2}[\x20\t]{0,20})?"}


def _validated(grammar: str, what: str) -> str:
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"invalid {what}: {error}")
    return grammar


def json_schema_grammar(schema: dict | bool | None) -> str:
    """An llguidance grammar for JSON text valid under the JSON Schema ``schema``.

    ``None`` means any JSON object (OpenAI's ``response_format: {"type": "json_object"}``);
    ``True`` any JSON value. Whitespace between tokens: a space or a newline and an indent (``JSON_DEFAULTS``);
    a schema may set llguidance's options under ``"x-guidance"`` (e.g. ``{"whitespace_flexible":
    false}`` for none, ``"whitespace_pattern"``, ``"item_separator"``).
    Supported keywords: https://github.com/guidance-ai/llguidance/blob/main/docs/json_schema.md.

    Raises:
        ValueError: ``schema`` is not a dict, a bool or None, or llguidance rejects it (the
            message is llguidance's, e.g. "Invalid type: objectx"); ``False`` is unsatisfiable.
    """
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"a JSON schema must be an object or a boolean, got {type(schema).__name__}")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_DEFAULTS)
    except (TypeError, ValueError) as e:  # not JSON-serializable, or not an object
        raise ValueError(f"invalid JSON schema: {e}") from None
    return _validated(grammar, "JSON schema")


def schema_with_defaults(schema: dict) -> dict:
    """``schema`` with ``JSON_DEFAULTS`` as its ``"x-guidance"`` options (its own win), for
    embedding in Lark as ``%json {...}``, where ``json_schema_grammar``'s defaults do not apply."""
    return {**schema, "x-guidance": {**JSON_DEFAULTS, **schema.get("x-guidance", {})}}


def lark_grammar(source: str) -> str:
    """An llguidance grammar from Lark source (llguidance's dialect: ``start`` is the start rule;
    ``%json {schema}`` embeds a JSON schema; lexemes may be lazy; see its syntax doc).

    Raises:
        ValueError: ``source`` is not a string or is not a valid grammar (llguidance's message,
            with the line and column).
    """
    if not isinstance(source, str):
        raise ValueError(f"a Lark grammar must be a string, got {type(source).__name__}")
    return _validated(llguidance.LLMatcher.grammar_from_lark(source), "Lark grammar")


def grammar_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of ``tokenizer``'s vocabulary (built from the HF ``tokenizers`` JSON,
    with the model's EOS ids as its end tokens), cached per tokenizer: copies of one
    (``with_chat_template``) share it. Building one takes 0.3-1 s and holds the GIL for part of it:
    callers on an event loop run it in a thread (``asyncio.to_thread``). Thread-safe.

    Raises:
        ValueError: llguidance cannot read the vocabulary.
    """
    backend = tokenizer.backend
    key = (id(backend), tuple(tokenizer.eos_token_ids), tokenizer.vocab_size)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] is backend:
            _cache.move_to_end(key)
            return hit[1]
    try:
        lltok = llguidance.LLTokenizer(backend.to_str(), eos_token=list(tokenizer.eos_token_ids) or None)
        if lltok.vocab_size < tokenizer.vocab_size:  # added tokens beyond the model's vocabulary
            lltok = llguidance.LLTokenizer(backend.to_str(), n_vocab=tokenizer.vocab_size,
                                           eos_token=list(tokenizer.eos_token_ids) or None)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"llguidance cannot read this tokenizer: {e}") from None
    with _cache_lock:
        _cache[key] = (backend, lltok)  # the backend is kept so that its id is not reused
        while len(_cache) > _MAX_CACHED_TOKENIZERS:
            _cache.popitem(last=False)
    return lltok


def validate_grammar(grammar: str, tokenizer: Tokenizer) -> None:
    """Check that ``grammar`` (from this module) can constrain generation with ``tokenizer``
    (e.g. a special token it names exists in the vocabulary).

    Raises:
        ValueError: llguidance's message when it cannot.
    """
    error = llguidance.LLMatcher.validate_grammar(grammar, grammar_tokenizer(tokenizer))
    if error:
        raise ValueError(f"invalid grammar: {error}")


class GrammarMatcher:
    """The grammar state of one request: which tokens may come next, and the tokens so far.

    Wraps ``llguidance.LLMatcher`` (https://github.com/guidance-ai/llguidance). Once the grammar
    is complete only the tokenizer's EOS ids are allowed, so a constrained generation ends with
    the model's stop token. Not thread-safe: one request's sampler uses it at a time.

    Args:
        grammar: a grammar from ``json_schema_grammar`` or ``lark_grammar``.
        tokenizer: the model's tokenizer.

    Raises:
        ValueError: the grammar cannot be used (llguidance's message).
    """

    def __init__(self, grammar: str, tokenizer: Tokenizer):
        lltok = grammar_tokenizer(tokenizer)
        self._matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        if self._matcher.is_error():
            raise ValueError(f"invalid grammar: {self._matcher.get_error()}")
        self.vocab_size = lltok.vocab_size
        #: the ids the grammar allows once it is complete (the tokenizer's EOS ids)
        self.eos_token_ids = frozenset(lltok.eos_tokens)
        self._bitmask = llguidance.numpy.allocate_token_bitmask(1, self.vocab_size)  # (1, ceil(vocab / 32)) int32

    def allowed(self) -> np.ndarray:
        """Which tokens may come next: bool of shape (words * 32,), ``words = ceil(vocab / 32)``,
        True where allowed (bits past the vocabulary are False).

        Raises:
            ValueError: the matcher is in an error state.
        """
        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._bitmask)
        if self._matcher.is_error():
            raise ValueError(f"grammar error: {self._matcher.get_error()}")
        # token i is bit i % 32 of little-endian int32 word i // 32: bit i of the bytes, LSB first
        return np.unpackbits(self._bitmask.view(np.uint8), bitorder="little").view(bool)

    def apply_mask(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` (vocab,) float32 with every token the grammar forbids at -inf: a new array.

        The model's output may be longer than the tokenizer's vocabulary (padded embedding) or
        shorter (a toy engine): ids the tokenizer does not have are always forbidden.

        Raises:
            ValueError: the matcher is in an error state.
        """
        allowed = self.allowed()
        n = min(logits.shape[0], self.vocab_size)
        out = np.full(logits.shape, -np.inf, dtype=np.float32)
        np.copyto(out[:n], logits[:n], where=allowed[:n])
        return out

    def consume(self, token_id: int) -> None:
        """Advance past ``token_id``, the token sampled (an EOS id after the grammar completed ends it).

        Raises:
            ValueError: the grammar does not allow ``token_id`` here (llguidance's message).
        """
        if not self._matcher.consume_token(int(token_id)):
            raise ValueError(f"grammar error: {self._matcher.get_error()}")

    def consume_all(self, tokens: Iterable[int]) -> None:
        """``consume`` each of ``tokens`` in order (a replay). Raises as ``consume``."""
        tokens = [int(t) for t in tokens]
        if tokens and not self._matcher.consume_tokens(tokens):
            raise ValueError(f"grammar error: {self._matcher.get_error()}")

    @property
    def is_stopped(self) -> bool:
        """Whether the grammar is complete and can take nothing but EOS (or took it)."""
        return self._matcher.is_stopped()

    @property
    def is_accepting(self) -> bool:
        """Whether the tokens so far form a complete sentence of the grammar (it may go on)."""
        return self._matcher.is_accepting()
