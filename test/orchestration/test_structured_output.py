"""Grammar-constrained generation through real nodes: a JSON-schema request survives a failover
replay (dummy-engine ring, real gRPC and mDNS on loopback), a grammar that cannot be built fails
the request with a clear error, and the real SmolLM2 on the torch engine answers in the schema.

The dummy engine (with SmolLM2's vocabulary size) has logits (PEAK at its own next token, 0 elsewhere) know nothing of JSON: that
its output under the mask is valid JSON for the schema shows the constraint lives in the
sampler, so it holds for every engine.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
from test_failover import MODEL, PROMPT, GiB, cluster, kill

from exo.inference.generation import GenerationOptions
from exo.inference.grammar import json_schema_grammar, lark_grammar
from exo.orchestration.errors import GenerationError

asyncio_test = pytest.mark.asyncio(loop_scope="session")
# SmolLM2's: llguidance allows a forced key such as "ok" only as the tokenizer would spell it
# (one token, id 2231 here), so the dummy's logits must cover the whole vocabulary
VOCAB = 49152

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["ok", "kind", "n", "tags"],
    "additionalProperties": False,
}


async def _run(node, options: GenerationOptions, request_id: str, on_token=None) -> tuple[list[int], str | None, set[int]]:
    """The tokens, the finish reason and the epochs of a request from ``node``."""
    tokens, finish, epochs = [], None, set()
    async for r in node.generate(MODEL, PROMPT, options, request_id=request_id):
        tokens.extend(r.tokens)
        finish = r.finish_reason or finish
        req = node._registry.origin(request_id)
        if req is not None:
            epochs.add(req.ctx.epoch)
        if on_token is not None:
            await on_token(tokens)
    return tokens, finish, epochs


@asyncio_test
@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 11}], ids=["greedy", "seeded"])
async def test_json_schema_output_survives_a_failover_replay(sampling):
    options = GenerationOptions(max_tokens=300, grammar=json_schema_grammar(SCHEMA), **sampling)  # no stop tokens
    async with cluster({"a": 2 * GiB, "b": 1 * GiB}, vocab_size=VOCAB) as nodes:
        a = nodes["a"].node
        tok = await a.get_tokenizer(MODEL)
        reference, finish, _ = await _run(a, options, "grammar-reference")
        assert finish == "stop"  # the grammar completed and only EOS was allowed
        jsonschema.validate(json.loads(tok.decode(reference)), SCHEMA)
        assert len(reference) > 12

        killed = []

        async def kill_b_once(tokens):
            if len(tokens) >= 6 and not killed:
                killed.append(len(tokens))
                await kill(nodes["b"])  # b holds the last layers: a rebuilds the sampler from the replay

        tokens, finish, epochs = await _run(a, options, "grammar-failover", kill_b_once)
        assert killed and killed[0] < len(reference) and max(epochs) >= 1  # a replay happened mid-generation
        assert (tokens, finish) == (reference, "stop")


@asyncio_test
async def test_a_grammar_the_tokenizer_cannot_serve_fails_the_request_clearly():
    bad = lark_grammar("start: <[999999]>\n")  # a token id past the vocabulary: valid until a tokenizer sees it
    async with cluster({"a": 2 * GiB, "b": 1 * GiB}) as nodes:
        with pytest.raises(GenerationError, match="invalid grammar"):
            async with asyncio.timeout(30):
                await _run(nodes["a"].node, GenerationOptions(max_tokens=5, grammar=bad), "bad-grammar")


@pytest.mark.asyncio(loop_scope="session")
async def test_smollm2_on_the_torch_engine_answers_in_the_schema(single_node_api):
    node = single_node_api.node
    tok = await node.get_tokenizer(MODEL)
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30},
                       "population_millions": {"type": "number"}},
        "required": ["city", "country", "population_millions"],
        "additionalProperties": False,
    }
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Describe Paris as a JSON object."}]))
    options = GenerationOptions(max_tokens=120, temperature=0.0, grammar=json_schema_grammar(schema),
                                stop_token_ids=tok.eos_token_ids)
    tokens, finish = [], None
    async for r in node.generate(MODEL, ids, options):
        tokens.extend(r.tokens)
        finish = r.finish_reason or finish
    assert finish == "stop"
    answer = json.loads(tok.decode(tokens))
    jsonschema.validate(answer, schema)
