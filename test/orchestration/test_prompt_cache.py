"""The prompt cache (issue 22): a chat's next turn reuses the KV cache its previous turn left on
every node, and answers exactly as without it; on one node, on a 2-node ring whose long prompt
flows down the ring in pieces, after a node missed its entry, after a failover; within its
budget; dropped with a shard change; reported by the three API dialects.

Real nodes: torch engine, SmolLM2-135M, gRPC and mDNS on loopback.
"""

from __future__ import annotations

import aiohttp
import anthropic
import numpy as np
import ollama
import openai
import pytest

from exo.inference.generation import GenerationOptions
from exo.inference.prompt_cache import PromptCacheMiss
from exo.inference.shard import Shard
from exo.orchestration.worker import PREFILL_CHUNK

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
GiB = 1 << 30
#: What SmolLM2's chat template adds after an answer for the user's next turn.
NEXT_TURN = "<|im_end|>\n<|im_start|>user\nAnd what follows from that?<|im_end|>\n<|im_start|>assistant\n"
STORY = ("The lighthouse keeper counted the ships every night and wrote their names in a book that nobody "
         "read, until a storm brought a ship whose name was already written on the last page. ")


async def _run(node, ids: list[int], n: int, request_id: str | None = None) -> tuple[list[int], int]:
    """``n`` greedy tokens of ``ids`` (EOS ignored) and the prompt tokens taken from the cache."""
    tokens, cached = [], 0
    options = GenerationOptions(max_tokens=n, temperature=0.0, stop_token_ids=())
    async for r in node.generate(MODEL, ids, options, request_id):
        tokens += r.tokens
        cached = max(cached, r.cached_tokens)
    return tokens, cached


async def _first_turn(node, repeats: int) -> list[int]:
    tok = await node.get_tokenizer(MODEL)
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": STORY * repeats + "Go on."}]))


async def _next_turn(node, ids: list[int], answer: list[int]) -> list[int]:
    tok = await node.get_tokenizer(MODEL)
    return ids + answer + tok.encode(NEXT_TURN)


def _caches(nodes) -> list:
    return [n.node.engine.prompt_cache for n in nodes]


async def test_next_turn_on_one_node_reuses_the_first_and_answers_as_without(single_node_api):
    node = single_node_api.node
    node.engine.prompt_cache.clear()  # earlier tests' prompts share the template's system prompt
    first = await _first_turn(node, 2)
    answer, cached = await _run(node, first, 8)
    assert cached == 0
    second = await _next_turn(node, first, answer)
    with_cache, cached = await _run(node, second, 8)
    assert cached == len(first) + len(answer) - 1  # all the first turn's KV cache holds (its last token was not fed back)
    again, cached_again = await _run(node, first, 8)  # the same prompt again: all but its last token
    assert (again, cached_again) == (answer, len(first) - 1)
    node.engine.prompt_cache.clear()
    without, cached = await _run(node, second, 8)
    assert (without, cached) == (with_cache, 0)


async def test_next_turn_on_a_ring_reuses_every_node_s_entry_and_a_miss_is_replayed(two_node_cluster):
    """A first turn longer than ``PREFILL_CHUNK`` flows down the ring in pieces; the next turn
    takes the prefix from both nodes' caches; when the second node lost its entry, the origin
    replays the prefill without the cache, and the answer is the same every time."""
    node = two_node_cluster[0].node
    for c in _caches(two_node_cluster):
        c.clear()
    first = await _first_turn(node, 8)
    assert len(first) > PREFILL_CHUNK
    answer, _ = await _run(node, first, 6)
    assert all(len(c) == 1 for c in _caches(two_node_cluster))  # each node keeps its own layers' keys and values
    second = await _next_turn(node, first, answer)
    with_cache, cached = await _run(node, second, 6)
    assert cached == len(first) + len(answer) - 1
    for c in _caches(two_node_cluster):
        c.clear()
    without, cached = await _run(node, second, 6)
    assert (without, cached) == (with_cache, 0)
    _caches(two_node_cluster)[1].clear()  # the second node lost what the first will pick
    replayed, cached = await _run(node, await _next_turn(node, first, answer), 6)
    assert (replayed, cached) == (with_cache, 0)


async def test_the_cache_stays_within_its_budget_and_a_shard_change_drops_it():
    from exo.inference.torch.engine import TorchInferenceEngine

    budget = 4 * 2**20
    engine = TorchInferenceEngine(device="cpu", prompt_cache_bytes=budget)
    try:
        shard = Shard(MODEL, 0, 1, 30)  # two layers: each entry is one 256-token block of two layers' keys and values
        await engine.ensure_shard(shard)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(100, 40000, size=int(rng.integers(4, 12))).tolist() for _ in range(200)]
        for i, ids in enumerate(prompts):
            await engine.infer_tensor(f"p{i}", shard, np.asarray([ids]), 0)
            await engine.keep_prefix(f"p{i}", ids)
            assert engine.prompt_cache.nbytes <= budget
        assert 1 < len(engine.prompt_cache) < 200 and not engine.cached_request_ids()
        assert engine.match_prefix(prompts[-1] + [7]) == ("p199", len(prompts[-1]))
        assert engine.match_prefix(prompts[0])[1] < len(prompts[0])  # the oldest went first
        await engine.ensure_shard(Shard(MODEL, 0, 2, 30))  # other layers: every entry is stale
        assert len(engine.prompt_cache) == 0 and engine.prompt_cache.nbytes == 0
        with pytest.raises(PromptCacheMiss):
            engine.continue_from_prefix("next", "p199", 3)
    finally:
        await engine.close()


async def test_after_a_failover_the_answers_equal_one_node_s_and_the_new_ring_caches_again(single_node_api):
    from test_failover import cluster, kill

    reference = single_node_api.node
    async with cluster({"a": 3 * GiB, "b": 2 * GiB, "c": 1 * GiB}, engine="torch") as nodes:
        a = nodes["a"].node
        first = await _first_turn(a, 2)
        answer, _ = await _run(a, first, 6)
        second = await _next_turn(a, first, answer)
        tokens, cached = [], 0
        async for r in a.generate(MODEL, second, GenerationOptions(max_tokens=12, temperature=0.0, stop_token_ids=())):
            tokens += r.tokens
            cached = max(cached, r.cached_tokens)
            if len(tokens) == 4 and "c" in nodes:
                await kill(nodes.pop("c"))  # the last node dies mid-answer: a and b take its layers over
        assert cached >= len(first)
        third = await _next_turn(a, second, tokens)
        after, cached_after = await _run(a, third, 6)
        assert cached_after >= len(second)  # the new ring's nodes kept the replayed turn
        reference.engine.prompt_cache.clear()
        assert tokens == (await _run(reference, second, 12))[0]
        assert after == (await _run(reference, third, 6))[0]


async def test_every_dialect_reports_the_cached_prompt_tokens(single_node_api):
    messages = [{"role": "user", "content": "Name three rivers of Europe."}]
    single_node_api.node.engine.prompt_cache.clear()  # earlier prompts share the template's system prompt
    oa = openai.AsyncOpenAI(base_url=single_node_api.base_url, api_key="unused", max_retries=0)
    usage = [(await oa.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)).usage
             for _ in range(2)]
    assert usage[0].prompt_tokens_details.cached_tokens == 0
    assert usage[1].prompt_tokens_details.cached_tokens == usage[1].prompt_tokens - 1
    an = anthropic.AsyncAnthropic(base_url=single_node_api.api_url, api_key="unused", max_retries=0)
    msg = await an.messages.create(model=MODEL, messages=messages, max_tokens=2)
    assert msg.usage.cache_read_input_tokens > 0 and msg.usage.cache_creation_input_tokens == 0
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == usage[1].prompt_tokens
    chat = await ollama.AsyncClient(host=single_node_api.api_url).chat(
        model=MODEL, messages=messages, options={"num_predict": 2, "temperature": 0})
    assert chat.prompt_eval_count == usage[1].prompt_tokens  # the whole prompt, as Ollama counts it
    # the client drops prompt_eval_cached_count (its model predates the field): read the JSON
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{single_node_api.api_url}/api/chat", json={
                "model": MODEL, "messages": messages, "stream": False, "options": {"num_predict": 2, "temperature": 0}}) as resp:
            body = await resp.json()
    assert body["prompt_eval_cached_count"] == usage[1].prompt_tokens - 1
