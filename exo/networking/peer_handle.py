"""PeerHandle: a thin client for one peer node."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np

from exo.orchestration.request import RequestContext, TokenResult
from exo.topology.device_capabilities import DeviceCapabilities
from exo.topology.topology import Topology


class PeerHandle(ABC):
    """A connection to one peer. Every call has a timeout and raises on failure
    (``ConnectionError`` for an unreachable peer, ``RuntimeError`` with the peer's message for an
    error it reported)."""

    @abstractmethod
    def id(self) -> str: ...

    @abstractmethod
    def address(self) -> str:
        """"host:port" of the peer's gRPC server."""

    @abstractmethod
    def device_capabilities(self) -> DeviceCapabilities: ...

    @abstractmethod
    async def connect(self) -> None: ...

    @abstractmethod
    async def disconnect(self) -> None: ...

    @abstractmethod
    async def health_check(self) -> bool:
        """True when the peer answers its health check in time (never raises)."""

    @abstractmethod
    async def send_prompt(self, ctx: RequestContext, token_ids: np.ndarray, position: int,
                          on_error: Callable[[BaseException], None] | None = None, result: TokenResult | None = None) -> None:
        """Start or continue ``ctx``'s request on the peer holding layer 0.

        ``token_ids``: int64, shape (1, T). ``position``: tokens already in the KV cache (0 = prefill).
        ``result``: for a peer that is also the request's origin, the result of the step these
        ids come from, delivered before the prompt (one message instead of two per token).

        ``on_error`` (here and in ``send_tensor``, ``send_result``): the call may return once
        the message is on its way, without waiting for the peer's answer; an error the peer
        reports for it later, or the connection failing before the peer confirmed it, is then
        passed to ``on_error`` (on the event loop, as the exception the call would have raised)
        instead of raised. Failures noticed while sending are still raised.
        """

    @abstractmethod
    async def send_tensor(self, ctx: RequestContext, hidden_states: np.ndarray, position: int,
                          on_error: Callable[[BaseException], None] | None = None) -> None:
        """Hand hidden states (float32, shape (1, T, hidden)) to the peer's shard of ``ctx``'s ring."""

    @abstractmethod
    async def send_result(self, result: TokenResult, on_error: Callable[[BaseException], None] | None = None) -> None:
        """Deliver tokens, a finish or an error to the request's origin node."""

    @abstractmethod
    async def end_request(self, request_id: str, keep_tokens: Sequence[int] = ()) -> None:
        """Tell the peer the request is over: stop it and free its KV cache, or with
        ``keep_tokens`` (the tokens that cache holds) keep it in the peer's prompt cache."""

    async def send_image_job(self, job) -> None:
        """Ask the peer, which holds the image model, to draw ``job``
        (``exo.networking.grpc.image_codec.ImageJob``); it answers at once and sends the
        request's ``ImageEvent``s to the origin. Transports without image support raise
        NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__} does not carry image requests")

    async def send_image_event(self, event, on_error: Callable[[BaseException], None] | None = None) -> None:
        """Deliver one ``ImageEvent`` (a step, an image, the end, an error) to the request's
        origin; ``on_error`` as for ``send_prompt``."""
        raise NotImplementedError(f"{type(self).__name__} does not carry image events")

    @abstractmethod
    async def collect_topology(self, visited: set[str], max_depth: int) -> Topology:
        """The topology as seen from the peer, not descending into ``visited`` node ids."""
