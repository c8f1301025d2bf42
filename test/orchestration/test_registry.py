"""The request registry's bounds: entries expire after the TTL, the oldest go over the bound,
and an entry in use (an origin request in flight, a step computing, a delivery under way) stays."""

from __future__ import annotations

import asyncio

import pytest

from exo.orchestration.registry import RequestRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_ended_and_idle_entries_expire_after_the_ttl():
    clock = Clock()
    reg = RequestRegistry(max_entries=100, ttl=10.0, clock=clock)
    reg.end("ended")
    reg.entry("idle").epoch = 3
    clock.now = 5.0
    reg.entry("recent").epoch = 0
    clock.now = 10.5
    reg.entry("new")  # a new entry sweeps the expired ones
    assert reg.get("ended") is None and reg.get("idle") is None
    assert reg.latest_epoch("recent") == 0 and len(reg) == 2


def test_the_least_recently_touched_go_first_over_the_bound():
    clock = Clock()
    reg = RequestRegistry(max_entries=3, ttl=1e9, clock=clock)
    for i, rid in enumerate("abc"):
        clock.now = float(i)
        reg.entry(rid)
    clock.now = 3.0
    reg.entry("a")  # touched: now the newest
    reg.entry("d")
    assert reg.get("b") is None and {r for r in "acd" if reg.get(r) is not None} == set("acd")


@pytest.mark.asyncio(loop_scope="session")
async def test_entries_in_use_are_never_evicted():
    clock = Clock()
    reg = RequestRegistry(max_entries=1, ttl=1.0, clock=clock)
    reg.add_origin("origin", object())  # type: ignore[arg-type]
    reg.begin_step("computing")
    reg.entry("delivering").delivery = asyncio.get_running_loop().create_future()
    clock.now = 100.0
    reg.entry("new")
    assert all(reg.get(r) is not None for r in ("origin", "computing", "delivering", "new"))
    assert reg.computing_ids() == {"computing"} and len(reg.origins()) == 1
    reg.finish_origin("origin")
    reg.end_step("computing")
    reg.get("delivering").delivery.set_result(None)
    assert reg.is_ended("origin") and reg.computing_ids() == set()
    clock.now = 200.0
    reg.entry("newer")
    assert len(reg) == 1 and reg.get("newer") is not None
