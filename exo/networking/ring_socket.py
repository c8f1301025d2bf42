"""Ring messages over a WebSocket (aiohttp): the fast path next to gRPC's ``Stream``.

The bytes are those of the gRPC stream: each binary frame is one serialized ``RingMessage``
(client to server) or ``RingAck`` (server to client), handled by the same ``RingSession`` as
the gRPC ``Stream`` call, so the two transports cannot disagree. A node serves it on the host
of its gRPC server and tells peers the port in its health check (``ring_port``); a peer that
cannot reach it falls back to the gRPC stream.

Why a second transport: a decode step on a 2-node ring crosses two links per token, and on a
2-core machine grpc.aio's threads (its pollers, then the event loop) wake one after another
for every message: ~0.27 ms per message one way after the idle gap of the other node's
compute, against ~0.08 ms for a WebSocket handled on the event loop itself
(``python -m bench.run``'s "ring's own cost" table compares it with the gRPC stream and
with unary calls).

The cluster key travels in the ``CLUSTER_KEY_HEADER`` of the upgrade request; a wrong or
missing key is refused with HTTP 401 before the WebSocket opens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import aiohttp
from aiohttp import web

from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.grpc.auth import REFUSED_TEXT, key_matches

logger = logging.getLogger(__name__)

#: HTTP header of the upgrade request carrying the cluster key (see ``auth.py``).
CLUSTER_KEY_HEADER = "X-Exo-Cluster-Key"
#: Path of the ring endpoint.
RING_PATH = "/exo/ring"
#: HTTP status of a refused cluster key (its text: ``auth.REFUSED_TEXT``).
REFUSED_STATUS = 401


class _Session(Protocol):
    """What the server needs of ``exo.networking.grpc.server.RingSession``."""

    def handle_bytes(self, data: bytes) -> Awaitable[pb.RingAck | None]: ...


class RingSocketServer:
    """Serves ring messages over WebSockets on ``host:port`` (0: a free port, readable from
    ``.port`` after ``start()``).

    Args:
        session_factory: returns a new ``RingSession`` (``exo.networking.grpc.server``) per
            connection: its ``handle(message)`` gives the ack to send, or None.
        host: the address to bind (the gRPC server's).
        port: TCP port, 0 for any free one.
        cluster_key: when set, an upgrade request without it in ``CLUSTER_KEY_HEADER`` gets 401.
        max_message_bytes: largest frame accepted, in bytes.
    """

    def __init__(self, session_factory: Callable[[], _Session], host: str, port: int, cluster_key: str | None,
                 max_message_bytes: int) -> None:
        self._session_factory = session_factory
        self.host = host
        self.port = port
        self._key = cluster_key
        self._max = max_message_bytes
        self._runner: web.ServerRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()

    async def start(self) -> None:
        """Bind and serve. Raises OSError when the address cannot be bound."""
        runner = web.ServerRunner(web.Server(self._handle, access_log=None), handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host.strip("[]"), self.port, reuse_port=False)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Close every connection and stop listening. Does nothing if not started."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for ws in list(self._sockets):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"node stopping")
        await runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path != RING_PATH:
            return web.Response(status=404, text=f"not found: {request.path}")
        if self._key is not None and not key_matches(self._key, request.headers.get(CLUSTER_KEY_HEADER)):
            logger.warning("ring socket from %s refused: %s", request.remote, REFUSED_TEXT)
            return web.Response(status=REFUSED_STATUS, text=REFUSED_TEXT)
        ws = web.WebSocketResponse(max_msg_size=self._max)
        await ws.prepare(request)
        self._sockets.add(ws)
        session = self._session_factory()
        try:
            async for frame in ws:
                if frame.type != aiohttp.WSMsgType.BINARY:
                    await ws.close(code=aiohttp.WSCloseCode.UNSUPPORTED_DATA, message=b"ring frames are binary RingMessages")
                    break
                ack = await session.handle_bytes(frame.data)
                if ack is not None:
                    await ws.send_bytes(ack.SerializeToString())
        except ConnectionError as e:  # the peer went away while we answered
            logger.debug("a ring socket from %s broke: %s", request.remote, e)
        except asyncio.CancelledError:
            logger.debug("a ring socket ended by cancellation")
        finally:
            self._sockets.discard(ws)
        return ws


class RingSocketCall:
    """The client end of one ring WebSocket, shaped like the gRPC stream call that
    ``_RingStream`` (``exo.networking.grpc.peer_handle``) drives: ``write``, the ``acks``,
    ``close``, ``done``."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._session = session
        self._ws = ws

    @classmethod
    async def connect(cls, host: str, port: int, cluster_key: str | None, max_message_bytes: int,
                      timeout: float) -> "RingSocketCall":
        """Open ``ws://host:port/exo/ring``, within ``timeout`` seconds.

        Raises:
            PermissionError: the peer refused the cluster key (HTTP 401).
            ConnectionError: the peer is not reachable there, or answered something else.
        """
        headers = {CLUSTER_KEY_HEADER: cluster_key} if cluster_key else {}
        session = aiohttp.ClientSession()
        try:
            ws = await asyncio.wait_for(
                session.ws_connect(f"http://{host}:{port}{RING_PATH}", headers=headers, max_msg_size=max_message_bytes,
                                   timeout=aiohttp.ClientWSTimeout(ws_close=timeout), autoping=True),
                timeout)
        except BaseException as e:
            await session.close()
            if isinstance(e, aiohttp.WSServerHandshakeError):
                if e.status == REFUSED_STATUS:
                    raise PermissionError(REFUSED_TEXT) from e
                raise ConnectionError(f"ring socket at {host}:{port}: HTTP {e.status} {e.message}") from e
            if isinstance(e, (aiohttp.ClientError, OSError, asyncio.TimeoutError)):
                raise ConnectionError(f"ring socket at {host}:{port}: {type(e).__name__}: {e}") from e
            raise
        return cls(session, ws)

    async def ready(self) -> None:
        """Nothing to wait for: the peer accepted the cluster key in the handshake."""

    async def write(self, message: pb.RingMessage) -> None:
        """Send one message. Raises ConnectionError when the socket is closed."""
        try:
            await self._ws.send_bytes(message.SerializeToString())
        except (aiohttp.ClientError, OSError, RuntimeError) as e:
            raise ConnectionError(f"the ring socket broke: {e}") from e

    async def acks(self) -> AsyncIterator[pb.RingAck]:
        """The peer's acks until the socket closes. Raises ConnectionError when it broke."""
        async for frame in self._ws:
            if frame.type == aiohttp.WSMsgType.BINARY:
                yield pb.RingAck.FromString(frame.data)
            elif frame.type == aiohttp.WSMsgType.ERROR:
                raise ConnectionError(f"the ring socket broke: {self._ws.exception()}")

    def done(self) -> bool:
        return self._ws.closed

    async def close(self) -> None:
        try:
            await self._ws.close()
        finally:
            await self._session.close()
