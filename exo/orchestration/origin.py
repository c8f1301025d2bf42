"""The origin side of a request: the node whose API received it fixes its ring, sends the
prompt, streams the results to the client, fails over when a member of the ring is lost
(re-partition and replay), and tells every node of the ring when the request is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, AsyncIterator

import numpy as np

from exo.inference.generation import GenerationOptions
from exo.inference.inference_engine import WIRE_TOKEN_DTYPE
from exo.inference.pooling import l2_normalize
from exo.inference.prompt_cache import MISS
from exo.models.sources import ModelCard
from exo.orchestration.errors import GenerationError, GenerationTimeoutError, NoNodeAvailableError
from exo.orchestration.membership import Membership
from exo.orchestration.model_service import ModelService
from exo.orchestration.peer_pool import PeerPool
from exo.orchestration.registry import RequestRegistry
from exo.orchestration.request import RequestContext, TokenResult
from exo.topology.partitioning import Partition

if TYPE_CHECKING:
    from exo.orchestration.worker import Worker

logger = logging.getLogger(__name__)

#: Seconds without a token after which the origin checks that every ring member still answers.
STALL_PROBE_INTERVAL = 3.0
#: Most re-partitions of one request before it fails.
MAX_FAILOVERS = 4


@dataclass
class OriginRequest:
    """The origin's state of one request: its current context (ring and epoch), the tokens so
    far, and what failover learnt."""

    ctx: RequestContext
    queue: asyncio.Queue
    prompt_ids: list[int]
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    excluded: set[str] = field(default_factory=set)  # nodes left out after they stopped answering
    failovers: int = 0
    retried_live_ring: bool = False  # one replay on a ring whose members all answered was done
    members: dict[str, Partition] = field(default_factory=dict)  # every node of every epoch's ring


@dataclass(frozen=True)
class _RingChanged:
    """Queued to an origin request when discovery removed members of its ring."""

    epoch: int
    gone: frozenset[str]


class Origin:
    """The requests node ``node_id`` is the origin of.

    Args:
        registry: where each request's origin state lives while it is in flight.
        pool: handles to the ring's members.
        membership: the ring of a request (``partition``).
        models: model cards (and the models requests named).
        worker: this node's ring worker, for the steps and ends of requests whose ring holds it.
        response_timeout: seconds without a token before a request fails.
    """

    def __init__(self, node_id: str, registry: RequestRegistry, pool: PeerPool, membership: Membership,
                 models: ModelService, worker: Worker, response_timeout: float):
        self.id = node_id
        self._registry = registry
        self._pool = pool
        self._membership = membership
        self._models = models
        self._worker = worker
        self.response_timeout = response_timeout

    async def generate(
        self, model_id: str, prompt_token_ids: list[int], options: GenerationOptions, request_id: str | None = None
    ) -> AsyncIterator[TokenResult]:
        """Generate from ``prompt_token_ids`` on the ring, yielding TokenResults as tokens arrive.

        Tokens never include the EOS token: EOS ends with finish_reason "stop" and no token. The
        last result has finish_reason "stop" or "length". Closing the iterator early cancels the
        request on every node of the ring.

        Failover: when a member of the ring leaves (discovery removed it, a send to it failed and
        it no longer answers a health check, or no token came for ``STALL_PROBE_INTERVAL``
        seconds and it does not answer), the request is re-partitioned over the nodes that
        remain: a new RequestContext with ``epoch + 1`` (same request id and prompt length) whose
        first message replays the prompt and every token generated so far as one prefill at
        position 0, rebuilding each node's KV cache; the last shard then samples the next token
        after the replayed sequence, with its sampler rebuilt from the replayed tokens. Results
        and messages of older epochs are dropped. The caller sees one uninterrupted stream; at
        temperature 0 the tokens are those of a run without the failure (up to float rounding
        between one batched prefill and step-by-step decoding). At most ``MAX_FAILOVERS``
        re-partitions per request.

        Raises:
            ModelNotFoundError: unknown model.
            NoNodeAvailableError: no ring can serve the model.
            GenerationError: a node of the ring failed.
            GenerationTimeoutError: no token came within ``response_timeout`` seconds.
            ValueError: empty prompt.
        """
        card = await self._models.model_card(model_id)
        model_id = card.model_id
        self._models.requested_models.add(model_id)
        if not prompt_token_ids:
            raise ValueError("the prompt has no tokens")
        request_id = request_id or str(uuid.uuid4())
        ring = self._membership.partition(card)
        ctx = RequestContext(request_id, self.id, model_id, card.n_layers, tuple(ring), options, prompt_len=len(prompt_token_ids))
        req = OriginRequest(ctx, asyncio.Queue(), list(prompt_token_ids), members={p.node_id: p for p in ring})
        self._registry.add_origin(request_id, req)
        loop = asyncio.get_running_loop()
        try:
            await self._send_first_prompt(req, card)
            last_progress = loop.time()
            while True:
                try:  # not wait_for: on Python 3.11 it may swallow the caller's cancellation
                    async with asyncio.timeout(min(STALL_PROBE_INTERVAL, self.response_timeout)):
                        item = await req.queue.get()
                except asyncio.TimeoutError:
                    dead = await self._unreachable_members(req.ctx)
                    if dead:
                        await self._failover(req, card, dead, f"no token for {loop.time() - last_progress:.1f} s and "
                                                              f"{sorted(dead)} do not answer")
                        last_progress = loop.time()
                    elif loop.time() - last_progress >= self.response_timeout:
                        raise GenerationTimeoutError(f"no token within {self.response_timeout:.0f} s from the ring") from None
                    continue
                if isinstance(item, _RingChanged):
                    if item.epoch == req.ctx.epoch:
                        await self._failover(req, card, set(item.gone), f"{sorted(item.gone)} left the cluster")
                        last_progress = loop.time()
                    continue
                result: TokenResult = item
                if result.epoch != req.ctx.epoch:
                    logger.debug("request %s: dropping a result of epoch %d (now %d)", request_id, result.epoch, req.ctx.epoch)
                    continue
                if result.error is not None:
                    await self._recover(req, card, result.error)
                    last_progress = loop.time()
                    continue
                last_progress = loop.time()
                req.generated.extend(result.tokens)
                if result.is_finished:
                    req.finished = True
                yield result
                if result.is_finished:
                    return
        finally:
            self._registry.finish_origin(request_id)
            await self._end_everywhere(req)

    async def embed(self, model_id: str, token_ids: list[int], pooling: str | None = None, normalize: bool = True,
                    request_id: str | None = None) -> np.ndarray:
        """The embedding of ``token_ids``: the prompt's prefill runs through the ring as a
        generation's does, and the node holding the last layer pools the final-normed hidden
        states (``exo.inference.pooling.pool``) and returns that vector instead of sampling;
        the request ends after that one step, and every node of the ring frees its KV cache.
        Failover (a ring member lost, a failed step) is a generation's (see ``generate``): the
        prefill is replayed on the re-partitioned ring.

        Args:
            pooling: "mean", "last" or "cls"; None: the model's own (``ModelCard.pooling``).
            normalize: L2-normalize the vector (``exo.inference.pooling.l2_normalize``).

        Returns:
            float32 ``(hidden_size,)``.

        Raises:
            as ``generate``; ValueError also for an unknown pooling; GenerationError when the
            ring answers without an embedding (a node that does not compute embeddings).
        """
        if pooling is None:
            pooling = (await self._models.model_card(model_id)).pooling
        options = GenerationOptions(max_tokens=1, pooling=pooling)
        async with contextlib.aclosing(self.generate(model_id, token_ids, options, request_id)) as results:
            async for result in results:
                if result.embedding is None:
                    raise GenerationError(f"the ring answered an embedding request of {model_id} without an embedding")
                return l2_normalize(result.embedding) if normalize else result.embedding
        raise GenerationError(f"the ring ended an embedding request of {model_id} without a result")

    async def _send_first_prompt(self, req: OriginRequest, card: ModelCard) -> None:
        """Send the prompt to the first node of the ring; fail over if that node is gone."""
        first = req.ctx.ring[0]
        try:
            await self._worker.send_prompt(req.ctx, np.asarray([req.prompt_ids], dtype=WIRE_TOKEN_DTYPE), 0)
        except Exception as e:
            if first.node_id == self.id:
                raise
            if await self._pool.handle(first).health_check():
                raise GenerationError(f"node {first.node_id}: {e}") from e
            await self._failover(req, card, {first.node_id}, f"{first.node_id} is unreachable ({e})")

    async def _unreachable_members(self, ctx: RequestContext) -> set[str]:
        """Members of ``ctx``'s ring (other than this node) that fail a health check now."""
        others = [p for p in ctx.ring if p.node_id != self.id]
        if not others:
            return set()
        answers = await asyncio.gather(*(self._pool.handle(p).health_check() for p in others))
        return {p.node_id for p, ok in zip(others, answers) if not ok}

    async def _recover(self, req: OriginRequest, card: ModelCard, error: str) -> None:
        """A node of the ring reported ``error``: fail over when members stopped answering, or
        replay once when the cluster changed since the ring was fixed (a node joined, a shard
        was swapped under the request); otherwise the error is the request's.

        Raises:
            GenerationError: the error stands.
        """
        if MISS in error and req.ctx.prompt_cache:
            await self._replay_without_prompt_cache(req, error)
            return
        dead = await self._unreachable_members(req.ctx)
        if not dead:
            try:
                unchanged = tuple(self._membership.partition(card, req.excluded)) == req.ctx.ring
            except NoNodeAvailableError:
                unchanged = True
            if unchanged or req.retried_live_ring:
                raise GenerationError(error)
            req.retried_live_ring = True
        await self._failover(req, card, dead, error)

    @staticmethod
    def _next_epoch(req: OriginRequest, **changes) -> np.ndarray:
        """Move ``req`` to its next epoch for a replay (its context with ``changes``, and the
        tokens generated so far); returns the replay prefill's token ids, (1, prompt +
        generated) in the wire's dtype."""
        req.ctx = replace(req.ctx, epoch=req.ctx.epoch + 1, generated_tokens=tuple(req.generated), **changes)
        return np.asarray([req.prompt_ids + req.generated], dtype=WIRE_TOKEN_DTYPE)

    async def _replay_without_prompt_cache(self, req: OriginRequest, error: str) -> None:
        """A node of the ring lacked the prompt cache entry the first node chose (evicted,
        dropped with a shard change, or a node that joined since): replay the prefill on the
        same ring, without the prompt cache (the next epoch).

        Raises:
            GenerationError: the replay could not be sent.
        """
        logger.info("request %s: %s; prefilling it without the prompt cache", req.ctx.request_id, error)
        tokens = self._next_epoch(req, prompt_cache=False)
        try:
            await self._worker.send_prompt(req.ctx, tokens, 0)
        except Exception as e:
            raise GenerationError(f"request {req.ctx.request_id}: the replay without the prompt cache failed: {e}") from e

    async def _failover(self, req: OriginRequest, card: ModelCard, gone: set[str], reason: str) -> None:
        """Re-partition ``req`` over the live nodes (without ``gone`` and every node excluded
        before) and replay its prompt and generated tokens as one prefill (see ``generate``).

        Raises:
            GenerationError: more than ``MAX_FAILOVERS`` re-partitions, no node left that can
                hold a layer, or the replay could not be sent to a first node that still answers.
        """
        rid = req.ctx.request_id
        req.excluded |= set(gone) - {self.id}
        while True:
            req.failovers += 1
            if req.failovers > MAX_FAILOVERS:
                raise GenerationError(f"request {rid}: gave up after {MAX_FAILOVERS} re-partitions; last cause: {reason}")
            try:
                ring = self._membership.partition(card, req.excluded)
            except NoNodeAvailableError as e:
                raise GenerationError(f"request {rid}: no ring of live nodes after {reason}: {e}") from None
            tokens = self._next_epoch(req, ring=tuple(ring))
            req.members.update({p.node_id: p for p in ring})
            logger.warning("request %s: %s; re-partitioned (epoch %d) over %s, replaying %d prompt + %d generated tokens",
                           rid, reason, req.ctx.epoch, [(p.node_id, p.start_layer, p.end_layer) for p in ring],
                           len(req.prompt_ids), len(req.generated))
            try:
                await self._worker.send_prompt(req.ctx, tokens, 0)
                return
            except Exception as e:
                first = ring[0]
                if first.node_id == self.id or await self._pool.handle(first).health_check():
                    raise GenerationError(f"request {rid}: replay on node {first.node_id} failed: {e}") from e
                req.excluded.add(first.node_id)
                reason = f"{first.node_id} is unreachable ({e})"

    async def _end_everywhere(self, req: OriginRequest) -> None:
        """Tell every node of every ring the request used (but those that stopped answering)
        that it is over: they keep its KV cache in their prompt cache (with the tokens it holds),
        or free it (an embedding's)."""
        rid = req.ctx.request_id
        # what every node's KV cache of the request holds, for its prompt cache (not an embedding's)
        keep = () if req.ctx.options.is_embedding else tuple(req.prompt_ids + req.generated)

        async def end(p: Partition) -> None:
            try:
                if p.node_id == self.id:
                    await self._worker.end_request(rid, keep)
                else:
                    await self._pool.handle(p).end_request(rid, keep)
            except Exception as e:
                logger.warning("could not end request %s on %s: %s", rid, p.node_id, e)

        targets = [p for nid, p in req.members.items() if nid not in req.excluded]
        await asyncio.shield(asyncio.gather(*(end(p) for p in targets)))

    def notify_ring_loss(self, gone: set[str]) -> None:
        """Tell this node's requests in flight whose ring has a member in ``gone``."""
        for req in self._registry.origins():
            lost = {p.node_id for p in req.ctx.ring if p.node_id in gone and p.node_id != self.id}
            if lost and not req.finished:
                req.queue.put_nowait(_RingChanged(req.ctx.epoch, frozenset(lost)))

    def fail_all(self, error: str) -> None:
        """End every request in flight with ``error`` (the node is stopping)."""
        for req in self._registry.origins():
            req.queue.put_nowait(TokenResult(req.ctx.request_id, finish_reason="error", error=error, epoch=req.ctx.epoch))

    def _deliver(self, result: TokenResult) -> None:
        """Deliver ``result`` to its local request; dropped when the request is over here."""
        req = self._registry.origin(result.request_id)
        if req is None:
            logger.debug("result for finished request %s", result.request_id)
            return
        req.queue.put_nowait(result)

    async def process_result(self, result: TokenResult) -> None:
        """Deliver a result to the local request it belongs to; results of requests that ended
        here are dropped.

        Raises:
            KeyError: this node never had a request of that id (the gRPC caller gets NOT_FOUND).
        """
        if self._registry.origin(result.request_id) is None and not self._registry.is_ended(result.request_id):
            raise KeyError(f"unknown request {result.request_id}")
        self._deliver(result)
