"""The Node: one member of the ring, a small facade wiring its parts.

Data flow of one request (see DESIGN.md): the node whose API received it (the *origin*) fixes
the ring for the request (``RequestContext``) and sends the prompt's token ids to the node
holding layer 0. Each node runs its shard and sends hidden states to the next node; the node
holding the last layer samples a token, sends it to the origin (``SendResult``) and, unless the
request is finished, back to the first node as the next decode step. When the request ends
(EOS, max_tokens, a stop string, client disconnect or an error) the origin tells every node of
the ring, which frees that request's KV cache.

The parts, each given only the collaborators it uses (none imports this module):
- ``membership.Membership``: peers from discovery, the topology, the partition of a model;
- ``peer_pool.PeerPool``: handles to ring members discovery has not reported;
- ``model_service.ModelService``: cards, pulls, deletes, downloads, shard loads, tokenizers;
- ``origin.Origin``: the origin side of a request (lifecycle, failover and replay, delivery);
- ``worker.Worker``: the ring worker (steps, sampling, passing on, reports to the origin);
- ``images.ImageService``: image requests (the holder of an image model, forwarding to it);
- ``registry.RequestRegistry``: one bounded, TTL'd entry per request id for both sides;
- ``background.Background``: the background tasks, refused once stopping.
"""

from __future__ import annotations

from typing import Callable, Sequence

from exo.config import DEFAULT_RESPONSE_TIMEOUT
from exo.inference.inference_engine import InferenceEngine
from exo.models.sources import STORE, ModelStore, canonical_name
from exo.networking.discovery import Discovery
from exo.orchestration.background import Background
from exo.orchestration.errors import NoNodeAvailableError
from exo.orchestration.images import ImageService
from exo.orchestration.membership import Membership, layer_bytes
from exo.orchestration.model_service import ModelService
from exo.orchestration.origin import Origin
from exo.orchestration.peer_pool import PeerHandleFactory, PeerPool
from exo.orchestration.registry import RequestRegistry
from exo.orchestration.shards import DEFAULT_IDLE_TTL, DEFAULT_MAX_MODELS, ShardCache
from exo.orchestration.worker import Worker, replayed_sampler  # noqa: F401 (replayed_sampler: re-exported)
from exo.topology.device_capabilities import DeviceCapabilities
from exo.topology.partitioning import PartitioningStrategy, RingMemoryWeightedPartitioningStrategy
from exo.topology.topology import NodeInfo


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
        image_threads: torch threads while this node draws images on the CPU (None: torch's).
    """

    _layer_bytes = staticmethod(layer_bytes)

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
        image_threads: int | None = None,
    ):
        self.id = node_id
        self.shards = ShardCache(engine, create_engine, max_models, idle_ttl, memory=device_capabilities.memory)
        self.models = models if models is not None else STORE
        self.device_capabilities = device_capabilities
        self.address = ""  # "host:port" of this node's gRPC server, set once it listens
        self._background = Background(node_id)
        self._registry = RequestRegistry()
        self._membership = Membership(
            node_id, self.node_info, partitioning_strategy or RingMemoryWeightedPartitioningStrategy(), topology_interval,
            self._background, on_ring_loss=self._notify_ring_loss,
            on_topology_changed=lambda: self._model_service.preload_default(),
            after_refresh=lambda: self._model_service.evict_idle())
        self._pool = PeerPool(node_id, create_peer_handle, lambda: self._membership.peers, lambda: self._membership.topology,
                              self._background)
        self._model_service = ModelService(
            node_id, self.shards, self.models, {canonical_name(k): v for k, v in (chat_templates or {}).items()},
            canonical_name(default_model) if default_model else default_model, self._membership, self._background)
        self._worker = Worker(node_id, self._registry, self._pool, self.shards, self._model_service, self._background,
                              to_origin=lambda result: self._origin.process_result(result))
        self._origin = Origin(node_id, self._registry, self._pool, self._membership, self._model_service, self._worker,
                              response_timeout)
        self._images = ImageService(node_id, lambda: self.address, self._membership, self._pool, self._model_service,
                                    self._background, response_timeout, device=self._torch_device, threads=image_threads)
        # forwarded: the parts' docstrings say what each does
        m, ms, o, w = self._membership, self._model_service, self._origin, self._worker
        self.update_topology, self.collect_topology, self.lost_peers = m.update_topology, m.collect_topology, m.lost_peers
        self.partition, self.partition_plan = m.partition, m.partition_plan
        self.model_card, self.cached_card, self.get_tokenizer = ms.model_card, ms.cached_card, ms.get_tokenizer
        self.available_models, self.downloads = ms.available_models, ms.downloads
        self.pull, self.delete_model, self.download_failure = ms.pull, ms.delete_model, ms.download_failure
        self.generate, self.embed, self.process_result = o.generate, o.embed, o.process_result
        self.process_prompt, self.process_tensor = w.process_prompt, w.process_tensor
        self.generate_image, self.process_image_job = self._images.generate, self._images.process_image_job
        self.process_image_event, self.place_image_model = self._images.process_image_event, self._images.place

    def _notify_ring_loss(self, gone: set[str]) -> None:
        self._origin.notify_ring_loss(gone)
        self._images.notify_ring_loss(gone)

    def _torch_device(self) -> str | None:
        """The device of this node's torch engine, where it runs one (image pipelines use it)."""
        device = getattr(self.shards.first_engine, "device", None)
        return str(device) if device is not None and type(device).__name__ == "device" else None

    async def end_request(self, request_id: str, keep_tokens: Sequence[int] = ()) -> None:
        """End ``request_id`` on this node: an image request it draws, else a ring request
        (``Worker.end_request``: with ``keep_tokens``, its KV cache goes to the prompt cache)."""
        if self._images.cancel(request_id):
            return
        await self._worker.end_request(request_id, keep_tokens)

    def model_state(self, model_id: str) -> str:
        """This node's readiness for ``model_id`` (``ModelService.model_state``; an image model
        is "ready" once its pipeline is loaded here)."""
        return self._images.model_state(canonical_name(model_id)) or self._model_service.model_state(model_id)

    # the parts' state that callers read by the Node's names
    chat_templates = property(lambda self: self._model_service.chat_templates)
    default_model = property(lambda self: self._model_service.default_model)
    response_timeout = property(lambda self: self._origin.response_timeout)
    discovery = property(lambda self: self._membership.discovery)
    peers = property(lambda self: self._membership.peers)
    topology = property(lambda self: self._membership.topology)
    create_peer_handle = property(lambda self: self._pool.create_peer_handle)
    partitioning_strategy = property(lambda self: self._membership.partitioning_strategy)
    topology_interval = property(lambda self: self._membership.topology_interval)

    @property
    def active_request_ids(self) -> set[str]:
        """Requests this node is computing right now (a copy)."""
        return self._registry.computing_ids()

    @property
    def engine(self) -> InferenceEngine:
        """The engine of the default model (the first engine while it holds none)."""
        e = self.shards.get(self.default_model) if self.default_model else None
        return e if e is not None else self.shards.first_engine

    def engine_for(self, model_id: str) -> InferenceEngine | None:
        """The engine holding ``model_id``'s shard on this node, if any."""
        return self.shards.get(model_id)

    async def start(self, address: str, discovery: Discovery | None) -> None:
        """Start with this node's gRPC ``address`` ("host:port") and ``discovery`` (None: alone)."""
        self.address = address
        await self._membership.start(discovery)
        await self._model_service.warm_cards()
        await self.update_topology()
        if discovery is None:  # alone for good: no ring change will preload
            self._model_service.preload_default()
        self._membership.start_refreshing()

    async def stop(self) -> None:
        """Stop discovery and background tasks, end requests in flight."""
        self._background.stopping = True
        self._origin.fail_all(f"node {self.id} is shutting down")
        await self._background.cancel(self._membership.loop_task, *self._model_service.pulls.values())
        await self._membership.stop()
        await self._pool.close()
        await self._images.close()
        await self.shards.close()

    def is_healthy(self) -> bool:
        return not self._background.stopping

    def node_info(self) -> NodeInfo:
        e = self.shards.first_engine
        return NodeInfo(self.id, self.address, self.device_capabilities, e.name, float(e.param_bytes))

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
        asked = self._model_service.requested_models | set(self.shards.shards())
        model_ids = ([self.default_model] if self.default_model else []) + sorted(asked - {self.default_model})
        for model_id in model_ids:
            card = self.cached_card(model_id)
            if card is None:
                continue
            try:
                plan = self.partition_plan(card)
            except NoNodeAvailableError:
                continue
            d["partitions"][model_id] = [p.to_dict() for p in plan.ring]
            if plan.left_out:
                d["left_out"][model_id] = dict(sorted(plan.left_out.items()))
        origins = sorted(self._registry.origins(), key=lambda r: r.ctx.request_id)
        active = {self.id} if self.active_request_ids else set()
        for req in origins:
            active |= {p.node_id for p in req.ctx.ring}
        d["active_node_ids"] = sorted(active)
        d["requests"] = [{"request_id": r.ctx.request_id, "model_id": r.ctx.model_id, "epoch": r.ctx.epoch,
                          "ring": [p.to_dict() for p in r.ctx.ring]} for r in origins]
        d["shards"] = {m: sh.to_dict() for m, sh in sorted(self.shards.shards().items())}
        shard = self.engine.shard
        d["shard"] = None if shard is None else shard.to_dict()
        d["last_load"] = getattr(self.engine, "last_load", None)
        return d
