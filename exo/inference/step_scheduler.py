"""The order in which an engine runs its requests' steps: continuous batching of decode steps,
groups that keep a ring's nodes busy at once, and long prefills cut into pieces between the
decode steps (chunked prefill).

Every step of an engine runs on its one worker thread; this scheduler, on the event loop,
decides what runs next:

- **Decode batches** (continuous batching, as Orca and vLLM schedule per iteration): the decode
  steps queued when a batch starts run as one forward pass; requests join and leave between
  passes. A batch waits a few event-loop turns for steps about to arrive, then up to
  ``GATHER_MAX_WAIT`` seconds for the steps of other decoding requests (on a later node of a
  ring the previous node's batch arrives one message per request), until it is full.
- **Pipeline groups**: on a ring of ``pipeline_depth`` nodes, a batch is full at
  ``ceil(decoding / pipeline_depth)`` steps, so the decoding requests form that many groups:
  while one group's step runs on this node, the others' run on the other nodes, and every node
  works at all times (GPipe-style micro-batches, here of requests rather than of one batch's
  rows). A batch never waits for a full group's worth of steps that are elsewhere in the ring,
  and steps beyond a full batch join the next one, which evens the groups out.
- **Chunked prefill** (Sarathi-Serve; vLLM's chunked prefill): while requests are decoding, a
  long prefill runs in pieces, each about as long as one decode step (from the measured prefill
  rate), with a decode batch between pieces, so the running streams keep their pace; short
  prompts (at most ``SHORT_PROMPT`` tokens) run whole, up to ``SHORT_BUDGET`` tokens of them
  between two decode batches, so that a burst of new requests joins the running batch in a few
  steps (as vLLM's token budget takes many short prefills at once). With no stream decoding a
  prefill runs whole. The pieces of one request run in position order.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np

logger = logging.getLogger(__name__)

#: A batch starts once no step has joined for this many event-loop turns.
GATHER_STABLE_TURNS = 3
#: Most event-loop turns a batch waits for more steps.
GATHER_MAX_TURNS = 32
#: Longest a batch waits for its batch mates, in seconds.
GATHER_MAX_WAIT = 0.004
#: A request counts as decoding while its last decode step is at most this old, in seconds.
DECODING_WINDOW = 1.0
#: Fewest tokens in a piece of a long prefill while requests are decoding.
MIN_PIECE = 16
#: A prefill of at most this many tokens runs whole even while requests are decoding (below a
#: ring's ``PREFILL_CHUNK``, whose pieces a later node must not run whole) ...
SHORT_PROMPT = 192
#: ... as long as the short prefills between two decode batches stay within this many tokens
#: (as vLLM's token budget per step takes many short prefills at once).
SHORT_BUDGET = 512


@dataclass
class DecodeStep:
    """One request's decode step waiting for a batch: ``x`` (1, 1) token ids or (1, 1, hidden)."""

    request_id: str
    x: np.ndarray
    position: int
    future: asyncio.Future


@dataclass
class PrefillJob:
    """One request's prefill (or prompt continuation) of ``x`` (1, T) or (1, T, hidden) at
    ``position``; ``done`` tokens of it ran, their outputs in ``outputs``."""

    request_id: str
    x: np.ndarray
    position: int
    future: asyncio.Future
    done: int = 0
    outputs: list = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return self.x.shape[1]


class StepScheduler:
    """Runs an engine's decode steps and prefills on its worker (see the module docstring).

    Args:
        run: ``await run(fn, *args)`` runs ``fn(*args)`` on the engine's worker thread.
        decode_batch: ``decode_batch(steps)`` -> per step its output or the exception it raised.
        prefill_piece: ``prefill_piece(job, n)`` runs tokens ``job.done .. job.done + n`` of
            ``job`` and returns their output: logits (vocab,) of the last position on a last
            shard, else hidden states (1, n, hidden).
        max_batch: most decode steps in one batch.
    """

    def __init__(self, run: Callable[..., Awaitable[Any]], decode_batch: Callable[[list[DecodeStep]], list],
                 prefill_piece: Callable[[PrefillJob, int], np.ndarray], max_batch: int):
        self._run, self._decode_batch, self._prefill_piece = run, decode_batch, prefill_piece
        self.max_batch = max_batch
        #: Nodes of the ring this engine's requests run on (set by the node for each step).
        self.pipeline_depth = 1
        self.batch_sizes: list[int] = []  # sizes of the last decode batches (most recent last), for benchmarks
        self.piece_sizes: list[int] = []  # tokens of the last prefill pieces (most recent last), for tests
        self._pending: list[DecodeStep] = []
        self._prefills: list[PrefillJob] = []
        self._decoding: dict[str, float] = {}  # request -> monotonic time of its last decode step
        self._decode_s = 0.0  # worker time of the last decode batch
        self._prefill_rate: float | None = None  # prefill tokens/s, measured
        self._task: asyncio.Task | None = None

    async def decode(self, request_id: str, x: np.ndarray, position: int) -> Any:
        """Queue a decode step; its output once its batch ran. Raises what the step raised."""
        step = DecodeStep(request_id, x, position, asyncio.get_running_loop().create_future())
        self._pending.append(step)
        self._wake()
        return await step.future

    async def prefill(self, request_id: str, x: np.ndarray, position: int) -> Any:
        """Queue a prefill of ``x`` at ``position``; its output (see ``prefill_piece``: the last
        piece's logits, or every piece's hidden states joined). Raises what a piece raised."""
        job = PrefillJob(request_id, x, position, asyncio.get_running_loop().create_future())
        self._prefills.append(job)
        self._wake()
        return await job.future

    def forget(self, request_id: str) -> None:
        """The request is over here: no batch waits for it."""
        self._decoding.pop(request_id, None)

    def queued_request_ids(self) -> set[str]:
        """Requests with a prefill queued or under way."""
        return {j.request_id for j in self._prefills}

    def close(self) -> None:
        """Cancel the loop and fail every queued step."""
        if self._task is not None:
            self._task.cancel()
        for item in [*self._pending, *self._prefills]:
            if not item.future.done():
                item.future.set_exception(RuntimeError("the engine is closed"))
        self._pending.clear()
        self._prefills.clear()

    def _wake(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="engine-steps")

    async def _loop(self) -> None:
        while self._pending or self._prefills:
            if self._pending:
                await self._decode_round()
            for job, n in self._plan_prefills():
                await self._prefill_round(job, n)

    def _decoding_ids(self, now: float) -> set[str]:
        return {rid for rid, t in self._decoding.items() if now - t < DECODING_WINDOW}

    def _group_size(self) -> int:
        """Most steps of the next batch: the decoding requests split into ``pipeline_depth`` groups."""
        decoding = self._decoding_ids(time.monotonic()) | {s.request_id for s in self._pending}
        return max(1, min(self.max_batch, math.ceil(len(decoding) / max(1, self.pipeline_depth))))

    async def _gather(self, limit: int) -> None:
        seen, stable, turns = len(self._pending), 0, 0
        while stable < GATHER_STABLE_TURNS and seen < limit and turns < GATHER_MAX_TURNS:
            await asyncio.sleep(0)  # let the steps of requests woken meanwhile join this batch
            turns += 1
            stable = stable + 1 if len(self._pending) == seen else 0
            seen = len(self._pending)
        deadline = time.monotonic() + GATHER_MAX_WAIT
        while len(self._pending) < limit and time.monotonic() < deadline:
            if not self._decoding_ids(time.monotonic()) - {s.request_id for s in self._pending}:
                return
            await asyncio.sleep(0.0005)

    async def _decode_round(self) -> None:
        limit = self._group_size()
        await self._gather(limit)
        limit = self._group_size()
        batch = [s for s in self._pending[:limit] if not s.future.done()]
        del self._pending[:limit]
        if not batch:
            return
        t0 = time.perf_counter()
        try:
            results = await self._run(self._decode_batch, batch)
        except BaseException as e:
            for s in batch:
                if not s.future.done():
                    s.future.set_exception(e if isinstance(e, Exception) else RuntimeError("the engine stopped"))
            if not isinstance(e, Exception):
                raise
            return
        self._decode_s = time.perf_counter() - t0
        self.batch_sizes = (self.batch_sizes + [len(batch)])[-1000:]
        now = time.monotonic()
        for s, r in zip(batch, results):
            self._decoding[s.request_id] = now
            if s.future.done():
                continue
            if isinstance(r, BaseException):
                s.future.set_exception(r)
            else:
                s.future.set_result(r)

    def _plan_prefills(self) -> list[tuple[PrefillJob, int]]:
        """The prefill work to run before the next decode batch, as (job, tokens) pairs: with no
        request decoding, the first runnable job whole; else the short jobs that fit in
        ``SHORT_BUDGET`` whole and one piece of one long job (see the module docstring). A job
        is runnable when no queued prefill of its request has an earlier position."""
        runnable = [j for j in self._prefills
                    if not any(o.request_id == j.request_id and o.position < j.position for o in self._prefills)]
        if not runnable:
            return []
        if not self._decoding_ids(time.monotonic()):
            job = runnable[0]
            return [(job, job.n_tokens - job.done)]
        plan, budget, long_piece = [], SHORT_BUDGET, False
        for job in runnable:
            remaining = job.n_tokens - job.done
            short = job.n_tokens <= SHORT_PROMPT  # a short prompt, not the tail of a long one
            if short and remaining <= budget:
                plan.append((job, remaining))
                budget -= remaining
            elif not long_piece:
                plan.append((job, self._piece(remaining)))
                long_piece = True
        return plan

    def _piece(self, remaining: int) -> int:
        """Tokens of a long prefill's next piece while requests decode: about as many as run
        in one decode step's time (at least ``MIN_PIECE``)."""
        if self._prefill_rate is None:
            return min(remaining, MIN_PIECE)
        return min(remaining, max(MIN_PIECE, int(self._decode_s * self._prefill_rate)))

    async def _prefill_round(self, job: PrefillJob, n: int) -> None:
        if job.future.done():  # cancelled meanwhile
            if job in self._prefills:
                self._prefills.remove(job)
            return
        t0 = time.perf_counter()
        try:
            out = await self._run(self._prefill_piece, job, n)
        except BaseException as e:
            self._prefills.remove(job)
            if not job.future.done():
                job.future.set_exception(e if isinstance(e, Exception) else RuntimeError("the engine stopped"))
            if not isinstance(e, Exception):
                raise
            return
        rate = n / max(time.perf_counter() - t0, 1e-6)
        self._prefill_rate = rate if self._prefill_rate is None else 0.5 * (self._prefill_rate + rate)
        job.done += n
        job.outputs.append(out)
        self.piece_sizes = (self.piece_sizes + [n])[-1000:]
        if job.done < job.n_tokens and not job.future.done():
            return
        self._prefills.remove(job)
        if not job.future.done():
            outs = job.outputs
            job.future.set_result(outs[-1] if len(outs) == 1 or outs[-1].ndim < 3 else np.concatenate(outs, axis=1))
