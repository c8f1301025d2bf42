"""The ring worker: this node's part in every request whose ring holds it.

A prompt (token ids, on the node holding layer 0) or hidden states (on the others) is
scheduled as one step of the request's epoch; the step runs this node's shard and passes its
output on to the next node, or, on the node holding the last layer, samples the next token,
sends the next decode step to the first node and delivers the result to the origin. Messages
of an ended request or of an older epoch are dropped; a failed step is reported to the origin,
which fails over or ends the request. An embedding request (``GenerationOptions.pooling``) is
one prefill step whose last shard pools the final-normed hidden states and sends that vector to
the origin instead of sampling.

On a ring of several nodes the first node sends a long prompt on in pieces of ``PREFILL_CHUNK``
tokens, so that the next nodes prefill the first pieces while it runs the later ones; the last
node samples once the prefill's last piece is through. For a new prompt the first node looks in
its prompt cache (``exo.inference.prompt_cache``): the prefill then starts after the longest
prefix a finished request left, and every node of the ring continues from its own copy of that
request's keys and values.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Awaitable, Callable, Sequence

import numpy as np

from exo.inference.generation import GenerationOptions
from exo.inference.grammar import GrammarMatcher
from exo.inference.inference_engine import WIRE_TOKEN_DTYPE, InferenceEngine
from exo.inference.pooling import pool
from exo.inference.prompt_cache import PromptCacheMiss
from exo.inference.sampling import Sampler
from exo.orchestration.background import Background
from exo.orchestration.errors import NodeStoppingError
from exo.orchestration.model_service import ModelService
from exo.orchestration.peer_pool import PeerPool
from exo.orchestration.registry import RequestRegistry
from exo.orchestration.request import RequestContext, TokenResult
from exo.orchestration.shards import ShardCache

logger = logging.getLogger(__name__)

#: Tokens of a prompt the first node of a ring of several nodes runs before it sends their hidden
#: states on (a 2,000-token prompt flows down a 2-node ring in 8 pieces: the nodes prefill at the
#: same time but for the first and last piece).
PREFILL_CHUNK = 256


def replayed_sampler(options: GenerationOptions, generated: Sequence[int],
                     matcher_factory: Callable[[], GrammarMatcher] | None = None) -> Sampler:
    """A Sampler in the state one had after sampling the tokens ``generated``: their penalty
    counts, and when it samples (not greedy) its random generator advanced by one uniform draw per token
    (``Sampler`` draws exactly one through ``Generator.choice`` per sampled token), so a seeded
    request continues with the same draws after a re-partition; with ``matcher_factory`` (a
    request with a grammar), a fresh matcher from it that consumed ``generated``.

    Raises:
        ValueError: the grammar cannot be built, or does not allow ``generated``.
    """
    matcher = None
    if matcher_factory is not None:
        matcher = matcher_factory()
        matcher.consume_all(generated)
    sampler = Sampler(options, matcher)
    for t in generated:
        sampler.counts[t] = sampler.counts.get(t, 0) + 1
    if not options.greedy and generated:
        sampler.rng.random(len(generated))
    return sampler


class Worker:
    """The ring worker of node ``node_id``.

    Args:
        registry: each request's epoch, sampler, delivery and steps on this node.
        pool: handles to the next node, the first node and the origin.
        shards: the engines holding this node's shards.
        models: shard loads (``ensure_shard``) and model cards (a model's context length).
        background: runs the steps; its ``stopping`` refuses new ones.
        to_origin: delivers a result when this node is the request's origin.
    """

    def __init__(self, node_id: str, registry: RequestRegistry, pool: PeerPool, shards: ShardCache, models: ModelService,
                 background: Background, to_origin: Callable[[TokenResult], Awaitable[None]]):
        self.id = node_id
        self._registry = registry
        self._pool = pool
        self._shards = shards
        self._models = models
        self._background = background
        self._to_origin = to_origin

    async def send_prompt(self, ctx: RequestContext, token_ids: np.ndarray, position: int,
                          on_error: Callable[[BaseException], None] | None = None) -> None:
        """Send token ids to the first node of ``ctx``'s ring (this node's own shard when it is)."""
        first = ctx.ring[0]
        if first.node_id == self.id:
            await self.process_prompt(ctx, token_ids, position)
        else:
            await self._pool.handle(first).send_prompt(ctx, token_ids, position, on_error=on_error)

    async def process_prompt(self, ctx: RequestContext, token_ids: np.ndarray, position: int) -> None:
        """Schedule token ids (int64, (1, T)) on this node's shard, which must hold layer 0.

        Raises:
            ValueError: this node's shard of ``ctx`` does not start at layer 0, or bad shape.
            KeyError: this node is not in the request's ring, or ``position > 0`` for a request it has
                no KV cache of (an unknown request id).
            NodeStoppingError: this node is shutting down.
        """
        shard = ctx.shard_of(self.id)
        if not shard.is_first_layer:
            raise ValueError(f"node {self.id} holds layers {shard.start_layer}-{shard.end_layer}, not layer 0")
        if token_ids.ndim != 2 or token_ids.shape[0] != 1 or token_ids.shape[1] == 0:
            raise ValueError(f"token ids must have shape (1, T), got {token_ids.shape}")
        if position == 0 and not ctx.prefix_tokens:
            ctx, token_ids, position = self._after_cached_prefix(ctx, token_ids)
        self._schedule(ctx, token_ids, position)

    def _after_cached_prefix(self, ctx: RequestContext, token_ids: np.ndarray) -> tuple[RequestContext, np.ndarray, int]:
        """A new prompt (token ids (1, T) at position 0) as what is left to prefill after the
        longest prefix this node's prompt cache holds: the context naming the entry, the
        remaining ids and their position; unchanged without a match (or on a replay after a
        miss, or for an embedding). At least one token is left to run, for its logits.

        A seeded request that samples (temperature > 0) prefills its whole prompt: keys and
        values taken from the cache equal a fresh prefill's only up to float rounding (the
        cached part may have been decoded token by token), and a seeded sample must not depend
        on what earlier requests left (issue 23). llama-server's ``cache_prompt`` documents the
        same rounding and keeps the cache on; greedy requests here do too."""
        engine = self._shards.get(ctx.model_id)
        seeded = ctx.options.seed is not None and not ctx.options.greedy
        if engine is None or not ctx.prompt_cache or ctx.options.is_embedding or seeded or token_ids.shape[1] < 2:
            return ctx, token_ids, 0
        if engine.shard != ctx.shard_of(self.id):  # about to load other layers, which drops the cache
            return ctx, token_ids, 0
        entry, n = engine.match_prefix(token_ids[0])
        n = min(n, token_ids.shape[1] - 1)
        if entry is None or n < 1:
            return ctx, token_ids, 0
        logger.debug("request %s: %d of %d prompt tokens from the prompt cache (%s)", ctx.request_id, n, token_ids.shape[1], entry)
        return replace(ctx, prefix_entry=entry, prefix_tokens=n), token_ids[:, n:], n

    async def process_tensor(self, ctx: RequestContext, hidden_states: np.ndarray, position: int) -> None:
        """Schedule hidden states (float32, (1, T, hidden)) on this node's shard.

        Raises:
            ValueError: bad shape, or this node's shard holds layer 0 (it takes token ids).
            KeyError: this node is not in the request's ring, or ``position > 0`` for a request it has
                no KV cache of (an unknown request id).
            NodeStoppingError: this node is shutting down.
        """
        shard = ctx.shard_of(self.id)
        if shard.is_first_layer:
            raise ValueError(f"node {self.id} holds layer 0 and takes token ids, not hidden states")
        if hidden_states.ndim != 3 or hidden_states.shape[0] != 1 or hidden_states.shape[1] == 0:
            raise ValueError(f"hidden states must have shape (1, T, hidden), got {hidden_states.shape}")
        self._schedule(ctx, hidden_states, position)

    def _schedule(self, ctx: RequestContext, x: np.ndarray, position: int) -> None:
        rid = ctx.request_id
        if self._background.stopping:  # the sender fails over, as if this node were gone
            raise NodeStoppingError(f"node {self.id} is shutting down")
        if self._registry.is_ended(rid):
            logger.debug("dropping a message of ended request %s", rid)
            return
        latest = self._registry.latest_epoch(rid)
        if latest is not None and ctx.epoch < latest:
            logger.debug("dropping a message of request %s from epoch %d (now %d)", rid, ctx.epoch, latest)
            return
        engine = self._shards.get(ctx.model_id)
        if ctx.prefix_tokens and position == ctx.prefix_tokens and (engine is None or rid not in engine.cached_request_ids()):
            if engine is None:
                raise PromptCacheMiss(f"node {self.id} holds no shard of {ctx.model_id}")
            engine.continue_from_prefix(rid, ctx.prefix_entry, ctx.prefix_tokens)  # the first piece of the prefill
        # a later piece of a prefill may come before the engine queued the first: the request is
        # known here once a message of its epoch was scheduled
        if position > 0 and latest != ctx.epoch and (engine is None or rid not in engine.cached_request_ids()):
            raise KeyError(f"unknown request {rid}: node {self.id} has no KV cache to continue it at position {position}")
        if latest is None or ctx.epoch > latest:
            self._registry.entry(rid).epoch = ctx.epoch
        self._background.spawn(self._run_shard(ctx, x, position), f"shard-{rid}")

    def _is_stale(self, ctx: RequestContext) -> bool:
        """True when a newer epoch of ``ctx``'s request reached this node (a re-partition)."""
        latest = self._registry.latest_epoch(ctx.request_id)
        return latest is not None and latest > ctx.epoch

    async def _run_shard(self, ctx: RequestContext, x: np.ndarray, position: int) -> None:
        rid = ctx.request_id
        self._registry.begin_step(rid)
        self._shards.begin(ctx.model_id)
        try:
            shard = ctx.shard_of(self.id)
            engine = await self._models.ensure_shard(shard)
            engine.pipeline_depth = len(ctx.ring)
            if self._is_stale(ctx):
                return
            embedding = ctx.options.is_embedding and shard.is_last_layer
            if shard.is_first_layer and not shard.is_last_layer and not ctx.options.is_embedding and x.shape[1] > PREFILL_CHUNK:
                await self._prefill_in_chunks(ctx, engine, x, position)
                return
            if embedding:  # final-normed hidden states, not logits
                out = await engine.infer_final_hidden(rid, shard, x, position)
            else:
                out = await engine.infer_tensor(rid, shard, x, position)
            if not await self._still_wanted(ctx, engine):
                return
            next_position = position + x.shape[1]
            if not shard.is_last_layer:
                await self._pass_on(ctx, out, position)
                return
            if next_position < ctx.prefill_end:  # a piece of a prefill flowing down the ring: nothing to sample yet
                return
            if embedding:
                await self._deliver_embedding(ctx, engine, out)
                return
            result, token = await self._sample(ctx, out, position, next_position)
            await self._deliver_and_continue(ctx, result, token, next_position)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._step_failed(ctx, e)
        finally:
            self._registry.end_step(rid)
            self._shards.end(ctx.model_id)

    async def _still_wanted(self, ctx: RequestContext, engine: InferenceEngine) -> bool:
        """After a step: False (and the KV cache freed) when the request ended meanwhile, or
        False when a newer epoch of it reached this node."""
        if self._registry.is_ended(ctx.request_id):
            await engine.clear_request(ctx.request_id)
            return False
        return not self._is_stale(ctx)

    async def _prefill_in_chunks(self, ctx: RequestContext, engine: InferenceEngine, token_ids: np.ndarray, position: int) -> None:
        """The first node's prefill of token ids (1, T) at ``position`` in pieces of
        ``PREFILL_CHUNK`` tokens, each sent on to the next node as soon as it ran."""
        shard = ctx.shard_of(self.id)
        for start in range(0, token_ids.shape[1], PREFILL_CHUNK):
            out = await engine.infer_tensor(ctx.request_id, shard, token_ids[:, start:start + PREFILL_CHUNK], position + start)
            if not await self._still_wanted(ctx, engine):
                return
            await self._pass_on(ctx, out, position + start)

    async def _pass_on(self, ctx: RequestContext, hidden_states: np.ndarray, position: int) -> None:
        """Send this shard's output to the next node of the ring. Raises as ``send_tensor``."""
        peer = self._pool.handle(ctx.next_partition(self.id))
        await peer.send_tensor(ctx, hidden_states, position, on_error=self._step_error_handler(ctx))

    def _step_error_handler(self, ctx: RequestContext) -> Callable[[BaseException], None]:
        """``on_error`` of a step sent on without waiting for the peer (see PeerHandle): its
        failure is handled as if the send had raised it."""
        return lambda e: self._background.spawn(self._step_failed(ctx, e), f"step-failed-{ctx.request_id}")

    async def _step_failed(self, ctx: RequestContext, e: BaseException) -> None:
        """A step of ``ctx``'s request failed on this node, or the next node refused it: report
        the error to the origin (which fails over or ends the request), unless the request ended
        or moved to a newer epoch meanwhile."""
        rid = ctx.request_id
        if self._is_stale(ctx) or self._registry.is_ended(rid):
            logger.debug("request %s: a message of an old epoch failed on node %s: %s", rid, self.id, e)
            return
        if isinstance(e, ConnectionError):  # the next node is gone: the origin fails over
            logger.warning("request %s on node %s: %s", rid, self.id, e)
        else:
            logger.error("request %s failed on node %s", rid, self.id, exc_info=e)
        previous = self._registry.delivery(rid)
        if previous is not None:  # after the tokens this node already sent (see _deliver_and_continue)
            await asyncio.wait([previous])
        await self._report(ctx, TokenResult(rid, finish_reason="error", error=f"node {self.id}: {type(e).__name__}: {e}",
                                            epoch=ctx.epoch))

    async def _deliver_embedding(self, ctx: RequestContext, engine: InferenceEngine, hidden_states: np.ndarray) -> None:
        """The last shard's only step of an embedding request: pool ``hidden_states`` ((1, T,
        hidden) float32, final-normed) as the request says, free this node's KV cache of it at
        once (nothing continues it; the origin's end frees the other nodes'), and send the
        vector to the origin as the request's one and final result. Nothing is sampled."""
        vector = pool(hidden_states, ctx.options.pooling)
        await engine.clear_request(ctx.request_id)
        await self._report(ctx, TokenResult(ctx.request_id, finish_reason="stop", epoch=ctx.epoch, embedding=vector))

    async def _fresh_sampler(self, ctx: RequestContext) -> Sampler:
        """The sampler of a prefill (the request's first, or a replay's): for a request with a
        grammar, its matcher (and llguidance's view of the model's tokenizer, the first time)
        is built in a thread, since that takes from milliseconds to a second.

        Raises:
            ValueError: the grammar cannot be used with the model's tokenizer.
            ModelNotFoundError, InvalidModelError, ModelUnavailableError: as ``get_tokenizer``.
        """
        grammar = ctx.options.grammar
        if grammar is None:
            return replayed_sampler(ctx.options, ctx.generated_tokens)
        tokenizer = await self._models.get_tokenizer(ctx.model_id)
        return await asyncio.to_thread(replayed_sampler, ctx.options, ctx.generated_tokens,
                                       lambda: GrammarMatcher(grammar, tokenizer))

    async def _sample(self, ctx: RequestContext, logits: np.ndarray, position: int, next_position: int) -> tuple[TokenResult, int]:
        """The last shard's step: sample the next token from ``logits`` ((vocab,) float32) with the
        request's sampler. Returns the result for the origin (the token, or a finish) and the token.

        Raises:
            ValueError: the request's grammar cannot be used, or allows no token (see ``Sampler``).
        """
        rid = ctx.request_id
        entry = self._registry.entry(rid)
        prefill = entry.sampler is None or position == 0 or entry.sampler[0] != ctx.epoch
        if prefill:  # the request's first, or the replay of a re-partition
            sampler = await self._fresh_sampler(ctx)
            entry = self._registry.entry(rid)
            entry.sampler = (ctx.epoch, sampler)
        sampler = entry.sampler[1]
        s = sampler.sample(logits)
        n_generated = next_position - ctx.prompt_len + 1
        card = self._models.known_card(ctx.model_id)
        context = card.context_length if card is not None else None  # the origin bounds max_tokens by it too
        # a grammar's EOS ends the request even when the request names no stop tokens
        grammar_ended = sampler.matcher is not None and s.token in sampler.matcher.eos_token_ids
        if s.token in ctx.options.stop_token_ids or grammar_ended:
            result = TokenResult(rid, finish_reason="stop", epoch=ctx.epoch)
        else:
            finish = "length" if n_generated >= ctx.options.max_tokens or (context and next_position + 1 >= context) else None
            result = TokenResult(rid, [s.token], finish_reason=finish, epoch=ctx.epoch)
            if s.logprob is not None:
                result.logprobs = [s.logprob]
                result.top_logprobs = [s.top_logprobs]
        if prefill:
            result.cached_tokens = ctx.prefix_tokens
        if result.is_finished:
            entry.sampler = None
        return result, s.token

    def _next_step(self, ctx: RequestContext, token: int) -> tuple[RequestContext, np.ndarray, bool]:
        """The decode step after sampling ``token`` (on the last shard): its context (only a
        replay's first step carries the generated tokens), its token ids ((1, 1), the wire's
        dtype), and whether this step's result rides with it: the first node is the origin (and
        not this node), and no earlier delivery of the request is under way (so tokens stay in
        order)."""
        prefill_only = ctx.generated_tokens or ctx.prefix_tokens
        next_ctx = replace(ctx, generated_tokens=(), prefix_entry="", prefix_tokens=0) if prefill_only else ctx
        previous = self._registry.delivery(ctx.request_id)
        rides = ctx.ring[0].node_id == ctx.origin_node_id != self.id and (previous is None or previous.done())
        return next_ctx, np.asarray([[token]], dtype=WIRE_TOKEN_DTYPE), rides

    async def _deliver_and_continue(self, ctx: RequestContext, result: TokenResult, token: int, next_position: int) -> None:
        """After sampling: send the next step to the first node (unless the request finished)
        and deliver ``result`` to the origin."""
        rid = ctx.request_id
        next_ctx, token_ids, rides = self._next_step(ctx, token)
        # The next step starts before this result is delivered and may report its own first: each
        # delivery of a request waits for the one before, so the origin gets tokens in order.
        previous = self._registry.delivery(rid)
        delivered = self._registry.entry(rid).delivery = asyncio.get_running_loop().create_future()
        try:
            if not result.is_finished:
                if rides:
                    # the origin holds layer 0: the result rides with the next step, one message a token
                    await self._pool.handle(ctx.ring[0]).send_prompt(next_ctx, token_ids, next_position,
                                                                     on_error=self._step_error_handler(ctx), result=result)
                    return
                await self.send_prompt(next_ctx, token_ids, next_position, on_error=self._step_error_handler(ctx))
            if previous is not None:
                await asyncio.wait([previous])
            await self._report(ctx, result)
        finally:
            delivered.set_result(None)
            entry = self._registry.get(rid)
            if entry is not None and entry.delivery is delivered:
                entry.delivery = None

    async def _report(self, ctx: RequestContext, result: TokenResult) -> None:
        try:
            if ctx.origin_node_id == self.id:
                await self._to_origin(result)
            else:
                origin = self._pool.origin_handle(ctx)
                await origin.send_result(result, on_error=lambda e: self._undelivered(ctx, e))
        except Exception as e:
            self._undelivered(ctx, e)

    def _undelivered(self, ctx: RequestContext, e: BaseException) -> None:
        logger.error("could not deliver a result of request %s to %s", ctx.request_id, ctx.origin_node_id, exc_info=e)

    async def end_request(self, request_id: str, keep_tokens: Sequence[int] = ()) -> None:
        """Stop ``request_id`` on this node and free its sampler and KV cache, or with
        ``keep_tokens`` (the tokens its KV cache holds: prompt, then generated) keep that cache
        in the prompt cache."""
        self._registry.end(request_id)
        await self._shards.clear_request(request_id, keep_tokens)
