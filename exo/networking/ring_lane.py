"""The ring lane: ring messages over a plain TCP connection that threads read and write.

A decode step of a lone request on a ring crosses every node in turn, and on the asyncio path
each crossing wakes three threads one after another: the event loop on the message, the
engine's worker for the step, the loop again for its output. On a 2-core machine each wake-up
costs 0.1-0.25 ms, and a 2-node ring spent ~1.7 ms a token on them (``python -m bench.run``'s
ring tables). On the lane the thread that reads a message runs the step itself
(``Node.step_now``) and writes the next message: one wake-up per crossing.

Frames are a 4-byte big-endian length and that many bytes. The client opens with one frame
holding the cluster key (empty without one); the server answers one byte, ``ACCEPTED`` or
``REFUSED``, and closes on a refusal. Then each client frame is a serialized ``RingMessage``,
each server frame a ``RingAck``, with the meaning they have on the gRPC ``Stream`` call (see
``RingSession`` in ``exo.networking.grpc.server``): messages are sent ``errors_only``; a failing
one is answered with its status, and an OK ack now and then confirms every earlier message.
When the connection ends, every message not yet confirmed fails with ``ConnectionError``.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable

from google.protobuf.message import DecodeError

from exo.networking.grpc import node_service_pb2 as pb
from exo.networking.grpc.auth import REFUSED_TEXT, key_matches

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
#: The server's answer to a cluster key it accepts, and to one it refuses.
ACCEPTED, REFUSED = b"\x01", b"\x00"
#: Most messages sent without waiting (``on_error``) that a ring stream or lane remembers until
#: the peer confirms them; beyond it the oldest is forgotten, and a failure of it goes unreported
#: there (the origin's stall check still notices a lost step).
MAX_UNCONFIRMED = 4096
#: Longest a send or the handshake may block, in seconds.
SOCKET_TIMEOUT = 30.0
#: Longest ``stop`` waits for a connection's thread to finish, in seconds.
JOIN_TIMEOUT = 5.0


def ring_lane_by_default() -> bool:
    """Whether nodes serve ring lanes and peers take them (``EXO_RING_LANE=0`` turns both off,
    e.g. to compare with the ring WebSocket)."""
    return os.environ.get("EXO_RING_LANE", "1") != "0"


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes from ``sock``; None when the peer closed before the first byte. Raises
    ConnectionError when it closed after it, OSError when the socket failed."""
    if n == 0:
        return b""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return None
            raise ConnectionError(f"the lane closed in the middle of a frame ({got} of {n} bytes)")
        got += k
    return bytes(buf)


def read_frame(sock: socket.socket, max_bytes: int) -> bytes | None:
    """One frame's bytes; None at a clean end of the connection.

    Raises:
        ConnectionError: the connection ended inside a frame, or a frame is longer than
            ``max_bytes`` bytes (the stream cannot be resynchronised).
        OSError: the socket failed.
    """
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    (n,) = _HEADER.unpack(header)
    if n > max_bytes:
        raise ConnectionError(f"a lane frame of {n} bytes exceeds the limit of {max_bytes}")
    data = _recv_exact(sock, n)
    if data is None:
        raise ConnectionError("the lane closed after a frame header")
    return data


def write_frame(sock: socket.socket, data: bytes) -> None:
    """Write one frame (the caller serialises writers). Raises OSError when the socket fails."""
    sock.sendall(_HEADER.pack(len(data)) + data)


OnError = Callable[[BaseException | pb.RingAck], None]


class Unconfirmed:
    """The ``on_error`` of each message sent ``errors_only`` that the peer has not confirmed,
    by seq: the bookkeeping of a ring stream (``exo.networking.grpc.peer_handle``) and of a
    ring lane. The peer handles a connection's messages in order, so an ack settles its own
    message and every earlier one. Holds ``MAX_UNCONFIRMED`` at most, forgetting the oldest.
    Not thread-safe: the owner serialises the calls."""

    def __init__(self) -> None:
        self._by_seq: OrderedDict[int, OnError] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_seq)

    def add(self, seq: int, on_error: OnError) -> None:
        """Remember the message ``seq`` (seqs rise)."""
        self._by_seq[seq] = on_error
        while len(self._by_seq) > MAX_UNCONFIRMED:
            self._by_seq.popitem(last=False)

    def discard(self, seq: int) -> None:
        """Forget the message ``seq`` (it was never sent)."""
        self._by_seq.pop(seq, None)

    def settle(self, ack: pb.RingAck) -> OnError | None:
        """Settle ``ack.seq`` and every earlier message; the ``on_error`` to call with ``ack``
        when the acked message failed (a code other than OK), else None."""
        on_error = self._by_seq.pop(ack.seq, None)
        while self._by_seq and next(iter(self._by_seq)) < ack.seq:
            self._by_seq.popitem(last=False)
        return on_error if ack.code != 0 else None

    def take_all(self) -> list[OnError]:
        """Forget every message; their ``on_error``, for the caller to call with the
        connection's error."""
        taken, self._by_seq = list(self._by_seq.values()), OrderedDict()
        return taken


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class RingLane:
    """The client end of one lane: ``send`` from any thread, acks read by a thread of its own.

    ``on_error`` callbacks run on that reader thread (or on the thread calling ``close``): they
    must only hand the error over (e.g. ``loop.call_soon_threadsafe``).
    """

    def __init__(self, sock: socket.socket, max_message_bytes: int, name: str = "") -> None:
        self._sock = sock
        self._max = max_message_bytes
        self._lock = threading.Lock()
        self._seq = 0
        self._unconfirmed = Unconfirmed()
        #: Why the lane ended (None while it is open).
        self.error: BaseException | None = None
        self._reader = threading.Thread(target=self._read, name=f"ring-lane-acks-{name}", daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, host: str, port: int, cluster_key: str | None, max_message_bytes: int, timeout: float,
                name: str = "") -> "RingLane":
        """Connect to a lane server and pass its key check, within ``timeout`` seconds (blocking:
        call it in a thread from an event loop).

        Raises:
            PermissionError: the server refused the cluster key.
            ConnectionError: the server is not reachable there or broke off the handshake.
        """
        try:
            sock = socket.create_connection((host.strip("[]"), port), timeout=timeout)
        except OSError as e:
            raise ConnectionError(f"ring lane at {host}:{port}: {e}") from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            write_frame(sock, (cluster_key or "").encode())
            answer = _recv_exact(sock, 1)
        except OSError as e:
            _close(sock)
            raise ConnectionError(f"ring lane at {host}:{port}: handshake failed: {e}") from e
        if answer != ACCEPTED:
            _close(sock)
            if answer == REFUSED:
                raise PermissionError(REFUSED_TEXT)
            raise ConnectionError(f"ring lane at {host}:{port}: no answer to the handshake")
        # the reader blocks until an ack comes; a send blocks SOCKET_TIMEOUT at most (an error then)
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(SOCKET_TIMEOUT), 0))
        return cls(sock, max_message_bytes, name)

    @property
    def alive(self) -> bool:
        return self.error is None

    def send(self, message: pb.RingMessage, on_error: OnError) -> None:
        """Write ``message`` (its ``seq`` and ``errors_only`` are set here). Its failing ack, or
        the lane's error if the lane ends before the peer confirmed it, goes to ``on_error``.

        Raises:
            ConnectionError: the lane is closed or broke; the message was not sent.
        """
        with self._lock:
            if self.error is not None:
                raise ConnectionError(f"the ring lane is closed: {self.error}")
            self._seq += 1
            seq = message.seq = self._seq
            message.errors_only = True
            self._unconfirmed.add(seq, on_error)
            try:
                write_frame(self._sock, message.SerializeToString())
                return
            except OSError as e:
                self._unconfirmed.discard(seq)
                broke = ConnectionError(f"the ring lane broke: {e}")
        self._fail(broke)
        raise broke

    def _read(self) -> None:
        error: BaseException = ConnectionError("the peer closed the ring lane")
        try:
            while True:
                data = read_frame(self._sock, self._max)
                if data is None:
                    break
                ack = pb.RingAck.FromString(data)
                with self._lock:
                    on_error = self._unconfirmed.settle(ack)
                if on_error is not None:
                    on_error(ack)
        except (OSError, ConnectionError, DecodeError) as e:
            if self.error is None:
                error = ConnectionError(f"the ring lane broke: {e}")
        self._fail(error)

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
            unconfirmed = self._unconfirmed.take_all()
        for on_error in unconfirmed:
            on_error(self.error)

    def close(self) -> None:
        """Close the connection and fail the unconfirmed messages; waits for the reader thread
        (blocking: call it in a thread from an event loop)."""
        with self._lock:
            if self.error is None:
                self.error = ConnectionError("the ring lane was closed")
        _close(self._sock)
        if self._reader is not threading.current_thread():
            self._reader.join(JOIN_TIMEOUT)
        self._fail(self.error)


class LaneSession:
    """What the server needs of one connection's handler (``exo.networking.grpc.server``)."""

    def handle(self, data: bytes) -> pb.RingAck | None:
        """Handle one frame's bytes on the connection's thread; the ack to send, or None."""
        raise NotImplementedError

    def close(self) -> None:
        """The server is stopping: give up waiting for anything ``handle`` waits on (any thread)."""


class RingLaneServer:
    """Serves lanes on ``host:port`` (0: a free port, readable from ``.port`` after ``start``):
    a thread accepts connections, and a thread per connection reads its frames and hands each
    to the connection's session, in order.

    Args:
        session_factory: a new ``LaneSession`` per connection (called on the accepting thread).
        host: the address to bind (the gRPC server's).
        port: TCP port, 0 for any free one.
        cluster_key: when set, a connection must open with it.
        max_message_bytes: longest frame accepted, in bytes.
    """

    def __init__(self, session_factory: Callable[[], LaneSession], host: str, port: int, cluster_key: str | None,
                 max_message_bytes: int) -> None:
        self._session_factory = session_factory
        self.host = host
        self.port = port
        self._key = cluster_key
        self._max = max_message_bytes
        self._listener: socket.socket | None = None
        self._threads: set[threading.Thread] = set()
        self._conns: set[socket.socket] = set()
        self._sessions: set[LaneSession] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def start(self) -> None:
        """Bind and start accepting. Raises OSError when the address cannot be bound."""
        host = self.host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.bind((host, self.port))
            listener.listen(16)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._spawn(self._accept, "ring-lane-accept")

    def _spawn(self, target: Callable[..., None], name: str, *args) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads.add(t)
        t.start()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, peer = self._listener.accept()
            except OSError:
                return  # closed by stop()
            with self._lock:
                if self._stopping:
                    _close(conn)
                    return
                self._conns.add(conn)
            self._spawn(self._serve, f"ring-lane-{peer[0]}:{peer[1]}", conn, peer)

    def _serve(self, conn: socket.socket, peer: tuple) -> None:
        session: LaneSession | None = None
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(SOCKET_TIMEOUT)
            key = read_frame(conn, 4096)
            if key is None:
                return
            if self._key is not None and not key_matches(self._key, key.decode(errors="replace") or None):
                logger.warning("ring lane from %s refused: %s", peer[0], REFUSED_TEXT)
                conn.sendall(REFUSED)
                return
            conn.sendall(ACCEPTED)
            conn.settimeout(None)
            session = self._session_factory()
            with self._lock:
                if self._stopping:
                    return
                self._sessions.add(session)
            while True:
                data = read_frame(conn, self._max)
                if data is None:
                    return
                ack = session.handle(data)
                if ack is not None:
                    write_frame(conn, ack.SerializeToString())
        except (OSError, ConnectionError) as e:
            if not self._stopping:
                logger.debug("a ring lane from %s broke: %s", peer[0], e)
        except Exception:
            logger.exception("a ring lane from %s failed", peer[0])
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
                if session is not None:
                    self._sessions.discard(session)
            _close(conn)

    def stop(self) -> None:
        """Stop accepting, close every connection and wait for their threads (blocking: call
        it in a thread from an event loop, whose sessions may be waiting on it)."""
        with self._lock:
            self._stopping = True
            listener, self._listener = self._listener, None
            conns = list(self._conns)
            threads = list(self._threads)
            sessions = list(self._sessions)
        if listener is not None:
            _close(listener)
        for session in sessions:
            session.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            if t is not threading.current_thread():
                t.join(JOIN_TIMEOUT)
