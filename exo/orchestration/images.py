"""Image requests on the cluster: where an image model runs, and getting its events back.

An image model (a diffusers pipeline, ``ModelCard.kind == "image"``) runs whole on one node, its
*holder*: the node of the topology with the most memory among those that can hold it
(``place``; ties go to the smaller node id, so every origin picks the same holder and the
pipeline is loaded once). The node whose API received the request (the *origin*) draws itself
when it is the holder; otherwise it sends the request over the ring's stream to the holder
(``PeerHandle.send_image_job``), which answers at once, draws in the background and sends each
event back over its own stream to the origin (``send_image_event``): one "progress" per
denoising step, one "image" per picture (its PNG, a few hundred KB at 512x512: far below the
ring's 256 MiB message limit), then "done" or an "error". The origin fails the request when the
holder leaves the topology or says nothing for ``response_timeout`` seconds, and tells the holder
to stop (``end_request``) when its client goes away. A holder draws one request at a time, on
one worker thread (``DiffusionRunner``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable

from exo.inference.diffusion.params import ImageEvent, ImageJob, ImageParams
from exo.models.cards import ModelCard
from exo.orchestration.background import Background
from exo.orchestration.errors import (
    GenerationError, GenerationTimeoutError, InvalidModelError, ModelNotFoundError, ModelUnavailableError,
    NoNodeAvailableError,
)
from exo.orchestration.membership import Membership
from exo.orchestration.model_service import ModelService
from exo.orchestration.peer_pool import PeerPool
from exo.topology.partitioning import Partition
from exo.topology.topology import NodeInfo

logger = logging.getLogger(__name__)

#: Memory a node needs per byte of a pipeline's weight files: fp16 files load as float32 on a
#: CPU, and the activations of a 512x512 (or 1024x1024) image need room beside the weights.
MEMORY_PER_FILE_BYTE = 2


def error_code(e: BaseException) -> str:
    """The ``ImageEvent.code`` of a holder's failure."""
    from exo.inference.diffusion.pipeline_dir import PipelineError

    if isinstance(e, ModelNotFoundError):
        return "model_not_found"
    if isinstance(e, (InvalidModelError, PipelineError)):
        return "invalid_model"
    if isinstance(e, (ModelUnavailableError, NoNodeAvailableError, ImportError)):
        return "model_not_available"
    if isinstance(e, ValueError):
        return "invalid_value"
    return "generation_error"


def error_from(event: ImageEvent, holder: str) -> Exception:
    """The exception an origin raises for an "error" event from node ``holder``."""
    message = event.error
    if event.code == "model_not_found":
        return ModelNotFoundError(message)
    if event.code == "invalid_model":
        return InvalidModelError(message)
    if event.code == "model_not_available":
        return ModelUnavailableError(message)
    if event.code == "invalid_value":
        return ValueError(message)
    return GenerationError(f"node {holder}: {message}")


class ImageService:
    """Image requests of node ``node_id``, as origin and as holder.

    Args:
        address: this node's gRPC "host:port" now (where holders send events).
        membership: the topology placement reads.
        pool: handles to the holders and origins.
        models: cards and pipeline downloads.
        background: runs the drawing of requests this node holds.
        response_timeout: seconds an origin waits for the next event before failing the request.
        device: the torch device pipelines run on, asked when the first one loads (None: CUDA
            where there is one, else the CPU).
        threads: torch threads while drawing on the CPU (None: torch's own setting).
    """

    def __init__(self, node_id: str, address: Callable[[], str], membership: Membership, pool: PeerPool,
                 models: ModelService, background: Background, response_timeout: float,
                 device: Callable[[], str | None] = lambda: None, threads: int | None = None):
        self.id = node_id
        self._address = address
        self._membership = membership
        self._pool = pool
        self._models = models
        self._background = background
        self.response_timeout = response_timeout
        self._device = device
        self._threads = threads
        self._runner = None  # a DiffusionRunner, made on the worker thread at the first request
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffusion")
        self._lock = asyncio.Lock()  # one request draws at a time
        self._origins: dict[str, tuple[asyncio.Queue, str]] = {}  # request id -> (its events, holder id)
        self._jobs: dict[str, threading.Event] = {}  # request id held here -> set to cancel it
        self.held: str | None = None  # model id of the pipeline loaded here
        self.loading: str | None = None  # model id being loaded here

    # ------------------------------------------------------------------ placement

    def place(self, card: ModelCard) -> NodeInfo:
        """The holder of image model ``card``: the node with the most memory that holds at least
        ``MEMORY_PER_FILE_BYTE`` times its weights' bytes (ties: the smaller node id).

        Raises:
            NoNodeAvailableError: no node has that much memory (the message gives the sizes;
                exo does not split a pipeline's components over nodes).
        """
        need = (card.size or 0) * MEMORY_PER_FILE_BYTE
        nodes = sorted(self._membership.topology.nodes.values(), key=lambda n: (-n.capabilities.memory, n.node_id))
        for info in nodes:
            if info.capabilities.memory >= need:
                return info
        best = nodes[0].capabilities.memory if nodes else 0
        raise NoNodeAvailableError(f"no node can hold the image model {card.model_id}: it needs {need} bytes of memory, "
                                   f"the largest node has {best} (a pipeline runs whole on one node)")

    # ------------------------------------------------------------------ origin

    async def generate(self, card: ModelCard, params: ImageParams, request_id: str) -> AsyncIterator[ImageEvent]:
        """The events of drawing ``params`` with image model ``card``, on its holder: "progress"
        and "image" events, ending with "done" (an "error" is raised instead).

        Raises:
            NoNodeAvailableError: as ``place``.
            ModelNotFoundError, InvalidModelError, ModelUnavailableError, ValueError: the
                holder's refusal (an unknown or broken model, a bad parameter).
            GenerationError: the holder failed or left; GenerationTimeoutError: it said
                nothing for ``response_timeout`` seconds.
        """
        holder = self.place(card)
        queue: asyncio.Queue[ImageEvent] = asyncio.Queue()
        self._origins[request_id] = (queue, holder.node_id)
        finished = False
        try:
            job = ImageJob(request_id, self.id, self._address(), card.model_id, params)
            if holder.node_id == self.id:
                self._background.spawn(self._run(job, queue.put_nowait), f"image-{request_id}")
            else:
                try:
                    await self._pool.handle(Partition(holder.node_id, holder.address, 0, 0)).send_image_job(job)
                except (ConnectionError, RuntimeError) as e:
                    raise GenerationError(f"node {holder.node_id} did not take the image request: {e}") from e
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), self.response_timeout)
                except asyncio.TimeoutError:
                    raise GenerationTimeoutError(f"node {holder.node_id} sent nothing about image request {request_id} "
                                                 f"for {self.response_timeout} s") from None
                if event.kind == "error":
                    finished = True
                    raise error_from(event, holder.node_id)
                yield event
                if event.kind == "done":
                    finished = True
                    return
        finally:
            self._origins.pop(request_id, None)
            if not finished:
                self._stop(request_id, holder)

    def _stop(self, request_id: str, holder: NodeInfo) -> None:
        """Tell the holder of an unfinished request to stop drawing it."""
        if holder.node_id == self.id:
            self.cancel(request_id)
            return

        async def end() -> None:
            try:
                await self._pool.handle(Partition(holder.node_id, holder.address, 0, 0)).end_request(request_id)
            except Exception as e:  # the holder is gone, or done already
                logger.debug("ending image request %s on %s: %s", request_id, holder.node_id, e)

        self._background.spawn(end(), f"image-end-{request_id}")

    async def process_image_event(self, event: ImageEvent) -> None:
        """An event of a request this node is the origin of, from its holder.

        Raises:
            KeyError: no such request here (over, or never this node's): the holder stops.
        """
        entry = self._origins.get(event.request_id)
        if entry is None:
            raise KeyError(f"no image request {event.request_id} on node {self.id}")
        entry[0].put_nowait(event)

    def notify_ring_loss(self, gone: set[str]) -> None:
        """Fail the requests whose holder left the topology."""
        for request_id, (queue, holder) in list(self._origins.items()):
            if holder in gone:
                queue.put_nowait(ImageEvent(request_id, "error", error=f"node {holder} left the cluster",
                                            code="generation_error"))

    # ------------------------------------------------------------------ holder

    def cancel(self, request_id: str) -> bool:
        """Stop drawing ``request_id`` here (at its next denoising step); whether it was here."""
        flag = self._jobs.get(request_id)
        if flag is None:
            return False
        flag.set()
        return True

    async def process_image_job(self, job: ImageJob) -> None:
        """Draw ``job`` for its origin, in the background (this returns at once); its events go
        to the origin in order over the ring."""
        outbox: asyncio.Queue[ImageEvent | None] = asyncio.Queue()
        self._jobs[job.request_id] = threading.Event()  # now: an end may arrive before the task starts

        async def serve() -> None:
            sender = asyncio.create_task(self._send_events(job, outbox), name=f"image-events-{job.request_id}")
            try:
                await self._run(job, outbox.put_nowait)
            finally:
                outbox.put_nowait(None)
                await sender

        if self._background.spawn(serve(), f"image-{job.request_id}") is None:
            self._jobs.pop(job.request_id, None)

    async def _send_events(self, job: ImageJob, outbox: asyncio.Queue) -> None:
        handle = self._pool.handle(Partition(job.origin_node_id, job.origin_address, 0, 0))

        def failed(e: BaseException) -> None:
            logger.info("image request %s: origin %s refused an event (%s); stopping", job.request_id,
                        job.origin_node_id, e)
            self.cancel(job.request_id)

        while (event := await outbox.get()) is not None:
            try:
                await handle.send_image_event(event, on_error=failed)
            except Exception as e:
                failed(e)

    async def _run(self, job: ImageJob, emit: Callable[[ImageEvent], None]) -> None:
        """Draw ``job`` here, passing its events to ``emit`` (on the event loop)."""
        from exo.inference.diffusion.pipeline_dir import read_pipeline

        rid = job.request_id
        cancel = self._jobs.setdefault(rid, threading.Event())
        loop = asyncio.get_running_loop()

        def threadsafe(event: ImageEvent) -> None:
            loop.call_soon_threadsafe(emit, event)

        def on_step(index: int, step: int, total: int) -> None:
            threadsafe(ImageEvent(rid, "progress", index=index, step=step, total_steps=total))

        def on_image(index: int, png: bytes, seed: int) -> None:
            threadsafe(ImageEvent(rid, "image", index=index, png=png, seed=seed))

        try:
            card = await self._models.model_card(job.model_id)
            if card.kind != "image":
                raise InvalidModelError(f"{card.model_id} is a text model, not an image model")
            card = await self._models.ensure_pipeline(card.model_id)
            info = await asyncio.to_thread(read_pipeline, card.path)
            async with self._lock:
                if cancel.is_set():
                    return
                if self.held != card.model_id:
                    self.loading = card.model_id
                try:
                    await loop.run_in_executor(self._executor, self._draw, info, job.params, on_step, on_image,
                                               cancel.is_set)
                finally:
                    self.loading = None
                self.held = card.model_id
            emit(ImageEvent(rid, "done"))
        except Exception as e:
            from exo.inference.diffusion.runner import Cancelled

            if isinstance(e, Cancelled) or cancel.is_set():
                logger.info("image request %s cancelled", rid)
                emit(ImageEvent(rid, "error", error="the request was cancelled", code="cancelled"))
                return
            code = error_code(e)
            if code == "generation_error":
                logger.exception("image request %s failed", rid)
            elif isinstance(e, ImportError):
                e = ModelUnavailableError(f"node {self.id} cannot run image models: {e} (pip install 'exo[images]')")
            emit(ImageEvent(rid, "error", error=str(e) or type(e).__name__, code=code))
        finally:
            self._jobs.pop(rid, None)

    def _draw(self, info, params: ImageParams, on_step, on_image, cancelled) -> None:
        """On the worker thread: the runner (made at first use) draws ``params``."""
        if self._runner is None:
            from exo.inference.diffusion.runner import DiffusionRunner

            self._runner = DiffusionRunner(self._device(), self._threads)
        self._runner.generate(info, params, on_step, on_image, cancelled)

    def model_state(self, model_id: str) -> str | None:
        """"loading" or "ready" for the image model loaded (or loading) here, else None."""
        if self.loading == model_id:
            return "loading"
        if self.held == model_id:
            return "ready"
        return None

    async def close(self) -> None:
        """Cancel what is drawing and let the worker thread go."""
        for flag in self._jobs.values():
            flag.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
