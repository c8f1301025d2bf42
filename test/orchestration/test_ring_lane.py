"""The ring lane (``exo.networking.ring_lane``) between two torch nodes: a lone request's decode
steps run on the lanes' threads (``Node.step_now``), and the tokens are those of one node
holding every layer, whichever node is the origin."""

from __future__ import annotations

import pytest
from helpers import wait_for

from exo.inference.generation import GenerationOptions
from exo.models.sources import STORE

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
MESSAGES = [{"role": "user", "content": "Name three colours of the sea."}]
MAX_TOKENS = 16


async def _greedy(node, ids: list[int]) -> list[int]:
    out = []
    async for r in node.generate(MODEL, ids, GenerationOptions(max_tokens=MAX_TOKENS, temperature=0.0)):
        out.extend(r.tokens)
    return out


async def test_a_lone_request_decodes_on_the_ring_lane_like_one_node(two_node_cluster, single_node_api):
    tok = await single_node_api.node.get_tokenizer(MODEL)
    ids = tok.encode(tok.apply_chat_template(MESSAGES))
    expected = await _greedy(single_node_api.node, ids)
    nodes = [n.node for n in two_node_cluster]
    ring = nodes[0].partition(STORE.card(MODEL))
    first = next(n for n in nodes if n.id == ring[0].node_id)
    last = next(n for n in nodes if n.id == ring[-1].node_id)
    assert await _greedy(first, ids) == expected  # opens the lanes, if no earlier test did
    for origin in (first, last):  # the result rides with the next step / is delivered where it was sampled
        before = {n.id: n.lane_steps for n in nodes}
        assert await _greedy(origin, ids) == expected
        # every decode step on both nodes ran on a lane's thread: no hand-off to a loop or worker
        for n in nodes:
            assert n.lane_steps - before[n.id] >= len(expected) - 1, (origin.id, n.id)
    for n in nodes:
        await wait_for(lambda n=n: not n.engine.cached_request_ids(), timeout=10)
