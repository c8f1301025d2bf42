"""PeerTracker rules with in-memory peer handles (no network)."""

from __future__ import annotations

import pytest

from exo.networking.peer_handle import PeerHandle
from exo.networking.peer_tracker import PeerTracker
from exo.topology.device_capabilities import DeviceCapabilities

from helpers import wait_for

CAPS = DeviceCapabilities("box", "cpu", 1)


class FakeHandle(PeerHandle):
    """A peer whose health is set by the test (per address)."""

    healthy: dict[str, bool] = {}

    def __init__(self, node_id: str, address: str, caps: DeviceCapabilities) -> None:
        self._id, self._address, self._caps = node_id, address, caps
        self.checks = 0
        self.disconnected = False

    def id(self) -> str:
        return self._id

    def address(self) -> str:
        return self._address

    def device_capabilities(self) -> DeviceCapabilities:
        return self._caps

    async def connect(self) -> None: ...

    async def disconnect(self) -> None:
        self.disconnected = True

    async def health_check(self) -> bool:
        self.checks += 1
        if self.healthy.get(self._address) is None:
            raise RuntimeError("broken handle")  # must be treated as unhealthy
        return self.healthy[self._address]

    async def send_prompt(self, ctx, token_ids, position, on_error=None): ...
    async def send_tensor(self, ctx, hidden_states, position, on_error=None): ...
    async def send_result(self, result, on_error=None): ...
    async def end_request(self, request_id): ...
    async def collect_topology(self, visited, max_depth): ...


@pytest.fixture
def health():
    FakeHandle.healthy = {}
    yield FakeHandle.healthy


@pytest.mark.asyncio
async def test_admission_removal_and_rejoin(health: dict[str, bool]) -> None:
    tracker = PeerTracker(FakeHandle, health_check_interval=0.02, health_check_failures=3)
    changes: list[list[str]] = []
    tracker.add_listener(lambda: changes.append([p.id() for p in tracker.peers()]))
    tracker.start()
    try:
        health["h:1"] = False
        tracker.offer("b", "h:1", CAPS)
        assert tracker.known_ids() == {"b"}
        assert await tracker.wait_for_peers(1, timeout=0.1) == []  # not admitted while unhealthy
        health["h:1"] = True
        [b] = await tracker.wait_for_peers(1, timeout=2.0)
        assert b.id() == "b" and changes == [["b"]]
        tracker.offer("b", "h:1", CAPS)  # same again: nothing changes
        assert tracker.peers() == [b] and changes == [["b"]]

        health["h:1"] = False
        await wait_for(lambda: tracker.peers() == [], timeout=2.0)
        assert b.checks >= 3 + 1  # admission + 3 consecutive failures
        del health["h:1"]  # a raising health check counts as a failure, keeps the candidate
        checks = b.checks
        await wait_for(lambda: b.checks > checks, timeout=2.0)
        assert tracker.known_ids() == {"b"} and tracker.peers() == []
        health["h:1"] = True
        await wait_for(lambda: tracker.peers() == [b], timeout=2.0)
        assert changes == [["b"], [], ["b"]]

        health["h:2"] = True
        tracker.offer("b", "h:2", CAPS)  # moved: the old handle is replaced and disconnected
        await wait_for(lambda: [p.address() for p in tracker.peers()] == ["h:2"], timeout=2.0)
        assert b.disconnected

        tracker.withdraw("b")
        assert tracker.peers() == [] and tracker.known_ids() == set()
        tracker.withdraw("b")  # unknown: no-op
    finally:
        await tracker.stop()


@pytest.mark.asyncio
async def test_wait_for_peers_returns_on_timeout_and_listener_errors_are_contained(health: dict[str, bool]) -> None:
    tracker = PeerTracker(FakeHandle, health_check_interval=0.02, health_check_failures=1)

    def bad_listener() -> None:
        raise RuntimeError("listener bug")

    tracker.add_listener(bad_listener)
    tracker.start()
    try:
        assert await tracker.wait_for_peers(1, timeout=0.05) == []
        health["h:1"] = True
        tracker.offer("b", "h:1", CAPS)
        assert len(await tracker.wait_for_peers(1, timeout=2.0)) == 1
        tracker.remove_listener(bad_listener)
        with pytest.raises(ValueError):
            tracker.remove_listener(bad_listener)
    finally:
        await tracker.stop()
    assert tracker.peers() == []


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="health_check_interval"):
        PeerTracker(FakeHandle, health_check_interval=0)
    with pytest.raises(ValueError, match="health_check_failures"):
        PeerTracker(FakeHandle, health_check_failures=0)


@pytest.mark.asyncio
async def test_stop_finishes_disconnecting_the_peers_that_just_left(health: dict[str, bool]) -> None:
    # Regression: stop() cancelled the disconnects of peers withdrawn just before, so their
    # handles could keep their connections open.
    tracker = PeerTracker(FakeHandle, health_check_interval=0.02, health_check_failures=1)
    tracker.start()
    health["h:1"] = True
    tracker.offer("b", "h:1", CAPS)
    [b] = await tracker.wait_for_peers(1, timeout=2.0)
    tracker.withdraw("b")
    await tracker.stop()
    assert b.disconnected
