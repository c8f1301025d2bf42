"""Concurrent requests through real nodes: each gets the tokens it gets alone, and on one node
their decode steps run as full batches (one forward pass for all of them)."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from exo.inference.generation import GenerationOptions

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
QUESTIONS = ["What is the capital of France?", "Name a colour.", "Say hello in Spanish, please.", "What is 2 + 2?",
             "Write one word about the sea.", "Who wrote Hamlet?", "Name a planet.", "What do bees make?"]


async def _prompts(node, n: int) -> list[list[int]]:
    tok = await node.get_tokenizer(MODEL)
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS[:n]]


async def _tokens(node, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    async for r in node.generate(MODEL, ids, GenerationOptions(max_tokens=n, temperature=0.0, stop_token_ids=())):
        out += r.tokens
    return out


async def test_concurrent_requests_on_one_node_decode_in_full_batches(single_node_api):
    node = single_node_api.node
    prompts = await _prompts(node, 8)
    alone = [await _tokens(node, p, 8) for p in prompts]
    engine = node.engine
    before = len(engine.batch_sizes)
    together = await asyncio.gather(*(_tokens(node, p, 8) for p in prompts))
    assert together == alone
    sizes = engine.batch_sizes[before:]
    # prefills run one at a time, so the first decode batches hold the requests prefilled so
    # far; after that every step of all 8 requests is one batch (not 1 + 7, alternating)
    assert statistics.median(sizes) == 8, sizes


async def test_concurrent_requests_on_a_ring_match_each_alone(two_node_cluster):
    node = two_node_cluster[0].node
    prompts = await _prompts(node, 4)
    alone = [await _tokens(node, p, 10) for p in prompts]
    together = await asyncio.gather(*(_tokens(node, p, 10) for p in prompts))
    assert together == alone
