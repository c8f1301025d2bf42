"""What crosses the wire: a packet capture on the loopback interface during a real 2-node
generation (torch engine, SmolLM2-135M split over two nodes, gRPC between them).

With a cluster secret the capture holds neither the prompt's text, nor its token ids, nor any
64-byte run of the float32 hidden states the first node sent to the second. As a control, the
same generation without a secret is captured too, and there the token ids and the hidden states
ARE found: the check can see them when they are in clear.

The capture is a raw AF_PACKET socket bound to "lo" (the suite runs in a network namespace of
its own, ``unshare -n``); the test skips when the socket cannot be opened (no CAP_NET_RAW).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from exo.inference.generation import GenerationOptions
from exo.models.sources import STORE

from helpers import loopback_config, unused_loopback_port, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
PROMPT = "Describe the secret garden behind the lighthouse of Saint-Malo in one sentence."
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
RUN = 64  # bytes: the length of an activation run the capture must not contain
CHUNK = RUN // 2  # every 64-byte run of a buffer contains a whole CHUNK-aligned 32-byte chunk


class LoopbackCapture:
    """TCP payloads seen on "lo" while running, per connection direction, reassembled by
    sequence number (each packet once: loopback also shows the outgoing copy, which is dropped)."""

    def __init__(self, ports: set[int]) -> None:
        self.ports = ports
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", socket.SO_RCVBUF), 64 << 20)
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.1)
        self.flows: dict[tuple[int, int], dict[int, bytes]] = {}
        self.packets = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lo-capture", daemon=True)

    def __enter__(self) -> "LoopbackCapture":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, addr = self.sock.recvfrom(1 << 17)
            except socket.timeout:
                continue
            if addr[2] == PACKET_OUTGOING or len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
                continue
            ip = frame[14:]
            ihl, proto, total = (ip[0] & 0x0F) * 4, ip[9], struct.unpack("!H", ip[2:4])[0]
            if proto != 6:
                continue
            tcp = ip[ihl:total]
            sport, dport, seq = struct.unpack("!HHI", tcp[:8])
            payload = tcp[(tcp[12] >> 4) * 4:]
            if payload and (sport in self.ports or dport in self.ports):
                self.flows.setdefault((sport, dport), {})[seq] = payload
                self.packets += 1

    def streams(self) -> list[bytes]:
        """Each direction's bytes in order."""
        return [b"".join(p for _, p in sorted(segs.items())) for segs in self.flows.values()]


def _chunks(data: bytes) -> set[bytes]:
    """The CHUNK-aligned chunks of ``data`` that carry information (not runs of one byte)."""
    out = set()
    for i in range(0, len(data) - CHUNK + 1, CHUNK):
        c = data[i:i + CHUNK]
        if len(set(c)) > 4:
            out.add(c)
    return out


def _found_chunks(streams: list[bytes], chunks: set[bytes]) -> set[bytes]:
    """The chunks that occur anywhere in the streams."""
    found = set()
    for s in streams:
        for i in range(len(s) - CHUNK + 1):
            c = s[i:i + CHUNK]
            if c in chunks:
                found.add(c)
    return found


def _has_64_byte_run(streams: list[bytes], data: bytes) -> bool:
    """Whether any 64-byte run of ``data`` occurs in a stream (exact: every such run contains an
    aligned 32-byte chunk, which the fast scan finds first)."""
    hits = _found_chunks(streams, _chunks(data))
    if not hits:
        return False
    for i in range(0, len(data) - CHUNK + 1, CHUNK):
        if data[i:i + CHUNK] in hits:
            for start in range(max(0, i - CHUNK), min(i, len(data) - RUN) + 1):
                if any(data[start:start + RUN] in s for s in streams):
                    return True
    return False


async def _generate_on_two_nodes(tmp_path: Path, secret: str | None) -> tuple[list[bytes], list[np.ndarray], list[int]]:
    """Start two torch nodes (manual discovery, loopback), run a generation entering at the node
    that does NOT hold layer 0 (so the prompt's token ids cross the ring), capturing "lo";
    return the captured streams, the hidden states the first-layer node's engine produced,
    and the prompt's token ids."""
    from exo.orchestration.launcher import start_node

    tag = uuid.uuid4().hex[:6]
    ids_ports = {f"cap{tag}-{i}": unused_loopback_port() for i in (0, 1)}
    peers = tmp_path / f"peers-{tag}.json"
    peers.write_text(json.dumps({"peers": {n: {"address": "127.0.0.1", "port": p} for n, p in ids_ports.items()}}))
    nodes = []
    try:
        for node_id, port in ids_ports.items():
            nodes.append(await start_node(loopback_config(
                node_id=node_id, node_port=port, discovery_module="manual", discovery_config_path=str(peers),
                cluster_secret=secret, inference_engine="torch", serve_api=False, health_check_interval=0.2,
                response_timeout=600)))  # the first load may build the engine's native kernels (a minute)
        card = STORE.card(MODEL)

        def ring_formed() -> bool:
            rings = [n.node.partition(card) for n in nodes]
            return all(len(r) == 2 for r in rings) and rings[0] == rings[1]

        await wait_for(ring_formed, timeout=20)
        ring = nodes[0].node.partition(card)
        first = next(n for n in nodes if n.node.id == next(p.node_id for p in ring if p.start_layer == 0))
        entry = next(n for n in nodes if n is not first)
        tok = await entry.node.get_tokenizer(MODEL)
        prompt_ids = tok.encode(PROMPT)
        # warm up (loads both shards) before capturing, so the capture holds the generation only
        async for _ in entry.node.generate(MODEL, tok.encode("Hi"), GenerationOptions(max_tokens=1, temperature=0.0)):
            pass
        engine = first.node.engine_for(MODEL)
        sent: list[np.ndarray] = []
        infer = engine.infer_tensor

        async def recording_infer(request_id, shard, x, position):  # observes, changes nothing
            out = await infer(request_id, shard, x, position)
            sent.append(np.array(out, copy=True))
            return out

        engine.infer_tensor = recording_infer
        try:
            with LoopbackCapture(set(ids_ports.values())) as capture:
                async for _ in entry.node.generate(MODEL, prompt_ids, GenerationOptions(max_tokens=4, temperature=0.0)):
                    pass
                await asyncio.sleep(0.2)  # the last acks
        finally:
            del engine.infer_tensor
        assert capture.packets > 0
        return capture.streams(), sent, prompt_ids
    finally:
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)


def _can_capture() -> str | None:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)).close()
    except (OSError, AttributeError) as e:
        return f"cannot open a raw AF_PACKET socket on lo ({e}); run the suite as root in a network namespace"
    return None


@pytest.mark.skipif(_can_capture() is not None, reason=_can_capture() or "")
async def test_capture_of_a_tls_ring_holds_no_prompt_and_no_activations(tmp_path: Path) -> None:
    plain_streams, plain_sent, prompt_ids = await _generate_on_two_nodes(tmp_path, None)
    tls_streams, tls_sent, tls_prompt_ids = await _generate_on_two_nodes(tmp_path, f"capture-{uuid.uuid4().hex}")
    assert prompt_ids == tls_prompt_ids
    ids_bytes = np.asarray(prompt_ids, dtype=np.int64).tobytes()
    assert len(ids_bytes) >= RUN

    # control: in clear, the check sees the token ids and the activations
    plain_hidden = b"".join(a.astype(np.float32).tobytes() for a in plain_sent if a.ndim == 3)
    assert len(plain_hidden) >= len(prompt_ids) * 576 * 4  # at least the prefill's hidden states
    assert any(ids_bytes in s for s in plain_streams)
    assert _has_64_byte_run(plain_streams, plain_hidden)

    # with the secret: none of it
    tls_hidden = b"".join(a.astype(np.float32).tobytes() for a in tls_sent if a.ndim == 3)
    assert tls_hidden[:len(prompt_ids) * 576 * 4] == plain_hidden[:len(prompt_ids) * 576 * 4]  # same prefill
    assert sum(map(len, tls_streams)) > len(tls_hidden)  # the activations did cross, encrypted
    for s in tls_streams:
        assert PROMPT.encode("utf-8") not in s
        assert PROMPT.encode("utf-8")[:24] not in s
        assert ids_bytes[:RUN] not in s and ids_bytes not in s
    assert not _has_64_byte_run(tls_streams, tls_hidden)
