"""A deterministic inference engine without weights, for fast tests of everything above the engine.

``DummyInferenceEngine`` honours the ``InferenceEngine`` contract exactly (shapes, dtypes, the
``position`` rules of the KV cache, request cleanup) but computes nothing learned: each "layer"
only counts itself in the hidden states, and the last shard derives the next token from every
token of the request so far. So a test can tell, from the tokens alone, whether the ring ran
every layer exactly once, in order, and whether each node's KV cache was kept and replayed
correctly; and it can compute the expected tokens with :func:`expected_tokens`.

Hidden states, float32 of shape ``(1, T, HIDDEN_SIZE)``; per position ``j``:
    ``[0]`` the token id, ``[1]`` its absolute position, ``[2]`` the layers run so far, the rest 0.
Final hidden states (``infer_final_hidden`` on the last shard, for embeddings): those hidden
states as they leave the last layer (no norm: the dummy model has none), ``(1, T, HIDDEN_SIZE)``.
Logits, float32 of shape ``(vocab_size,)``: ``PEAK`` at the next token, 0 elsewhere, so greedy
decoding and sampling at any temperature pick it (its probability is > 1 - vocab_size * e^-PEAK).
Next token after tokens ``t_0 .. t_{n-1}``: ``next_token(digest(t_0 .. t_{n-1}))``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Iterable, Mapping

import numpy as np

from exo.inference.inference_engine import WIRE_HIDDEN_DTYPE, InferenceEngine
from exo.inference.shard import Shard

logger = logging.getLogger(__name__)

HIDDEN_SIZE = 8
DEFAULT_VOCAB_SIZE = 1024  # every registered tokenizer has at least this many ids (SmolLM2: 49152)
FIRST_ORDINARY_ID = 32  # ids below are control tokens in SmolLM2 (0..16); generated ids stay above
PEAK = 40.0
_DIGEST_MOD = 1_000_003  # prime; keeps the digest exact in Python ints
_MAX_TOKEN_ID = 2**24  # float32 holds every integer below this exactly


class DummyEngineError(RuntimeError):
    """The failure a ``DummyInferenceEngine`` was told to raise (``fail_layer``)."""


def digest(tokens: Iterable[int], start: int = 0) -> int:
    """Rolling hash of token ids: ``d = (d * 31 + t + 1) mod 1000003`` from ``start``."""
    d = start
    for t in tokens:
        d = (d * 31 + int(t) + 1) % _DIGEST_MOD
    return d


def next_token(d: int, vocab_size: int = DEFAULT_VOCAB_SIZE) -> int:
    """The token the dummy model predicts after a context of digest ``d``: an ordinary id in
    ``[FIRST_ORDINARY_ID, vocab_size)``."""
    return FIRST_ORDINARY_ID + d % (vocab_size - FIRST_ORDINARY_ID)


def expected_tokens(prompt: list[int], n: int, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    forced_tokens: Mapping[int, int] | None = None) -> list[int]:
    """The ``n`` tokens greedy decoding of ``prompt`` yields with a ``DummyInferenceEngine``
    ring (no stop token; ``forced_tokens`` as given to the engine)."""
    forced = forced_tokens or {}
    seq, d = list(prompt), digest(prompt)
    out = []
    for _ in range(n):
        tok = forced.get(len(seq), next_token(d, vocab_size))
        out.append(tok)
        seq.append(tok)
        d = digest([tok], d)
    return out


class _RequestState:
    __slots__ = ("offset", "digest")

    def __init__(self) -> None:
        self.offset = 0  # tokens in the "KV cache"
        self.digest = 0  # digest of those tokens (used on the last shard)


class DummyInferenceEngine(InferenceEngine):
    """Deterministic engine with no weights (see the module docstring for what it computes).

    Args:
        vocab_size: length of the logits; generated ids lie in ``[FIRST_ORDINARY_ID, vocab_size)``,
            so they decode with the model's real tokenizer when ``vocab_size`` does not exceed it.
        token_delay: seconds slept in each ``infer_tensor`` call (so per generated token on each
            shard), to make generation slow enough to test cancellation, timeouts or concurrency.
        fail_layer: when set, any ``infer_tensor`` call on a shard holding this layer at
            ``position >= fail_at_position`` raises ``DummyEngineError`` (tests of error propagation).
        fail_at_position: see ``fail_layer``; 0 fails the prefill, larger values fail a decode step.
        forced_tokens: ``{position: token_id}``: the last shard predicts ``token_id`` when the
            request's cache holds ``position`` tokens after the step (e.g. force the EOS id).

    Raises:
        ValueError: ``vocab_size`` not above ``FIRST_ORDINARY_ID``, or a negative delay.
    """

    name = "dummy"

    def __init__(self, vocab_size: int = DEFAULT_VOCAB_SIZE, token_delay: float = 0.0, fail_layer: int | None = None,
                 fail_at_position: int = 0, forced_tokens: Mapping[int, int] | None = None):
        if vocab_size <= FIRST_ORDINARY_ID:
            raise ValueError(f"vocab_size must be > {FIRST_ORDINARY_ID}, got {vocab_size}")
        if token_delay < 0:
            raise ValueError(f"token_delay must be >= 0 seconds, got {token_delay}")
        self.vocab_size = vocab_size
        self.token_delay = token_delay
        self.fail_layer = fail_layer
        self.fail_at_position = fail_at_position
        self.forced_tokens = dict(forced_tokens or {})
        self._shard: Shard | None = None
        self._requests: dict[str, _RequestState] = {}
        self.calls = 0  # infer_tensor calls that ran to completion

    @property
    def shard(self) -> Shard | None:
        return self._shard

    async def ensure_shard(self, shard: Shard) -> None:
        """Hold ``shard`` (nothing is loaded).

        Raises:
            KeyError: unknown model id.
            ValueError: ``shard.n_layers`` differs from the model card's layer count.
        """
        from exo.models.sources import STORE

        card = await asyncio.to_thread(STORE.card, shard.model_id)
        if shard.n_layers != card.n_layers:
            raise ValueError(f"shard says {shard.n_layers} layers but {shard.model_id} has {card.n_layers}")
        if self._shard != shard:
            self._shard = shard
            self._requests.clear()

    async def infer_tensor(self, request_id: str, shard: Shard, x: np.ndarray, position: int) -> np.ndarray:
        return await self._run(request_id, shard, x, position, final_hidden=False)

    async def infer_final_hidden(self, request_id: str, shard: Shard, x: np.ndarray, position: int) -> np.ndarray:
        """As ``infer_tensor``, but the last shard returns its hidden states ``(1, T, 8)``
        float32 (see the module docstring) instead of logits."""
        return await self._run(request_id, shard, x, position, final_hidden=True)

    async def _run(self, request_id: str, shard: Shard, x: np.ndarray, position: int, final_hidden: bool) -> np.ndarray:
        """Run ``shard`` on ``x`` (token ids ``(1, T)`` int, or hidden states ``(1, T, 8)`` float).

        Returns hidden states ``(1, T, 8)`` float32, or on the last shard logits ``(vocab_size,)``
        float32.

        Raises:
            ValueError: bad shape/dtype/ids, hidden states not coming from the layer before this
                shard, or ``position`` not matching the request's cache length.
            KeyError: ``position > 0`` for a request with no cache here.
            DummyEngineError: the failure configured with ``fail_layer``.
        """
        if self._shard != shard:
            await self.ensure_shard(shard)
        t = self._validate(shard, x, position)
        state = self._requests.get(request_id)
        if position == 0:
            state = _RequestState()
        elif state is None:
            raise KeyError(f"request {request_id} has no KV cache on this node (position {position})")
        elif state.offset != position:
            raise ValueError(f"request {request_id}: position {position} but the KV cache holds {state.offset} tokens")
        if self.token_delay:
            await asyncio.sleep(self.token_delay)
        if self.fail_layer is not None and shard.start_layer <= self.fail_layer <= shard.end_layer \
                and position >= self.fail_at_position:
            raise DummyEngineError(f"layer {self.fail_layer} failed at position {position} (as configured)")

        if shard.is_first_layer:
            h = np.zeros((1, t, HIDDEN_SIZE), dtype=WIRE_HIDDEN_DTYPE)
            h[0, :, 0] = x[0]
            h[0, :, 1] = np.arange(position, position + t)
        else:
            h = x.astype(WIRE_HIDDEN_DTYPE, copy=True)
        h[0, :, 2] += shard.n_shard_layers
        state.digest = digest(h[0, :, 0].astype(np.int64).tolist(), state.digest)
        state.offset = position + t
        self._requests[request_id] = state
        self.calls += 1
        if not shard.is_last_layer or final_hidden:
            return h
        logits = np.zeros(self.vocab_size, dtype=np.float32)
        logits[self.forced_tokens.get(state.offset, next_token(state.digest, self.vocab_size))] = PEAK
        return logits

    def _validate(self, shard: Shard, x: np.ndarray, position: int) -> int:
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        if shard.is_first_layer:
            if x.ndim != 2 or x.shape[0] != 1 or x.shape[1] < 1 or not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"the first shard takes token ids of shape (1, T) and an integer dtype, got {x.shape} {x.dtype}")
            if x.min() < 0 or x.max() >= _MAX_TOKEN_ID:
                raise ValueError(f"token ids must be in [0, {_MAX_TOKEN_ID}), got range [{x.min()}, {x.max()}]")
            return x.shape[1]
        if x.ndim != 3 or x.shape[0] != 1 or x.shape[1] < 1 or x.shape[2] != HIDDEN_SIZE or not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"shard {shard.start_layer}-{shard.end_layer} takes hidden states of shape (1, T, {HIDDEN_SIZE}) "
                             f"and a float dtype, got {x.shape} {x.dtype}")
        t = x.shape[1]
        if not np.all(x[0, :, 2] == shard.start_layer):
            raise ValueError(f"hidden states went through {x[0, :, 2].tolist()} layers, but this shard starts at layer {shard.start_layer}")
        if not np.array_equal(x[0, :, 1], np.arange(position, position + t, dtype=x.dtype)):
            raise ValueError(f"hidden states are of positions {x[0, :, 1].tolist()}, not {position}..{position + t - 1}")
        return t

    async def clear_request(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    async def unload(self) -> None:
        self._shard = None
        self._requests.clear()

    def cached_request_ids(self) -> set[str]:
        return set(self._requests)
