"""Shared pytest setup for the whole suite: the network rule, and real nodes shared by tests.

Nodes started here are real: torch engine, real SmolLM2-135M weights, real gRPC on 127.0.0.1,
real zeroconf bound to 127.0.0.1. They are session-scoped because loading a model takes seconds.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import AsyncIterator

import pytest
import pytest_asyncio

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference model loads from the shipped GGUF only

import network_guard  # noqa: E402
from network_guard import check_loopback_interfaces  # noqa: E402,F401  (re-exported for tests)

MODEL = "smollm2-135m"


def pytest_sessionstart(session) -> None:
    network_guard.install()


# defined in helpers.py: test modules import them from there (``from conftest import`` finds
# whichever conftest.py was loaded last, e.g. test/api/conftest.py)
from helpers import SESSION_TAG, NodeUnderTest, loopback_config  # noqa: E402,F401  (re-exported)


@pytest.fixture(scope="session")
def tiny_sd_pipeline(tmp_path_factory) -> Path:
    """The directory of a tiny random-weight Stable Diffusion pipeline (``tiny_diffusion``),
    built once per session; skipped without diffusers (the ``images`` extra)."""
    pytest.importorskip("diffusers")
    from tiny_diffusion import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("diffusion"))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def single_node_api() -> AsyncIterator[NodeUnderTest]:
    """One node alone (no discovery) holding all 30 layers, with its API."""
    from exo.orchestration.launcher import start_node

    running = await start_node(loopback_config(discovery_module="none"))
    try:
        yield NodeUnderTest(running)
    finally:
        await running.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def two_node_cluster() -> AsyncIterator[list[NodeUnderTest]]:
    """Two nodes on loopback that found each other over mDNS and split the layers between them."""
    from helpers import wait_for

    from exo.models.sources import STORE
    from exo.orchestration.launcher import start_node

    nodes = []
    try:
        for name in ("ring-a", "ring-b"):
            nodes.append(await start_node(loopback_config(node_id=f"{name}-{SESSION_TAG}")))
        card = STORE.card(MODEL)

        def ring_formed() -> bool:
            rings = [n.node.partition(card) for n in nodes]
            return all(len(r) == 2 for r in rings) and rings[0] == rings[1]

        await wait_for(ring_formed, timeout=20)
        yield [NodeUnderTest(n) for n in nodes]
    finally:
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)


@pytest.fixture(scope="session")
def tiny_hub(tmp_path_factory):
    """The local hub with a tiny llama any test may publish under its own repo names
    (``hub_models.TinyHub``); stopped at the end of the session."""
    from hub_models import build_tiny_hub

    hub = build_tiny_hub(tmp_path_factory.mktemp("tiny-hub"))
    try:
        yield hub
    finally:
        hub.server.release()
        hub.server.stop()
