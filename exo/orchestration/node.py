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
import contextlib
import logging
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import AsyncIterator, Callable, Collection, Iterator, Sequence

import numpy as np

from exo.config import DEFAULT_RESPONSE_TIMEOUT
from exo.inference.generation import GenerationOptions
from exo.inference.inference_engine import WIRE_TOKEN_DTYPE, InferenceEngine
from exo.inference.sampling import Sampler
from exo.inference.shard import Shard
from exo.inference.tokenizers import Tokenizer, tokenizer_for_path
from exo.models.sources import STORE, ModelCard, ModelNotFound, ModelStore, NotDeletable, canonical_name
from exo.networking.discovery import Discovery
from exo.networking.peer_handle import PeerHandle
from exo.inference.inference_engine import unsupported_reason
from exo.models.hub import DownloadError, NotOnHub
from exo.orchestration.errors import (
    GenerationError, GenerationTimeoutError, InvalidModelError, ModelBusyError, ModelNotFoundError,
    ModelUnavailableError, NoNodeAvailableError, NodeStoppingError,
)
from exo.orchestration.request import RequestContext, TokenResult
from exo.orchestration.shards import DEFAULT_IDLE_TTL, DEFAULT_MAX_MODELS, ShardCache
from exo.topology.device_capabilities import DeviceCapabilities
from exo.topology.partitioning import Partition, PartitioningStrategy, PartitionPlan, RingMemoryWeightedPartitioningStrategy
from exo.topology.topology import NodeInfo, Topology

logger = logging.getLogger(__name__)

PeerHandleFactory = Callable[[str, str, DeviceCapabilities], PeerHandle]

#: Seconds without a token after which the origin checks that every ring member still answers.
STALL_PROBE_INTERVAL = 3.0
#: Most re-partitions of one request before it fails.
MAX_FAILOVERS = 4
#: Seconds a peer that left stays out of the topology even if another peer still reports it
#: (that peer's own health checks have not noticed yet).
LOST_PEER_MEMORY = 15.0
#: Seconds a model whose download failed on this node counts as unservable (``download_failure``)
#: before a request may try to download it again.
DOWNLOAD_RETRY_AFTER = 60.0


@contextlib.contextmanager
def _model_errors(model_id: str) -> Iterator[None]:
    """The model store's errors for ``model_id`` as the API's.

    Raises:
        ModelNotFoundError: no such file, catalogue id or hub repo.
        ModelUnavailableError: the download failed (offline, the endpoint down).
        InvalidModelError: not a model exo can run (an unsupported architecture, a truncated
            file) or a local disk error; the message names the model.
    """
    try:
        yield
    except (ModelNotFound, FileNotFoundError) as e:
        raise ModelNotFoundError(str(e.args[0]) if e.args else str(e)) from None
    except NotOnHub as e:
        raise ModelNotFoundError(str(e)) from None
    except DownloadError as e:
        raise ModelUnavailableError(str(e)) from None
    except (ValueError, OSError) as e:
        raise InvalidModelError(str(e) if model_id in str(e) else f"{model_id}: {e}") from None


@dataclass
class _OriginRequest:
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


def replayed_sampler(options: GenerationOptions, generated: Sequence[int]) -> Sampler:
    """A Sampler in the state one had after sampling the tokens ``generated``: their penalty
    counts, and when it samples (not greedy) its random generator advanced by one uniform draw per token
    (``Sampler`` draws exactly one through ``Generator.choice`` per sampled token), so a seeded
    request continues with the same draws after a re-partition."""
    sampler = Sampler(options)
    for t in generated:
        sampler.counts[t] = sampler.counts.get(t, 0) + 1
    if not options.greedy and generated:
        sampler.rng.random(len(generated))
    return sampler


class Node:
    """A node of the cluster.

    Args:
        node_id: unique id of this node.
        engine: the inference engine running this node's shard (of its first model).
        device_capabilities: this node's device (memory decides its share of layers).
        create_peer_handle: builds a PeerHandle for (node_id, "host:port", capabilities); used for
            ring members that discovery has not reported (yet).
        partitioning_strategy: default ring memory-weighted.
        default_model: model loaded ahead of the first request when the ring changes.
        response_timeout: seconds the origin waits for the next token before failing the request.
        topology_interval: seconds between topology refreshes.
        create_engine: makes an engine for each further model held at once (None: one model at a
            time; a request for another swaps the shard when the first is idle).
        max_models, idle_ttl: bounds of the cache of shards held (``ShardCache``).
        models: where model names resolve and weights come from (default: the process's store).
        chat_templates: model id -> chat template for a model that has none (a built-in name,
            a Jinja file's path, or the Jinja source).
    """

    def __init__(
        self,
        node_id: str,
        engine: InferenceEngine,
        device_capabilities: DeviceCapabilities,
        create_peer_handle: PeerHandleFactory,
        partitioning_strategy: PartitioningStrategy | None = None,
        default_model: str | None = None,
        response_timeout: float = DEFAULT_RESPONSE_TIMEOUT,
        topology_interval: float = 2.0,
        create_engine: Callable[[], InferenceEngine] | None = None,
        max_models: int = DEFAULT_MAX_MODELS,
        idle_ttl: float = DEFAULT_IDLE_TTL,
        models: ModelStore | None = None,
        chat_templates: dict[str, str] | None = None,
    ):
        self.id = node_id
        self.shards = ShardCache(engine, create_engine, max_models, idle_ttl, memory=device_capabilities.memory)
        self.models = models if models is not None else STORE
        self.chat_templates = {canonical_name(k): v for k, v in (chat_templates or {}).items()}
        self.device_capabilities = device_capabilities
        self.create_peer_handle = create_peer_handle
        self.partitioning_strategy = partitioning_strategy or RingMemoryWeightedPartitioningStrategy()
        self.default_model = canonical_name(default_model) if default_model else default_model
        self.response_timeout = response_timeout
        self.topology_interval = topology_interval
        self.address = ""  # "host:port" of this node's gRPC server, set once it listens
        self.discovery: Discovery | None = None
        self.peers: dict[str, PeerHandle] = {}
        self.topology = Topology()
        self._extra_handles: dict[str, PeerHandle] = {}
        self._origin_requests: dict[str, _OriginRequest] = {}
        self._samplers: dict[str, tuple[int, Sampler]] = {}  # request id -> (epoch, its sampler)
        self._ended: OrderedDict[str, float] = OrderedDict()  # request ids ended recently
        self._tasks: set[asyncio.Task] = set()
        self._disconnecting: set[asyncio.Task] = set()  # closing replaced handles: awaited by stop(), never cancelled
        self._topology_lock = asyncio.Lock()
        self._stopping = False
        self._topology_task: asyncio.Task | None = None
        self.active_request_ids: set[str] = set()  # requests this node is computing right now
        self._epochs: OrderedDict[str, int] = OrderedDict()  # request id -> latest epoch seen here
        self._lost_peers: dict[str, float] = {}  # node id -> monotonic time it stopped being a peer
        self._cards: dict[str, ModelCard] = {}  # model id -> its card, once resolved
        self._requested_models: set[str] = set()  # models requests through this node named
        self._left_out_logged: dict[str, str] = {}  # model id -> reason this node holds no layer
        self._loading: dict[str, int] = {}  # model id -> shard loads in progress
        self._pulls: dict[str, asyncio.Task] = {}  # model id -> its whole download in progress (``pull``)
        self._download_failures: dict[str, tuple[str, float]] = {}  # model id -> (error, monotonic time)
        self._deliveries: dict[str, asyncio.Future] = {}  # request id -> its latest result's delivery

    @property
    def engine(self) -> InferenceEngine:
        """The engine of the default model (the first engine while it holds none)."""
        e = self.shards.get(self.default_model) if self.default_model else None
        return e if e is not None else self.shards.first_engine

    def engine_for(self, model_id: str) -> InferenceEngine | None:
        """The engine holding ``model_id``'s shard on this node, if any."""
        return self.shards.get(model_id)

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
        if self.default_model:  # its card first: partitions, /health and /v1/topology need it
            await self._warm_card(self.default_model)
        for model_id in self.models.installed_catalogue_ids():  # listed as "available" by /v1/models
            if model_id != self.default_model:
                self._spawn(self._warm_card(model_id), f"model-card-{model_id}")
        await self.update_topology()
        if discovery is None and self.default_model:  # alone for good: no ring change will preload
            self._spawn(self._preload(self.default_model), "preload")
        self._topology_task = asyncio.create_task(self._topology_loop(), name=f"topology-{self.id}")

    async def stop(self) -> None:
        """Stop discovery and background tasks, end requests in flight."""
        self._stopping = True
        for req in list(self._origin_requests.values()):
            req.queue.put_nowait(TokenResult(req.ctx.request_id, finish_reason="error", error=f"node {self.id} is shutting down",
                                             epoch=req.ctx.epoch))
        tasks = [t for t in [self._topology_task, *self._tasks, *self._pulls.values()] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.discovery is not None:
            await self.discovery.stop()
        await asyncio.gather(*self._disconnecting, return_exceptions=True)
        for h in self._extra_handles.values():
            await h.disconnect()
        await self.shards.close()

    def is_healthy(self) -> bool:
        return not self._stopping

    def node_info(self) -> NodeInfo:
        e = self.shards.first_engine
        return NodeInfo(self.id, self.address, self.device_capabilities, e.name, float(e.param_bytes))

    # ---------------------------------------------------------------- topology

    def _spawn(self, coro, name: str) -> asyncio.Task | None:
        """Run ``coro`` as a task that ``stop`` cancels and waits for; once stopping, none is
        started (``stop`` would neither cancel nor wait for it) and ``coro`` is closed."""
        if self._stopping:
            logger.debug("node %s is stopping: not starting %s", self.id, name)
            coro.close()
            return None
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
                await self.shards.evict_idle(pinned={self.default_model} if self.default_model else ())
            except Exception:
                logger.exception("topology refresh failed")

    async def update_topology(self) -> Topology:
        """Rebuild the topology from the live peers and what they see, and preload this node's
        shard of the default model when the ring changed.

        Every node sees every node of the cluster, not only its direct peers: each peer answers
        ``collect_topology`` with its own latest view (its peers, and what it learnt from them),
        so nodes and links several hops away arrive within a few refreshes. A peer that left is
        kept out for ``LOST_PEER_MEMORY`` seconds even while other peers' older views still list
        it. Requests this node is the origin of are told when members of their ring left.
        """
        async with self._topology_lock:
            peers = await self.discovery.discover_peers(0) if self.discovery is not None else []
            now = time.monotonic()
            previous_peers = set(self.peers)
            self.peers = {p.id(): p for p in peers}
            for gone in previous_peers - set(self.peers):
                self._lost_peers[gone] = now
            for nid, since in list(self._lost_peers.items()):
                if nid in self.peers or now - since > LOST_PEER_MEMORY:
                    del self._lost_peers[nid]
            topo = Topology()
            topo.add_node(self.node_info())
            for p in peers:
                topo.add_node(NodeInfo(p.id(), p.address(), p.device_capabilities()))
                topo.add_edge(self.id, p.id())
            visited = {self.id, *self.peers}
            results = await asyncio.gather(*(p.collect_topology(set(visited), 4) for p in peers), return_exceptions=True)
            for p, r in zip(peers, results):
                if isinstance(r, Topology):
                    own = r.nodes.get(p.id())
                    if own is not None:  # a peer knows its own device and engine best (a manual peer file may not say)
                        topo.add_node(NodeInfo(p.id(), p.address(), own.capabilities, own.engine, own.param_bytes))
                    for nid, info in r.nodes.items():
                        if nid not in topo.nodes and nid not in self._lost_peers:
                            topo.add_node(info)
                    topo.edges |= {(a, b) for a, b in r.edges if a in topo.nodes and b in topo.nodes}
                else:
                    logger.debug("collect_topology from %s failed: %s", p.id(), r)
            changed = set(topo.nodes) != set(self.topology.nodes)
            gone = (set(self.topology.nodes) - set(topo.nodes)) | (previous_peers - set(self.peers))
            self.topology = topo
        if gone:
            self._notify_ring_loss(gone)
        if changed:
            logger.info("node %s: topology now has %d nodes: %s", self.id, len(topo.nodes), sorted(topo.nodes))
            if self.default_model:
                self._spawn(self._preload(self.default_model), "preload")
        return topo

    async def _preload(self, model_id: str) -> None:
        try:
            card = await self.model_card(model_id)
        except Exception as e:
            logger.warning("cannot preload %s: %s", model_id, e)
            return
        if card.path is None and card.source != "hub":
            return  # not on this machine: loaded (downloaded) by the first request
        try:
            plan = self.partition_plan(card)
            reason = plan.left_out.get(self.id, "")
            if reason != self._left_out_logged.get(model_id, ""):
                if reason:
                    logger.warning("node %s holds no layer of %s: %s", self.id, model_id, reason)
                else:
                    logger.info("node %s is back in the ring of %s", self.id, model_id)
                self._left_out_logged[model_id] = reason
            for p in plan.ring:
                if p.node_id == self.id:
                    await self._ensure_shard(Shard(model_id, p.start_layer, p.end_layer, card.n_layers))
        except Exception:
            logger.exception("preloading %s failed", model_id)

    async def model_card(self, name: str) -> ModelCard:
        """The card of model ``name`` (resolved once, in a thread: reading a header may take a
        second, fetching a hub model's header longer).

        Raises:
            ModelNotFoundError: an unknown name, or a path with nothing there.
            InvalidModelError: a file that is not a model exo can run (the message says why).
        """
        model_id = canonical_name(name)
        card = self._cards.get(model_id)
        if card is not None:
            return card
        with self._downloading(model_id), _model_errors(model_id):
            card = await asyncio.to_thread(self.models.card, model_id)
        self._cards[model_id] = card
        return card

    @contextlib.contextmanager
    def _downloading(self, model_id: str) -> Iterator[None]:
        """Remember a ``ModelUnavailableError`` (a failed download) of ``model_id`` raised in the
        block, for ``download_failure``; re-raises it."""
        try:
            yield
        except ModelUnavailableError as e:
            self._download_failures[model_id] = (str(e), time.monotonic())
            raise

    def download_failure(self, name: str) -> str | None:
        """Why the latest download of model ``name``'s files on this node failed, if it failed
        less than ``DOWNLOAD_RETRY_AFTER`` seconds ago and nothing of it downloaded since (no I/O):
        callers that have another model to use skip this one instead of downloading again."""
        model_id = canonical_name(name)
        failure = self._download_failures.get(model_id)
        if failure is None:
            return None
        error, at = failure
        if time.monotonic() - at >= DOWNLOAD_RETRY_AFTER:
            del self._download_failures[model_id]
            return None
        return error

    def lost_peers(self) -> list[str]:
        """Ids of the peers that left (or stopped answering) in the last ``LOST_PEER_MEMORY``
        seconds, sorted."""
        return sorted(self._lost_peers)

    def cached_card(self, name: str) -> ModelCard | None:
        """The card of ``name`` if this node resolved it before (no I/O)."""
        return self._cards.get(canonical_name(name))

    async def _warm_card(self, model_id: str) -> None:
        try:
            await self.model_card(model_id)
        except Exception as e:
            logger.warning("model %s: %s", model_id, e)

    def _notify_ring_loss(self, gone: set[str]) -> None:
        """Tell this node's requests in flight whose ring has a member in ``gone``."""
        for req in self._origin_requests.values():
            lost = {p.node_id for p in req.ctx.ring if p.node_id in gone and p.node_id != self.id}
            if lost and not req.finished:
                req.queue.put_nowait(_RingChanged(req.ctx.epoch, frozenset(lost)))

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
            known = self.topology.nodes.get(pid)
            topo.add_node(known if known is not None and known.address == p.address()
                          else NodeInfo(pid, p.address(), p.device_capabilities()))
            topo.add_edge(self.id, pid)
        topo.edges |= self.topology.edges
        return topo

    def partition(self, card: ModelCard, exclude: Collection[str] = ()) -> list[Partition]:
        """The ring for ``card`` over the current topology, without the nodes in ``exclude``.

        Raises:
            NoNodeAvailableError: no node can hold a layer.
        """
        return self.partition_plan(card, exclude).ring

    def partition_plan(self, card: ModelCard, exclude: Collection[str] = ()) -> PartitionPlan:
        """The ring for ``card`` and the nodes left out of it (see ``PartitioningStrategy.plan``),
        over the current topology without the nodes in ``exclude``: nodes whose engine cannot
        run the model's architecture are left out (``unsupported_reason``), and each node's
        share of layers is bounded by its memory over the model's real bytes per layer (the
        checkpoint's, or its parameters at the node engine's ``param_bytes``).

        Raises:
            NoNodeAvailableError: no node can hold a layer.
        """
        gone = set(exclude)
        left_out: dict[str, str] = {}
        for nid, info in self.topology.nodes.items():
            why = unsupported_reason(info.engine, card.args, card.architecture)
            if why is not None:
                left_out[nid] = why
        drop = gone | set(left_out)
        topo = self.topology
        if drop:
            topo = Topology({nid: n for nid, n in topo.nodes.items() if nid not in drop},
                            {(a, b) for a, b in topo.edges if a not in drop and b not in drop})
        if not topo.nodes:
            raise NoNodeAvailableError(f"no node can run {card.model_id}: {left_out or 'no node left'}")
        try:
            plan = self.partitioning_strategy.plan(topo, card.n_layers, self._layer_bytes(card, topo))
        except ValueError as e:
            raise NoNodeAvailableError(str(e)) from e
        return PartitionPlan(plan.ring, {**left_out, **plan.left_out}, plan.shortfall)

    @staticmethod
    def _layer_bytes(card: ModelCard, topo: Topology) -> dict[str, int]:
        """Bytes one layer of ``card`` takes on each node of ``topo`` (0: unknown): the
        checkpoint's largest layer where the node's engine keeps the checkpoint's format, else
        the layer's parameters at the engine's bytes per parameter."""
        file_bytes = card.max_layer_bytes
        params = card.args.layer_params() if card.args is not None else 0
        out = {}
        for nid, info in topo.nodes.items():
            if info.param_bytes and params:
                out[nid] = int(params * info.param_bytes)
            else:
                out[nid] = file_bytes
        return out

    def topology_dict(self) -> dict:
        """The cluster as this node sees it, JSON-able (``GET /v1/topology``).

        Keys: ``node_id`` (this node); ``nodes`` (id -> address and capabilities, every node of
        the cluster, not only direct peers); ``edges`` ([a, b]: a sees b as a peer); ``partitions``
        (model id -> the ring new requests get: node id, address, inclusive layer range; for the
        default model and every model requested through this node or held by it);
        ``left_out`` (model id -> node id -> why it holds no layer: too little memory, an engine
        that cannot run the model's architecture); ``active_node_ids`` (nodes working on a
        request now, as far as this node knows: itself while it computes, and the rings of the
        requests it streams); ``requests`` (those requests: id, epoch, ring); ``shards`` (model
        id -> the layers this node holds of it); ``shard`` (the default model's, or None);
        ``last_load`` (what the default model's engine's latest shard change read and kept,
        where the engine reports it).
        """
        d = self.topology.to_dict()
        d["node_id"] = self.id
        d["partitions"], d["left_out"] = {}, {}
        asked = self._requested_models | set(self.shards.shards())
        model_ids = ([self.default_model] if self.default_model else []) + sorted(asked - {self.default_model})
        for model_id in model_ids:
            card = self._cards.get(model_id)
            if card is None:
                continue
            try:
                plan = self.partition_plan(card)
            except NoNodeAvailableError:
                continue
            d["partitions"][model_id] = [p.to_dict() for p in plan.ring]
            if plan.left_out:
                d["left_out"][model_id] = dict(sorted(plan.left_out.items()))
        d["active_node_ids"] = sorted(self._active_nodes())
        d["requests"] = [{"request_id": r.ctx.request_id, "model_id": r.ctx.model_id, "epoch": r.ctx.epoch,
                          "ring": [p.to_dict() for p in r.ctx.ring]}
                         for r in sorted(self._origin_requests.values(), key=lambda r: r.ctx.request_id)]
        d["shards"] = {m: sh.to_dict() for m, sh in sorted(self.shards.shards().items())}
        shard = self.engine.shard
        d["shard"] = None if shard is None else shard.to_dict()
        d["last_load"] = getattr(self.engine, "last_load", None)
        return d

    def _active_nodes(self) -> set[str]:
        active = {self.id} if self.active_request_ids else set()
        for req in self._origin_requests.values():
            active |= {p.node_id for p in req.ctx.ring}
        return active

    # ---------------------------------------------------------------- API-facing

    def available_models(self) -> list[ModelCard]:
        """Every model this node knows (the catalogue, and each model named to it so far)."""
        known = {c.model_id: c for c in self.models.cards()}
        known.update(self._cards)
        return sorted(known.values(), key=lambda c: c.model_id)

    def model_state(self, model_id: str) -> str:
        """This node's readiness for ``model_id``: "loading" while it loads a shard of it, "ready"
        when it holds its shard of the current ring, "downloading" while its files come,
        "available" when its weights are here (loaded by the first request), else "not
        downloaded"."""
        model_id = canonical_name(model_id)
        if self._loading.get(model_id):
            return "loading"
        card = self._cards.get(model_id) or self.models.cached(model_id)
        engine = self.shards.get(model_id)
        shard = engine.shard if engine is not None else None
        if shard is not None and card is not None:
            try:
                mine = [(p.start_layer, p.end_layer) for p in self.partition(card) if p.node_id == self.id]
            except NoNodeAvailableError:
                mine = []
            if mine == [(shard.start_layer, shard.end_layer)]:
                return "ready"
        download = self.models.download_state(model_id)
        if model_id in self._pulls or (download is not None and download.get("state") == "downloading"):
            return "downloading"
        return "available" if self.models.is_complete(model_id) else "not downloaded"

    async def pull(self, name: str) -> ModelCard:
        """Download every file of model ``name`` to this machine (nothing to do for a local one
        or one a package ships); its card, with its local path. Concurrent pulls of one model
        share one download, which goes on when its callers stop waiting (it runs in a thread).

        Raises:
            ModelNotFoundError: an unknown name, or a path with nothing there.
            InvalidModelError: not a model exo can run.
            ModelUnavailableError: it cannot be downloaded now (the hub unreachable, offline,
                a gated repo without a token; the message says why).
            NodeStoppingError: the node is shutting down.
        """
        model_id = canonical_name(name)
        task = self._pulls.get(model_id)
        if task is None:
            if self._stopping:
                raise NodeStoppingError(f"node {self.id} is shutting down")
            task = asyncio.create_task(self._pull(model_id), name=f"pull-{model_id}")
            self._pulls[model_id] = task

            def done(t: asyncio.Task) -> None:
                if self._pulls.get(model_id) is t:
                    del self._pulls[model_id]
                if not t.cancelled():
                    t.exception()  # retrieved: each caller gets it from its own await

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _pull(self, model_id: str) -> ModelCard:
        with self._downloading(model_id), _model_errors(model_id):
            await asyncio.to_thread(self.models.pull, model_id)
            card = await asyncio.to_thread(self.models.card, model_id)
        self._cards[model_id] = card
        self._download_failures.pop(model_id, None)
        logger.info("pulled %s: %s", model_id, card.path)
        return card

    async def delete_model(self, name: str) -> None:
        """Remove model ``name``'s downloaded files from this machine's Hugging Face cache and
        unload its shard (and that of any other name for the same files). A later request
        downloads it again.

        Raises:
            InvalidModelError: a local path or a model an installed package ships: exo never
                deletes a user's own files (the message says how to remove it).
            ModelNotFoundError: an unknown name, or nothing of it downloaded here.
            ModelBusyError: it is being downloaded or loaded, or a request is using it.
        """
        model_id = canonical_name(name)
        download = self.models.download_state(model_id)
        if model_id in self._pulls or (download is not None and download.get("state") == "downloading"):
            raise ModelBusyError(f"{model_id} is being downloaded; delete it once the download is over")
        if self._loading.get(model_id) or self.shards.in_use(model_id):
            raise ModelBusyError(f"{model_id} is in use on node {self.id}; delete it once its requests are over")
        try:
            await asyncio.to_thread(self.models.delete, model_id)
        except NotDeletable as e:
            raise InvalidModelError(str(e)) from None
        except ModelNotFound as e:
            raise ModelNotFoundError(str(e)) from None
        gone = {model_id}
        for mid, card in list(self._cards.items()):  # every name whose files went
            if card.path is not None and not card.path.exists():
                self._cards[mid] = replace(card, path=None)
                gone.add(mid)
        for mid in sorted(gone):
            if self.shards.get(mid) is not None and not self.shards.in_use(mid):
                await self.shards.evict(mid, "its files were deleted")
        logger.info("deleted the files of %s", model_id)

    def downloads(self) -> dict[str, dict]:
        """This node's downloads, in progress or done, by model id
        (``exo.models.hub.DownloadProgress.snapshot``)."""
        return self.models.downloads()

    async def _ensure_shard(self, shard: Shard) -> InferenceEngine:
        """Have an engine hold ``shard`` (downloading what its layers need first), counting the
        load for ``model_state``; the engine."""
        engine = self.shards.get(shard.model_id)
        if engine is not None and engine.shard == shard:
            self.shards.touch(shard.model_id)
            return engine
        self._loading[shard.model_id] = self._loading.get(shard.model_id, 0) + 1
        try:
            card = await self.model_card(shard.model_id)
            incoming = sum((card.layer_bytes or ())[shard.start_layer:shard.end_layer + 1]) or card.max_layer_bytes * shard.n_shard_layers
            with self._downloading(shard.model_id):
                try:
                    await asyncio.to_thread(self.models.ensure_shard, shard.model_id, shard.start_layer, shard.end_layer)
                except DownloadError as e:
                    raise ModelUnavailableError(str(e)) from None
            self._download_failures.pop(shard.model_id, None)
            if card.path is None:  # its header came with the shard: the card knows its real sizes now
                self._cards[card.model_id] = card = await asyncio.to_thread(self.models.card, card.model_id)
            engine = await self.shards.engine_for(shard.model_id, incoming, pinned={self.default_model})
            await engine.ensure_shard(shard)
            return engine
        finally:
            self._loading[shard.model_id] -= 1
            if not self._loading[shard.model_id]:
                del self._loading[shard.model_id]

    async def get_tokenizer(self, model_id: str) -> Tokenizer:
        """The tokenizer of ``model_id`` (from its GGUF metadata or its directory's tokenizer files).

        Raises:
            ModelNotFoundError, InvalidModelError: as ``model_card``.
            ModelUnavailableError: its files are not on this machine and cannot be fetched now.
        """
        card = await self.model_card(model_id)
        if card.path is None:
            with self._downloading(card.model_id):
                try:
                    card = await asyncio.to_thread(self.models.ensure_header, card.model_id)
                except (DownloadError, FileNotFoundError) as e:
                    raise ModelUnavailableError(str(e)) from None
            self._cards[card.model_id] = card
        try:
            tok = await asyncio.to_thread(tokenizer_for_path, card.path)
        except (ValueError, KeyError) as e:
            raise InvalidModelError(f"{model_id}: its tokenizer cannot be read: {e}") from None
        template = self.chat_templates.get(card.model_id)
        if template and not tok.chat_template:
            if template.endswith((".jinja", ".j2")) and os.path.isfile(template):
                template = await asyncio.to_thread(Path(template).read_text)
            tok = tok.with_chat_template(template)
        return tok

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
        card = await self.model_card(model_id)
        model_id = card.model_id
        self._requested_models.add(model_id)
        if not prompt_token_ids:
            raise ValueError("the prompt has no tokens")
        request_id = request_id or str(uuid.uuid4())
        ring = self.partition(card)
        ctx = RequestContext(request_id, self.id, model_id, card.n_layers, tuple(ring), options, prompt_len=len(prompt_token_ids))
        req = _OriginRequest(ctx, asyncio.Queue(), list(prompt_token_ids), members={p.node_id: p for p in ring})
        self._origin_requests[request_id] = req
        self._ended.pop(request_id, None)
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
            self._origin_requests.pop(request_id, None)
            self._mark_ended(request_id)
            await self._end_everywhere(req)

    def _mark_ended(self, request_id: str) -> None:
        """Remember (bounded, oldest forgotten first) that ``request_id`` is over on this node:
        its late messages and results are dropped."""
        self._ended[request_id] = time.monotonic()
        self._ended.move_to_end(request_id)
        while len(self._ended) > 10_000:
            self._ended.popitem(last=False)

    async def _send_first_prompt(self, req: _OriginRequest, card: ModelCard) -> None:
        """Send the prompt to the first node of the ring; fail over if that node is gone."""
        first = req.ctx.ring[0]
        try:
            await self._send_prompt(req.ctx, np.asarray([req.prompt_ids], dtype=WIRE_TOKEN_DTYPE), 0)
        except Exception as e:
            if first.node_id == self.id:
                raise
            if await self._peer(first).health_check():
                raise GenerationError(f"node {first.node_id}: {e}") from e
            await self._failover(req, card, {first.node_id}, f"{first.node_id} is unreachable ({e})")

    async def _unreachable_members(self, ctx: RequestContext) -> set[str]:
        """Members of ``ctx``'s ring (other than this node) that fail a health check now."""
        others = [p for p in ctx.ring if p.node_id != self.id]
        if not others:
            return set()
        answers = await asyncio.gather(*(self._peer(p).health_check() for p in others))
        return {p.node_id for p, ok in zip(others, answers) if not ok}

    async def _recover(self, req: _OriginRequest, card: ModelCard, error: str) -> None:
        """A node of the ring reported ``error``: fail over when members stopped answering, or
        replay once when the cluster changed since the ring was fixed (a node joined, a shard
        was swapped under the request); otherwise the error is the request's.

        Raises:
            GenerationError: the error stands.
        """
        dead = await self._unreachable_members(req.ctx)
        if not dead:
            try:
                unchanged = tuple(self.partition(card, req.excluded)) == req.ctx.ring
            except NoNodeAvailableError:
                unchanged = True
            if unchanged or req.retried_live_ring:
                raise GenerationError(error)
            req.retried_live_ring = True
        await self._failover(req, card, dead, error)

    async def _failover(self, req: _OriginRequest, card: ModelCard, gone: set[str], reason: str) -> None:
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
                ring = self.partition(card, req.excluded)
            except NoNodeAvailableError as e:
                raise GenerationError(f"request {rid}: no ring of live nodes after {reason}: {e}") from None
            req.ctx = replace(req.ctx, ring=tuple(ring), epoch=req.ctx.epoch + 1, generated_tokens=tuple(req.generated))
            req.members.update({p.node_id: p for p in ring})
            logger.warning("request %s: %s; re-partitioned (epoch %d) over %s, replaying %d prompt + %d generated tokens",
                           rid, reason, req.ctx.epoch, [(p.node_id, p.start_layer, p.end_layer) for p in ring],
                           len(req.prompt_ids), len(req.generated))
            tokens = np.asarray([req.prompt_ids + req.generated], dtype=WIRE_TOKEN_DTYPE)
            try:
                await self._send_prompt(req.ctx, tokens, 0)
                return
            except Exception as e:
                first = ring[0]
                if first.node_id == self.id or await self._peer(first).health_check():
                    raise GenerationError(f"request {rid}: replay on node {first.node_id} failed: {e}") from e
                req.excluded.add(first.node_id)
                reason = f"{first.node_id} is unreachable ({e})"

    async def _end_everywhere(self, req: _OriginRequest) -> None:
        """Tell every node of every ring the request used (but those that stopped answering)
        that it is over: they free its KV cache."""
        rid = req.ctx.request_id

        async def end(p: Partition) -> None:
            try:
                if p.node_id == self.id:
                    await self.end_request(rid)
                else:
                    await self._peer(p).end_request(rid)
            except Exception as e:
                logger.warning("could not end request %s on %s: %s", rid, p.node_id, e)

        targets = [p for nid, p in req.members.items() if nid not in req.excluded]
        await asyncio.shield(asyncio.gather(*(end(p) for p in targets)))

    # ---------------------------------------------------------------- ring-facing

    def _peer(self, p: Partition) -> PeerHandle:
        """The handle to ``p``'s node. Raises NodeStoppingError once this node is stopping: a
        connection opened then would outlive ``stop``."""
        if self._stopping:
            raise NodeStoppingError(f"node {self.id} is shutting down")
        if p.node_id in self.peers:
            return self.peers[p.node_id]
        h = self._extra_handles.get(p.node_id)
        if h is None or h.address() != p.address:
            if h is not None:  # the node moved: close the old connection
                task = asyncio.create_task(h.disconnect(), name=f"disconnect-{p.node_id}")
                self._disconnecting.add(task)
                task.add_done_callback(self._disconnecting.discard)
            info = self.topology.nodes.get(p.node_id)
            h = self.create_peer_handle(p.node_id, p.address, info.capabilities if info else DeviceCapabilities("?", "?", 0))
            self._extra_handles[p.node_id] = h
        return h

    async def _send_prompt(self, ctx: RequestContext, token_ids: np.ndarray, position: int,
                           on_error: Callable[[BaseException], None] | None = None) -> None:
        first = ctx.ring[0]
        if first.node_id == self.id:
            await self.process_prompt(ctx, token_ids, position)
        else:
            await self._peer(first).send_prompt(ctx, token_ids, position, on_error=on_error)

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
        self._schedule(ctx, token_ids, position)

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
        if self._stopping:  # the sender fails over, as if this node were gone
            raise NodeStoppingError(f"node {self.id} is shutting down")
        if rid in self._ended:
            logger.debug("dropping a message of ended request %s", rid)
            return
        latest = self._epochs.get(rid)
        if latest is not None and ctx.epoch < latest:
            logger.debug("dropping a message of request %s from epoch %d (now %d)", rid, ctx.epoch, latest)
            return
        engine = self.shards.get(ctx.model_id)
        if position > 0 and (engine is None or rid not in engine.cached_request_ids()):
            raise KeyError(f"unknown request {rid}: node {self.id} has no KV cache to continue it at position {position}")
        if latest is None or ctx.epoch > latest:
            self._epochs[rid] = ctx.epoch
            self._epochs.move_to_end(rid)
            while len(self._epochs) > 10_000:
                self._epochs.popitem(last=False)
        self._spawn(self._run_shard(ctx, x, position), f"shard-{rid}")

    def _is_stale(self, ctx: RequestContext) -> bool:
        """True when a newer epoch of ``ctx``'s request reached this node (a re-partition)."""
        return self._epochs.get(ctx.request_id, ctx.epoch) > ctx.epoch

    async def _run_shard(self, ctx: RequestContext, x: np.ndarray, position: int) -> None:
        rid = ctx.request_id
        self.active_request_ids.add(rid)
        self.shards.begin(ctx.model_id)
        try:
            shard = ctx.shard_of(self.id)
            engine = await self._ensure_shard(shard)
            if self._is_stale(ctx):
                return
            out = await engine.infer_tensor(rid, shard, x, position)
            if rid in self._ended:
                await engine.clear_request(rid)
                return
            if self._is_stale(ctx):
                return
            next_position = position + x.shape[1]
            if not shard.is_last_layer:
                await self._pass_on(ctx, out, position)
                return
            result, token = self._sample(ctx, out, position, next_position)
            await self._deliver_and_continue(ctx, result, token, next_position)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._step_failed(ctx, e)
        finally:
            self.active_request_ids.discard(rid)
            self.shards.end(ctx.model_id)

    async def _pass_on(self, ctx: RequestContext, hidden_states: np.ndarray, position: int) -> None:
        """Send this shard's output to the next node of the ring. Raises as ``send_tensor``."""
        peer = self._peer(ctx.next_partition(self.id))
        await peer.send_tensor(ctx, hidden_states, position, on_error=self._step_error_handler(ctx))

    def _step_error_handler(self, ctx: RequestContext) -> Callable[[BaseException], None]:
        """``on_error`` of a step sent on without waiting for the peer (see PeerHandle): its
        failure is handled as if the send had raised it."""
        return lambda e: self._spawn(self._step_failed(ctx, e), f"step-failed-{ctx.request_id}")

    async def _step_failed(self, ctx: RequestContext, e: BaseException) -> None:
        """A step of ``ctx``'s request failed on this node, or the next node refused it: report
        the error to the origin (which fails over or ends the request), unless the request ended
        or moved to a newer epoch meanwhile."""
        rid = ctx.request_id
        if self._is_stale(ctx) or rid in self._ended:
            logger.debug("request %s: a message of an old epoch failed on node %s: %s", rid, self.id, e)
            return
        if isinstance(e, ConnectionError):  # the next node is gone: the origin fails over
            logger.warning("request %s on node %s: %s", rid, self.id, e)
        else:
            logger.error("request %s failed on node %s", rid, self.id, exc_info=e)
        previous = self._deliveries.get(rid)
        if previous is not None:  # after the tokens this node already sent (see _deliver_and_continue)
            await asyncio.wait([previous])
        await self._report(ctx, TokenResult(rid, finish_reason="error", error=f"node {self.id}: {type(e).__name__}: {e}",
                                            epoch=ctx.epoch))

    def _sample(self, ctx: RequestContext, logits: np.ndarray, position: int, next_position: int) -> tuple[TokenResult, int]:
        """The last shard's step: sample the next token from ``logits`` ((vocab,) float32) with the
        request's sampler. Returns the result for the origin (the token, or a finish) and the token."""
        rid = ctx.request_id
        entry = self._samplers.get(rid)
        if entry is None or position == 0 or entry[0] != ctx.epoch:
            # a prefill: the request's first, or the replay of a re-partition
            entry = self._samplers[rid] = (ctx.epoch, replayed_sampler(ctx.options, ctx.generated_tokens))
        sampler = entry[1]
        s = sampler.sample(logits)
        n_generated = next_position - ctx.prompt_len + 1
        card = self._cards.get(ctx.model_id) or self.models.cached(ctx.model_id)
        context = card.context_length if card is not None else None  # the origin bounds max_tokens by it too
        if s.token in ctx.options.stop_token_ids:
            result = TokenResult(rid, finish_reason="stop", epoch=ctx.epoch)
        else:
            finish = "length" if n_generated >= ctx.options.max_tokens or (context and next_position + 1 >= context) else None
            result = TokenResult(rid, [s.token], finish_reason=finish, epoch=ctx.epoch)
            if s.logprob is not None:
                result.logprobs = [s.logprob]
                result.top_logprobs = [s.top_logprobs]
        if result.is_finished:
            self._samplers.pop(rid, None)
        return result, s.token

    def _next_step(self, ctx: RequestContext, token: int) -> tuple[RequestContext, np.ndarray, bool]:
        """The decode step after sampling ``token`` (on the last shard): its context (only a
        replay's first step carries the generated tokens), its token ids ((1, 1), the wire's
        dtype), and whether this step's result rides with it: the first node is the origin (and
        not this node), and no earlier delivery of the request is under way (so tokens stay in
        order)."""
        next_ctx = replace(ctx, generated_tokens=()) if ctx.generated_tokens else ctx
        previous = self._deliveries.get(ctx.request_id)
        rides = ctx.ring[0].node_id == ctx.origin_node_id != self.id and (previous is None or previous.done())
        return next_ctx, np.asarray([[token]], dtype=WIRE_TOKEN_DTYPE), rides

    async def _deliver_and_continue(self, ctx: RequestContext, result: TokenResult, token: int, next_position: int) -> None:
        """After sampling: send the next step to the first node (unless the request finished)
        and deliver ``result`` to the origin."""
        rid = ctx.request_id
        next_ctx, token_ids, rides = self._next_step(ctx, token)
        # The next step starts before this result is delivered and may report its own first: each
        # delivery of a request waits for the one before, so the origin gets tokens in order.
        previous = self._deliveries.get(rid)
        delivered = self._deliveries[rid] = asyncio.get_running_loop().create_future()
        try:
            if not result.is_finished:
                if rides:
                    # the origin holds layer 0: the result rides with the next step, one message a token
                    await self._peer(ctx.ring[0]).send_prompt(next_ctx, token_ids, next_position,
                                                              on_error=self._step_error_handler(ctx), result=result)
                    return
                await self._send_prompt(next_ctx, token_ids, next_position, on_error=self._step_error_handler(ctx))
            if previous is not None:
                await asyncio.wait([previous])
            await self._report(ctx, result)
        finally:
            delivered.set_result(None)
            if self._deliveries.get(rid) is delivered:
                del self._deliveries[rid]

    async def _report(self, ctx: RequestContext, result: TokenResult) -> None:
        try:
            if ctx.origin_node_id == self.id:
                await self.process_result(result)
            else:
                origin = self.peers.get(ctx.origin_node_id)
                if origin is None:
                    # a node this one has not discovered (yet): the ring it sent carries its address
                    info = self.topology.nodes.get(ctx.origin_node_id)
                    address = info.address if info is not None else next(
                        (p.address for p in ctx.ring if p.node_id == ctx.origin_node_id), None)
                    if address is None:
                        raise ConnectionError(f"origin node {ctx.origin_node_id} is unknown")
                    origin = self._peer(Partition(ctx.origin_node_id, address, 0, 0))
                await origin.send_result(result, on_error=lambda e: self._undelivered(ctx, e))
        except Exception as e:
            self._undelivered(ctx, e)

    def _undelivered(self, ctx: RequestContext, e: BaseException) -> None:
        logger.error("could not deliver a result of request %s to %s", ctx.request_id, ctx.origin_node_id, exc_info=e)

    def _deliver(self, result: TokenResult) -> None:
        """Deliver ``result`` to its local request; dropped when the request is over here."""
        req = self._origin_requests.get(result.request_id)
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
        if result.request_id not in self._origin_requests and result.request_id not in self._ended:
            raise KeyError(f"unknown request {result.request_id}")
        self._deliver(result)

    async def end_request(self, request_id: str) -> None:
        """Stop ``request_id`` on this node and free its KV cache and sampler."""
        self._mark_ended(request_id)
        self._samplers.pop(request_id, None)
        self._epochs.pop(request_id, None)
        await self.shards.clear_request(request_id)
