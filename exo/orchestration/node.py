"""The Node: one member of the ring and the request lifecycle around it.

Data flow of one request (see DESIGN.md): the node whose API received it (the *origin*) fixes
the ring for the request (``RequestContext``) and sends the prompt's token ids to the node
holding layer 0. Each node runs its shard and sends hidden states to the next node; the node
holding the last layer samples a token, sends it to the origin (``SendResult``) and, unless the
request is finished, back to the first node as the next decode step. When the request ends
(EOS, max_tokens, a stop string, client disconnect or an error) the origin tells every node of
the ring, which frees that request's KV cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import numpy as np

from exo.inference.generation import GenerationOptions
from exo.inference.inference_engine import WIRE_TOKEN_DTYPE, InferenceEngine
from exo.inference.sampling import Sampler
from exo.inference.shard import Shard
from exo.inference.tokenizers import Tokenizer, load_tokenizer
from exo.models.registry import ModelCard, MODELS, get_model_card
from exo.networking.discovery import Discovery
from exo.networking.peer_handle import PeerHandle
from exo.orchestration.errors import GenerationError, GenerationTimeoutError, ModelNotFoundError, NoNodeAvailableError
from exo.orchestration.request import RequestContext, TokenResult
from exo.topology.device_capabilities import DeviceCapabilities
from exo.topology.partitioning import Partition, PartitioningStrategy, RingMemoryWeightedPartitioningStrategy
from exo.topology.topology import NodeInfo, Topology

logger = logging.getLogger(__name__)

PeerHandleFactory = Callable[[str, str, DeviceCapabilities], PeerHandle]


@dataclass
class _OriginRequest:
    ctx: RequestContext
    queue: asyncio.Queue
    prompt_ids: list[int]
    generated: list[int] = field(default_factory=list)
    finished: bool = False


class Node:
    """A node of the cluster.

    Args:
        node_id: unique id of this node.
        engine: the inference engine running this node's shard.
        device_capabilities: this node's device (memory decides its share of layers).
        create_peer_handle: builds a PeerHandle for (node_id, "host:port", capabilities); used for
            ring members that discovery has not reported (yet).
        partitioning_strategy: default ring memory-weighted.
        default_model: model loaded ahead of the first request when the ring changes.
        response_timeout: seconds the origin waits for the next token before failing the request.
        topology_interval: seconds between topology refreshes.
    """

    def __init__(
        self,
        node_id: str,
        engine: InferenceEngine,
        device_capabilities: DeviceCapabilities,
        create_peer_handle: PeerHandleFactory,
        partitioning_strategy: PartitioningStrategy | None = None,
        default_model: str | None = None,
        response_timeout: float = 60.0,
        topology_interval: float = 2.0,
    ):
        self.id = node_id
        self.engine = engine
        self.device_capabilities = device_capabilities
        self.create_peer_handle = create_peer_handle
        self.partitioning_strategy = partitioning_strategy or RingMemoryWeightedPartitioningStrategy()
        self.default_model = default_model
        self.response_timeout = response_timeout
        self.topology_interval = topology_interval
        self.address = ""  # "host:port" of this node's gRPC server, set once it listens
        self.discovery: Discovery | None = None
        self.peers: dict[str, PeerHandle] = {}
        self.topology = Topology()
        self._extra_handles: dict[str, PeerHandle] = {}
        self._origin_requests: dict[str, _OriginRequest] = {}
        self._samplers: dict[str, Sampler] = {}
        self._ended: OrderedDict[str, float] = OrderedDict()  # request ids ended recently
        self._tasks: set[asyncio.Task] = set()
        self._topology_lock = asyncio.Lock()
        self._stopping = False
        self._topology_task: asyncio.Task | None = None
        self.active_request_ids: set[str] = set()  # requests this node is computing right now
        self._loading: dict[str, int] = {}  # model id -> shard loads in progress

    # ---------------------------------------------------------------- lifecycle

    async def start(self, address: str, discovery: Discovery | None) -> None:
        """Start with this node's gRPC ``address`` ("host:port") and ``discovery`` (None: alone)."""
        self.address = address
        self.discovery = discovery
        self.topology.add_node(self.node_info())
        if discovery is not None:
            if hasattr(discovery, "add_peer_listener"):
                discovery.add_peer_listener(self._on_peers_changed)
            await discovery.start()
        await self.update_topology()
        if discovery is None and self.default_model:  # alone for good: no ring change will preload
            self._spawn(self._preload(self.default_model), "preload")
        self._topology_task = asyncio.create_task(self._topology_loop(), name=f"topology-{self.id}")

    async def stop(self) -> None:
        """Stop discovery and background tasks, end requests in flight."""
        self._stopping = True
        for req in list(self._origin_requests.values()):
            req.queue.put_nowait(TokenResult(req.ctx.request_id, finish_reason="error", error=f"node {self.id} is shutting down"))
        tasks = [t for t in [self._topology_task, *self._tasks] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.discovery is not None:
            await self.discovery.stop()
        for h in self._extra_handles.values():
            await h.disconnect()
        await self.engine.close()

    def is_healthy(self) -> bool:
        return not self._stopping

    def node_info(self) -> NodeInfo:
        return NodeInfo(self.id, self.address, self.device_capabilities)

    # ---------------------------------------------------------------- topology

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("task %s failed", task.get_name(), exc_info=task.exception())

    def _on_peers_changed(self) -> None:
        if not self._stopping:
            self._spawn(self.update_topology(), "topology-update")

    async def _topology_loop(self) -> None:
        while True:
            await asyncio.sleep(self.topology_interval)
            try:
                await self.update_topology()
            except Exception:
                logger.exception("topology refresh failed")

    async def update_topology(self) -> Topology:
        """Rebuild the topology from the live peers and what they see, and preload this node's
        shard of the default model when the ring changed."""
        async with self._topology_lock:
            peers = await self.discovery.discover_peers(0) if self.discovery is not None else []
            self.peers = {p.id(): p for p in peers}
            topo = Topology()
            topo.add_node(self.node_info())
            for p in peers:
                topo.add_node(NodeInfo(p.id(), p.address(), p.device_capabilities()))
                topo.add_edge(self.id, p.id())
            visited = {self.id, *self.peers}
            results = await asyncio.gather(*(p.collect_topology(set(visited), 4) for p in peers), return_exceptions=True)
            for p, r in zip(peers, results):
                if isinstance(r, Topology):
                    for nid, info in r.nodes.items():
                        if nid not in topo.nodes:
                            topo.add_node(info)
                    topo.edges |= r.edges
                else:
                    logger.debug("collect_topology from %s failed: %s", p.id(), r)
            changed = set(topo.nodes) != set(self.topology.nodes)
            self.topology = topo
        if changed:
            logger.info("node %s: topology now has %d nodes: %s", self.id, len(topo.nodes), sorted(topo.nodes))
            if self.default_model:
                self._spawn(self._preload(self.default_model), "preload")
        return topo

    async def _preload(self, model_id: str) -> None:
        card = get_model_card(model_id)
        if not card.is_available():
            return
        try:
            ring = self.partition(card)
            for p in ring:
                if p.node_id == self.id:
                    await self._ensure_shard(Shard(model_id, p.start_layer, p.end_layer, card.n_layers))
        except Exception:
            logger.exception("preloading %s failed", model_id)

    async def collect_topology(self, visited: set[str], max_depth: int) -> Topology:
        """This node, its live peers, and what its last refresh learned from them.

        ``visited`` and ``max_depth`` bound the walk for callers that recurse; this node answers
        from its own view without calling further, so a call never fans out or loops.
        """
        topo = Topology()
        for nid, info in self.topology.nodes.items():
            if nid not in visited or nid == self.id:
                topo.add_node(info)
        topo.add_node(self.node_info())
        for pid, p in self.peers.items():
            topo.add_node(NodeInfo(pid, p.address(), p.device_capabilities()))
            topo.add_edge(self.id, pid)
        topo.edges |= self.topology.edges
        return topo

    def partition(self, card: ModelCard) -> list[Partition]:
        """The ring for ``card`` over the current topology.

        Raises:
            NoNodeAvailableError: no node can hold a layer.
        """
        try:
            return self.partitioning_strategy.partition(self.topology, card.n_layers)
        except ValueError as e:
            raise NoNodeAvailableError(str(e)) from e

    def topology_dict(self) -> dict:
        """JSON-able topology with the current ring of the default model and active requests."""
        d = self.topology.to_dict()
        d["node_id"] = self.id
        model_id = self.default_model
        if model_id:
            try:
                card = get_model_card(model_id)
                d["partitions"] = {model_id: [p.to_dict() for p in self.partition(card)]}
            except Exception:
                d["partitions"] = {}
        d["active_node_ids"] = sorted(self._active_nodes())
        return d

    def _active_nodes(self) -> set[str]:
        return {self.id} if self.active_request_ids else set()

    # ---------------------------------------------------------------- API-facing

    def available_models(self) -> list[ModelCard]:
        """Models whose weights this node has (the cluster serves what its nodes can load)."""
        return [c for c in MODELS.values() if c.is_available()]

    def model_state(self, model_id: str) -> str:
        """This node's readiness for ``model_id``: "loading" while it loads a shard of it, "ready"
        when it holds its shard of the current ring, else "available" (loaded on first use)."""
        if self._loading.get(model_id):
            return "loading"
        shard = self.engine.shard
        if shard is None or shard.model_id != model_id:
            return "available"
        try:
            ring = self.partition(get_model_card(model_id))
        except (KeyError, NoNodeAvailableError):
            return "available"
        mine = [(p.start_layer, p.end_layer) for p in ring if p.node_id == self.id]
        return "ready" if mine == [(shard.start_layer, shard.end_layer)] else "available"

    async def _ensure_shard(self, shard: Shard) -> None:
        """Have the engine hold ``shard``, counting the load for ``model_state``."""
        if self.engine.shard == shard:
            return
        self._loading[shard.model_id] = self._loading.get(shard.model_id, 0) + 1
        try:
            await self.engine.ensure_shard(shard)
        finally:
            self._loading[shard.model_id] -= 1

    async def get_tokenizer(self, model_id: str) -> Tokenizer:
        """The tokenizer of ``model_id``. Raises ModelNotFoundError; FileNotFoundError (no weights)."""
        try:
            get_model_card(model_id)
        except KeyError as e:
            raise ModelNotFoundError(str(e.args[0])) from None
        return await asyncio.to_thread(load_tokenizer, model_id)

    async def generate(
        self, model_id: str, prompt_token_ids: list[int], options: GenerationOptions, request_id: str | None = None
    ) -> AsyncIterator[TokenResult]:
        """Generate from ``prompt_token_ids`` on the ring, yielding TokenResults as tokens arrive.

        Tokens never include the EOS token: EOS ends with finish_reason "stop" and no token. The
        last result has finish_reason "stop" or "length". Closing the iterator early cancels the
        request on every node of the ring.

        Raises:
            ModelNotFoundError: unknown model.
            NoNodeAvailableError: no ring can serve the model.
            GenerationError: a node of the ring failed.
            GenerationTimeoutError: no token came within ``response_timeout`` seconds.
            ValueError: empty prompt.
        """
        try:
            card = get_model_card(model_id)
        except KeyError as e:
            raise ModelNotFoundError(str(e.args[0])) from None
        if not prompt_token_ids:
            raise ValueError("the prompt has no tokens")
        if not card.is_available():
            raise NoNodeAvailableError(f"the weights of {model_id} are not installed on node {self.id}")
        request_id = request_id or str(uuid.uuid4())
        ring = self.partition(card)
        ctx = RequestContext(request_id, self.id, model_id, card.n_layers, tuple(ring), options, prompt_len=len(prompt_token_ids))
        req = _OriginRequest(ctx, asyncio.Queue(), list(prompt_token_ids))
        self._origin_requests[request_id] = req
        try:
            await self._send_prompt(ctx, np.asarray([prompt_token_ids], dtype=WIRE_TOKEN_DTYPE), 0)
            while True:
                try:
                    result: TokenResult = await asyncio.wait_for(req.queue.get(), self.response_timeout)
                except asyncio.TimeoutError:
                    raise GenerationTimeoutError(f"no token within {self.response_timeout:.0f} s from the ring") from None
                if result.error is not None:
                    raise GenerationError(result.error)
                req.generated.extend(result.tokens)
                if result.is_finished:
                    req.finished = True
                yield result
                if result.is_finished:
                    return
        finally:
            self._origin_requests.pop(request_id, None)
            await self._end_everywhere(ctx)

    async def _end_everywhere(self, ctx: RequestContext) -> None:
        """Tell every node of the ring that the request is over (they free its KV cache)."""

        async def end(p: Partition) -> None:
            try:
                if p.node_id == self.id:
                    await self.end_request(ctx.request_id)
                else:
                    await self._peer(p).end_request(ctx.request_id)
            except Exception as e:
                logger.warning("could not end request %s on %s: %s", ctx.request_id, p.node_id, e)

        await asyncio.shield(asyncio.gather(*(end(p) for p in ctx.ring)))

    # ---------------------------------------------------------------- ring-facing

    def _peer(self, p: Partition) -> PeerHandle:
        if p.node_id in self.peers:
            return self.peers[p.node_id]
        h = self._extra_handles.get(p.node_id)
        if h is None or h.address() != p.address:
            info = self.topology.nodes.get(p.node_id)
            h = self.create_peer_handle(p.node_id, p.address, info.capabilities if info else DeviceCapabilities("?", "?", 0))
            self._extra_handles[p.node_id] = h
        return h

    async def _send_prompt(self, ctx: RequestContext, token_ids: np.ndarray, position: int) -> None:
        first = ctx.ring[0]
        if first.node_id == self.id:
            await self.process_prompt(ctx, token_ids, position)
        else:
            await self._peer(first).send_prompt(ctx, token_ids, position)

    async def process_prompt(self, ctx: RequestContext, token_ids: np.ndarray, position: int) -> None:
        """Schedule token ids (int64, (1, T)) on this node's shard, which must hold layer 0.

        Raises:
            ValueError: this node's shard of ``ctx`` does not start at layer 0, or bad shape.
            KeyError: this node is not in the request's ring.
        """
        shard = ctx.shard_of(self.id)
        if not shard.is_first_layer:
            raise ValueError(f"node {self.id} holds layers {shard.start_layer}-{shard.end_layer}, not layer 0")
        if token_ids.ndim != 2 or token_ids.shape[0] != 1 or token_ids.shape[1] == 0:
            raise ValueError(f"token ids must have shape (1, T), got {token_ids.shape}")
        self._schedule(ctx, token_ids, position)

    async def process_tensor(self, ctx: RequestContext, hidden_states: np.ndarray, position: int) -> None:
        """Schedule hidden states (float32, (1, T, hidden)) on this node's shard.

        Raises:
            ValueError: bad shape, or this node's shard holds layer 0 (it takes token ids).
            KeyError: this node is not in the request's ring.
        """
        shard = ctx.shard_of(self.id)
        if shard.is_first_layer:
            raise ValueError(f"node {self.id} holds layer 0 and takes token ids, not hidden states")
        if hidden_states.ndim != 3 or hidden_states.shape[0] != 1 or hidden_states.shape[1] == 0:
            raise ValueError(f"hidden states must have shape (1, T, hidden), got {hidden_states.shape}")
        self._schedule(ctx, hidden_states, position)

    def _schedule(self, ctx: RequestContext, x: np.ndarray, position: int) -> None:
        if ctx.request_id in self._ended:
            logger.debug("dropping a message of ended request %s", ctx.request_id)
            return
        self._spawn(self._run_shard(ctx, x, position), f"shard-{ctx.request_id}")

    async def _run_shard(self, ctx: RequestContext, x: np.ndarray, position: int) -> None:
        rid = ctx.request_id
        self.active_request_ids.add(rid)
        try:
            shard = ctx.shard_of(self.id)
            await self._ensure_shard(shard)
            out = await self.engine.infer_tensor(rid, shard, x, position)
            if rid in self._ended:
                await self.engine.clear_request(rid)
                return
            next_position = position + x.shape[1]
            if not shard.is_last_layer:
                await self._peer(ctx.next_partition(self.id)).send_tensor(ctx, out, position)
                return
            await self._sample_and_continue(ctx, out, next_position)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("request %s failed on node %s", rid, self.id)
            await self._report(ctx, TokenResult(rid, finish_reason="error", error=f"node {self.id}: {type(e).__name__}: {e}"))
        finally:
            self.active_request_ids.discard(rid)

    async def _sample_and_continue(self, ctx: RequestContext, logits: np.ndarray, next_position: int) -> None:
        rid = ctx.request_id
        sampler = self._samplers.get(rid)
        if sampler is None or next_position == ctx.prompt_len:
            sampler = self._samplers[rid] = Sampler(ctx.options)
        s = sampler.sample(logits)
        n_generated = next_position - ctx.prompt_len + 1
        card_ctx = get_model_card(ctx.model_id).context_length
        if s.token in ctx.options.stop_token_ids:
            result = TokenResult(rid, finish_reason="stop")
        else:
            finish = "length" if n_generated >= ctx.options.max_tokens or next_position + 1 >= card_ctx else None
            result = TokenResult(rid, [s.token], finish_reason=finish)
            if s.logprob is not None:
                result.logprobs = [s.logprob]
                result.top_logprobs = [s.top_logprobs]
        if result.is_finished:
            self._samplers.pop(rid, None)
        else:
            await self._send_prompt(ctx, np.asarray([[s.token]], dtype=WIRE_TOKEN_DTYPE), next_position)
        await self._report(ctx, result)

    async def _report(self, ctx: RequestContext, result: TokenResult) -> None:
        try:
            if ctx.origin_node_id == self.id:
                await self.process_result(result)
            else:
                origin = self.peers.get(ctx.origin_node_id)
                if origin is None:
                    info = self.topology.nodes.get(ctx.origin_node_id)
                    if info is None:
                        raise ConnectionError(f"origin node {ctx.origin_node_id} is unknown")
                    origin = self._peer(Partition(info.node_id, info.address, 0, 0))
                await origin.send_result(result)
        except Exception:
            logger.exception("could not deliver a result of request %s to %s", ctx.request_id, ctx.origin_node_id)

    async def process_result(self, result: TokenResult) -> None:
        """Deliver a result to the local request it belongs to (unknown ids are ignored)."""
        req = self._origin_requests.get(result.request_id)
        if req is None:
            logger.debug("result for unknown or finished request %s", result.request_id)
            return
        req.queue.put_nowait(result)

    async def end_request(self, request_id: str) -> None:
        """Stop ``request_id`` on this node and free its KV cache and sampler."""
        self._ended[request_id] = time.monotonic()
        while len(self._ended) > 10_000:
            self._ended.popitem(last=False)
        self._samplers.pop(request_id, None)
        await self.engine.clear_request(request_id)
