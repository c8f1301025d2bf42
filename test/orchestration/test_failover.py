"""Failover: a request survives a node leaving mid-generation (and a node joining), on real nodes
(real gRPC on loopback, real zeroconf bound to 127.0.0.1) running the deterministic dummy engine,
whose tokens tell whether every layer ran exactly once and every KV cache was rebuilt correctly.

Each test's cluster has its own random cluster secret and node ids, so concurrent test sessions
on the same machine never see each other's nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest
from helpers import make_request_context, wait_for

from exo.inference.dummy import expected_tokens
from exo.inference.generation import GenerationOptions
from exo.inference.sampling import Sampler
from exo.models.sources import STORE
from exo.orchestration.node import replayed_sampler
from exo.orchestration.request import TokenResult

asyncio_test = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
GiB = 1 << 30
PROMPT = [40, 41, 42, 43, 44]


@contextlib.asynccontextmanager
async def cluster(memories: dict[str, int], token_delay: float = 0.01, health_check_interval: float = 0.3,
                  engine: str = "dummy", **engine_options) -> AsyncIterator[dict]:
    """Nodes of ``engine`` (the dummy by default) named by ``memories`` (short name -> bytes),
    found over mDNS on loopback; yields short name -> RunningNode once every node sees the same
    ring of them all. ``engine_options`` go to every node's engine (e.g. the dummy's
    ``vocab_size``; the dummy also gets ``token_delay``)."""
    from helpers import loopback_config

    from exo.orchestration.launcher import start_node

    secret, tag = uuid.uuid4().hex, uuid.uuid4().hex[:6]
    options = {"token_delay": token_delay, **engine_options} if engine == "dummy" else engine_options
    started: dict = {}
    try:
        results = await asyncio.gather(*(
            start_node(loopback_config(node_id=f"fo{tag}-{name}", discovery_module="mdns", cluster_secret=secret,
                                       inference_engine=engine, inference_engine_options=options,
                                       memory=mem, serve_api=False, health_check_interval=health_check_interval))
            for name, mem in memories.items()), return_exceptions=True)
        for name, r in zip(memories, results):
            if not isinstance(r, BaseException):
                started[name] = r
        for r in results:
            if isinstance(r, BaseException):
                raise r
        await wait_for(lambda: ring_agreed(list(started.values()), len(started)), timeout=15)
        yield started
    finally:
        await asyncio.gather(*(r.stop() for r in started.values()), return_exceptions=True)


def ring_agreed(nodes, n: int) -> bool:
    card = STORE.card(MODEL)
    rings = [r.node.partition(card) for r in nodes]
    return all(len(ring) == n and ring == rings[0] for ring in rings)


async def kill(running) -> None:
    """As SIGKILL looks from outside: the gRPC server is gone at once, no mDNS goodbye is sent
    (the record outlives it), and the node's own tasks stop."""
    await running.server.stop(grace=0)
    node = running.node
    node._background.stopping = True
    for t in list(node._background.tasks):
        t.cancel()


@asyncio_test
async def test_middle_node_killed_mid_generation_the_stream_completes_unchanged():
    async with cluster({"a": 3 * GiB, "b": 2 * GiB, "c": 1 * GiB}) as nodes:
        a, b = nodes["a"].node, nodes["b"]
        ring = [(p.node_id, p.start_layer, p.end_layer) for p in a.partition(STORE.card(MODEL))]
        assert ring == [(a.id, 0, 14), (b.node.id, 15, 24), (nodes["c"].node.id, 25, 29)]
        tokens, epochs = [], []
        options = GenerationOptions(max_tokens=60, temperature=0.0)
        async for r in a.generate(MODEL, PROMPT, options, request_id="kill-middle"):
            tokens.extend(r.tokens)
            epochs.append(a._registry.origin("kill-middle").ctx.epoch)
            if len(tokens) == 20:
                await kill(b)
        assert tokens == expected_tokens(PROMPT, 60)
        assert epochs[0] == 0 and epochs[-1] >= 1
        # the new ring has no zero-layer member and does not count the dead node
        await wait_for(lambda: len(a.partition(STORE.card(MODEL))) == 2, timeout=10)
        ring = [(p.node_id, p.start_layer, p.end_layer) for p in a.partition(STORE.card(MODEL))]
        assert ring == [(a.id, 0, 22), (nodes["c"].node.id, 23, 29)]  # 22.5 : 7.5, the tie to the first


@asyncio_test
async def test_last_node_killed_the_origin_fails_over_to_the_ring_that_remains():
    async with cluster({"a": 2 * GiB, "b": 1 * GiB}) as nodes:
        a = nodes["a"].node
        options = GenerationOptions(max_tokens=40, temperature=0.7, seed=7, presence_penalty=0.5)
        tokens = []
        async for r in a.generate(MODEL, PROMPT, options, request_id="kill-last"):
            tokens.extend(r.tokens)
            if len(tokens) == 10:
                await kill(nodes["b"])
        # the dummy's logits peak so sharply that sampling picks the same token as greedy
        assert tokens == expected_tokens(PROMPT, 40)
        await wait_for(lambda: not a.engine.cached_request_ids(), timeout=5)


@asyncio_test
async def test_clean_shutdown_of_the_middle_node_during_two_concurrent_requests():
    async with cluster({"a": 3 * GiB, "b": 2 * GiB, "c": 1 * GiB}, token_delay=0.02) as nodes:
        a = nodes["a"].node
        prompts = [PROMPT, [50, 51, 52]]
        started = asyncio.Event()

        async def run(prompt):
            out = []
            async for r in a.generate(MODEL, prompt, GenerationOptions(max_tokens=40, temperature=0.0)):
                out.extend(r.tokens)
                if len(out) == 10:
                    started.set()
            return out

        tasks = [asyncio.create_task(run(p)) for p in prompts]
        await asyncio.wait_for(started.wait(), 30)
        await nodes.pop("b").stop()  # mDNS goodbye: the ring loses b while both requests run
        results = await asyncio.gather(*tasks)
        assert results == [expected_tokens(p, 40) for p in prompts]


@asyncio_test
async def test_a_node_dying_while_it_holds_the_step_is_found_by_the_stall_probe(caplog):
    # no send fails (b already has the step) and discovery would need 3 x 30 s to notice: only the
    # origin's health check of the ring after STALL_PROBE_INTERVAL seconds without a token finds it
    async with cluster({"a": 2 * GiB, "b": 1 * GiB}, token_delay=0.2, health_check_interval=30) as nodes:
        a, b = nodes["a"].node, nodes["b"]
        tokens = []
        async for r in a.generate(MODEL, PROMPT, GenerationOptions(max_tokens=8, temperature=0.0), request_id="stall"):
            tokens.extend(r.tokens)
            if len(tokens) == 3:
                # b computes step 4 and a is done handing it over
                await wait_for(lambda: bool(b.node.active_request_ids) and not a.active_request_ids, timeout=5)
                await kill(b)
        assert tokens == expected_tokens(PROMPT, 8)
        assert any("do not answer" in rec.getMessage() for rec in caplog.records)


@asyncio_test
async def test_a_node_joining_mid_generation_does_not_break_the_stream():
    async with cluster({"a": 2 * GiB, "b": 1 * GiB}, token_delay=0.02) as nodes:
        from helpers import loopback_config

        from exo.orchestration.launcher import start_node

        a = nodes["a"].node
        cfg = nodes["a"].settings.node
        tokens, joined = [], None
        try:
            async for r in a.generate(MODEL, PROMPT, GenerationOptions(max_tokens=50, temperature=0.0)):
                tokens.extend(r.tokens)
                if len(tokens) == 10 and joined is None:
                    joined = await start_node(loopback_config(
                        node_id=cfg.id[:-1] + "c", discovery_module="mdns", cluster_secret=cfg.cluster_secret,
                        inference_engine="dummy", memory=1 * GiB, serve_api=False, health_check_interval=0.3))
            assert tokens == expected_tokens(PROMPT, 50)
            await wait_for(lambda: ring_agreed([nodes["a"], nodes["b"], joined], 3), timeout=10)
        finally:
            if joined is not None:
                await joined.stop()


@asyncio_test
async def test_messages_of_an_older_epoch_are_dropped():
    async with cluster({"a": 2 * GiB}) as nodes:
        node = nodes["a"].node
        engine = node.engine
        ring = node.partition(STORE.card(MODEL))
        ctx1 = make_request_context(request_id="epochs", origin_node_id=node.id, ring=tuple(ring), epoch=1, prompt_len=3,
                                    options=GenerationOptions(max_tokens=1, temperature=0.0))
        ctx0 = make_request_context(request_id="epochs", origin_node_id=node.id, ring=tuple(ring), epoch=0, prompt_len=3,
                                    options=GenerationOptions(max_tokens=1, temperature=0.0))
        calls = engine.calls
        await node.process_prompt(ctx1, np.array([[40, 41, 42]], dtype=np.int64), 0)
        await wait_for(lambda: engine.calls == calls + 1, timeout=5)
        await node.process_prompt(ctx0, np.array([[40, 41, 42]], dtype=np.int64), 0)
        for _ in range(20):  # the dropped message must not run: give it every chance to
            await asyncio.sleep(0)
        assert engine.calls == calls + 1
        await node.end_request("epochs")


def test_replayed_sampler_continues_like_the_uninterrupted_one():
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal(300).astype(np.float32) for _ in range(30)]
    options = GenerationOptions(max_tokens=30, temperature=0.9, top_p=0.95, seed=1234, presence_penalty=0.4,
                                frequency_penalty=0.3)
    straight = Sampler(options)
    tokens = [straight.sample(lg).token for lg in logits]
    for cut in (1, 7, 20):
        first = Sampler(options)
        generated = [first.sample(lg).token for lg in logits[:cut]]
        resumed = replayed_sampler(options, generated)
        assert resumed.counts == first.counts
        assert generated + [resumed.sample(lg).token for lg in logits[cut:]] == tokens


@asyncio_test
async def test_origin_drops_results_of_an_older_epoch():
    async with cluster({"a": 2 * GiB}, token_delay=0.05) as nodes:
        node = nodes["a"].node
        gen = node.generate(MODEL, PROMPT, GenerationOptions(max_tokens=3, temperature=0.0), request_id="old-results")
        first = await gen.__anext__()
        req = node._registry.origin("old-results")
        req.ctx = req.ctx.__class__(**{**req.ctx.__dict__, "epoch": 1})  # as after a re-partition
        await node.process_result(TokenResult("old-results", [999], epoch=0))  # a late result of epoch 0
        await node.process_result(TokenResult("old-results", finish_reason="error", error="late", epoch=0))
        await node.process_result(TokenResult("old-results", [123], finish_reason="length", epoch=1))
        rest = [r async for r in gen]
        assert first.tokens and [t for r in rest for t in r.tokens] == [123]
