"""The prompt cache: the KV caches of finished requests, kept to prefill the shared prefix of a
later request (a chat client's next turn resends the whole conversation).

As llama-server's ``cache_prompt``, vLLM's automatic prefix caching and mlx-lm's prompt cache
do, a node keeps a request's KV cache when the request ends and, for a new request, reuses the
longest prefix it shares token for token with a kept one: only the rest is prefilled. Here an
entry is the KV cache of this node's own layers, keyed by the id of the request that made it
and the tokens it holds. Every node of a ring keeps the entries of the requests it served, so
the first node (which sees token ids) picks an entry and a length, and the others (which see
hidden states) take the same entry by id; a node that no longer has it raises
``PromptCacheMiss`` and the request's origin replays the prefill without the cache.

Framework-free: an engine stores its own cache objects as entries' ``kv``.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)


#: Begins the message of every ``PromptCacheMiss``: the text by which a request's origin knows
#: the error a ring member reported (errors cross the wire as text).
MISS = "prompt cache miss"


class PromptCacheMiss(KeyError):
    """A step asked for a prompt-cache entry (or more of its tokens) that this node does not
    hold: evicted under its budget, dropped with a shard change, or never made here. The
    request's origin replays the prefill without the prompt cache."""

    def __init__(self, message: str):
        super().__init__(f"{MISS}: {message}")

    def __str__(self) -> str:  # KeyError's own repr-quotes its message
        return str(self.args[0])


@dataclass
class CacheEntry:
    """One kept KV cache.

    Attributes:
        tokens: the token ids whose keys and values it holds, int64 ``(n_tokens,)``.
        kv: the engine's own cache objects (e.g. one KV cache per layer).
        nbytes: memory ``kv`` takes, in bytes.
    """

    tokens: np.ndarray
    kv: Any
    nbytes: int


class PromptCache:
    """Kept KV caches bounded by ``budget_bytes``, the least recently used evicted first.

    ``add``, ``match``, ``get`` and ``clear`` may be called from the event loop and the engine's
    worker thread: a lock guards the entries. Lookups are linear in the entries (a budget holds
    tens to hundreds of conversations), each a vectorized token comparison.

    Args:
        budget_bytes: most bytes of ``kv`` held at once (0 disables the cache).
    """

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"the prompt cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entry_id: str, tokens: Sequence[int], kv: Any, nbytes: int) -> bool:
        """Keep ``kv`` (holding the keys and values of ``tokens``) as ``entry_id``, evicting the
        least recently used entries beyond the budget. An entry whose tokens all begin this one
        is dropped (this one serves every request that one would). Returns False when the entry
        alone exceeds the budget (nothing is kept) or has no tokens."""
        toks = np.asarray(tokens, dtype=np.int64)
        if not len(toks) or nbytes > self.budget_bytes:
            return False
        with self._lock:
            self._drop(entry_id)
            for eid in [e for e, old in self._entries.items() if len(old.tokens) <= len(toks)
                        and np.array_equal(old.tokens, toks[:len(old.tokens)])]:
                self._drop(eid)
            self._entries[entry_id] = CacheEntry(toks, kv, nbytes)
            self.nbytes += nbytes
            while self.nbytes > self.budget_bytes:
                evicted = next(iter(self._entries))
                logger.debug("prompt cache: evicting %s (%d tokens) over the budget of %d bytes", evicted,
                             len(self._entries[evicted].tokens), self.budget_bytes)
                self._drop(evicted)
        return True

    def match(self, tokens: Sequence[int]) -> tuple[str | None, int]:
        """The entry sharing the longest prefix with ``tokens`` and that prefix's length in
        tokens: (None, 0) when none shares a first token."""
        toks = np.asarray(tokens, dtype=np.int64)
        best, best_len = None, 0
        with self._lock:
            for eid, e in self._entries.items():
                n = min(len(e.tokens), len(toks))
                if n <= best_len:
                    continue
                diff = np.flatnonzero(e.tokens[:n] != toks[:n])
                common = int(diff[0]) if len(diff) else n
                if common > best_len:
                    best, best_len = eid, common
        return best, best_len

    def get(self, entry_id: str, n_tokens: int) -> CacheEntry:
        """The entry ``entry_id``, which must hold at least ``n_tokens`` tokens; it becomes the
        most recently used.

        Raises:
            PromptCacheMiss: no such entry here, or a shorter one.
        """
        with self._lock:
            e = self._entries.get(entry_id)
            if e is None or len(e.tokens) < n_tokens:
                have = "no entry" if e is None else f"{len(e.tokens)} tokens"
                raise PromptCacheMiss(f"prompt cache entry {entry_id}: {n_tokens} tokens asked for, {have} here")
            self._entries.move_to_end(entry_id)
            return e

    def clear(self) -> None:
        """Drop every entry (the shard changed: the keys and values are of other layers)."""
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def _drop(self, entry_id: str) -> None:
        e = self._entries.pop(entry_id, None)
        if e is not None:
            self.nbytes -= e.nbytes
