"""Embeddings of the torch engine against transformers: the final-normed hidden states
(``hidden_states[-1]`` of transformers' Llama, the output of its final norm) pooled and
normalized, on a tiny random-weight Llama (one shard and two) and on SmolLM2's GGUF; and a
two-node ring of real nodes gives the vector one node gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exo.inference.pooling import l2_normalize, pool
from exo.inference.shard import Shard
from exo.inference.torch.engine import TorchInferenceEngine

asyncio_test = pytest.mark.asyncio(loop_scope="session")

TEXT_IDS = [[5, 17, 99, 3, 250, 42, 7], [300, 12], [64]]
SMOLLM2 = "smollm2-135m"
SMOLLM2_TEXTS = ["The capital of France is Paris.", "Embeddings map text to vectors.", "hi"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama and transformers' final hidden states of each of TEXT_IDS."""
    pytest.importorskip("transformers")
    from tiny_models import build_hf_model
    from transformers import AutoModelForCausalLM

    d = build_hf_model("llama", tmp_path_factory.mktemp("emb") / "llama")
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = [ref(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].numpy() for ids in TEXT_IDS]
    return d, hidden


async def _embed_on_engines(stages: list[tuple], ids: list[int], mode: str) -> np.ndarray:
    """The prompt through each stage as the ring runs it: ``infer_tensor`` on all but the last,
    ``infer_final_hidden`` there; pooled and normalized."""
    x = np.asarray([ids], dtype=np.int64)
    for i, (engine, shard) in enumerate(stages):
        run = engine.infer_final_hidden if i == len(stages) - 1 else engine.infer_tensor
        x = await run("emb", shard, x, 0)
    for engine, _ in stages:
        await engine.clear_request("emb")
    assert x.shape == (1, len(ids), 64) and x.dtype == np.float32
    return l2_normalize(pool(x, mode))


@asyncio_test
@pytest.mark.parametrize("split", [[(0, 3)], [(0, 1), (2, 3)]])
async def test_tiny_llama_embeddings_match_transformers(tiny_llama, split):
    directory, hidden = tiny_llama
    stages = [(TorchInferenceEngine(device="cpu"), Shard(str(directory), a, b, 4)) for a, b in split]
    try:
        for ids, ref in zip(TEXT_IDS, hidden):
            for mode in ("mean", "last", "cls"):
                got = await _embed_on_engines(stages, ids, mode)
                np.testing.assert_allclose(got, l2_normalize(pool(ref, mode)), atol=1e-5, err_msg=f"{mode} {ids}")
        # a single token prompt does not take the native decode step on the last shard
        got = await _embed_on_engines(stages, [64], "last")
        np.testing.assert_allclose(got, l2_normalize(pool(hidden[2], "last")), atol=1e-5)
    finally:
        for engine, _ in stages:
            await engine.close()


@asyncio_test
async def test_smollm2_gguf_mean_embeddings_match_transformers(single_node_api, smollm2_transformers):
    """SmolLM2 says no pooling: mean. transformers loads the same GGUF (the session's, conftest.py)."""
    from exo.models.sources import STORE

    card = STORE.card(SMOLLM2)
    assert card.pooling == "mean" and not card.matryoshka
    ref, _ = smollm2_transformers
    tok = await single_node_api.node.get_tokenizer(SMOLLM2)
    for text in SMOLLM2_TEXTS:
        ids = tok.encode(text)
        with torch.no_grad():
            h = ref(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].numpy()
        got = await single_node_api.node.embed(SMOLLM2, ids)
        np.testing.assert_allclose(got, l2_normalize(pool(h, "mean")), atol=2e-5, err_msg=text)


@asyncio_test
async def test_two_node_ring_gives_the_embedding_of_one_node(two_node_cluster, single_node_api):
    tok = await single_node_api.node.get_tokenizer(SMOLLM2)
    for text in SMOLLM2_TEXTS:
        ids = tok.encode(text)
        alone = await single_node_api.node.embed(SMOLLM2, ids, "last")
        for n in two_node_cluster:  # whichever node the request enters
            np.testing.assert_allclose(await n.node.embed(SMOLLM2, ids, "last"), alone, atol=1e-5, err_msg=text)
    for n in two_node_cluster:
        assert not n.node.engine.cached_request_ids()


@asyncio_test
@pytest.mark.parametrize("name", ["tinygrad", "mlx"])
async def test_tinygrad_and_mlx_embeddings_match_transformers(tiny_llama, name):
    """The engines sharing ``ShardedModelEngine`` return final-normed hidden states too."""
    from test_engines import _require

    from exo.inference.inference_engine import get_inference_engine

    _require(name)
    directory, hidden = tiny_llama
    stages = [(get_inference_engine(name), Shard(str(directory), a, b, 4)) for a, b in [(0, 1), (2, 3)]]
    try:
        for ids, ref in zip(TEXT_IDS, hidden):
            got = await _embed_on_engines(stages, ids, "mean")
            np.testing.assert_allclose(got, l2_normalize(pool(ref, "mean")), atol=1e-4, err_msg=f"{name} {ids}")
    finally:
        for engine, _ in stages:
            await engine.close()
