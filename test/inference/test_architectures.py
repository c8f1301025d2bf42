"""Every architecture, exactly as transformers computes it: tiny random-weight models built here
(``tiny_models``: a few layers, GQA, each variant switched on), saved as safetensors and as GGUF,
served by the torch engine on one node and by a real 2-node ring; logits equal transformers'
within 1e-4 (float32) and 24 greedy tokens are identical.

Sources per architecture: the safetensors directory (float32); a GGUF of the same weights
(float32); and a GGUF whose matrices are Q8_0, compared against the transformers model whose
weights were rounded through Q8_0 (so both hold the same numbers): the native kernels' path.
Mistral's GGUF is the llama architecture, which has no sliding window: it is left out. Gemma 3
GGUFs cannot carry ``query_pre_attn_scalar`` (llama.cpp derives the scale from the head size),
so its GGUF models use the head size, as every real Gemma 3 but the 27B does.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import pytest_asyncio
from helpers import loopback_config, wait_for
from tiny_models import build_hf_model, write_gguf

from exo.inference.generation import GenerationOptions
from exo.inference.shard import Shard

pytestmark = pytest.mark.asyncio(loop_scope="session")

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")
PROMPT = [5, 17, 99, 200, 33, 8, 150, 300, 42, 7, 64, 128, 11, 250, 90, 3, 77, 66, 55, 44]  # past every window
N_TOKENS = 24
Q8_0 = 8


def _sources() -> list[tuple[str, str]]:
    out = []
    for arch in ARCHS:
        out.append((arch, "safetensors"))
        if arch != "mistral":
            out += [(arch, "gguf"), (arch, "gguf-q8_0")]
    return out


SOURCES = _sources()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[tuple[str, str], tuple[str, str]]:
    """(arch, source) -> (the model id exo is given: a path, the transformers directory of the
    same numbers)."""
    root = tmp_path_factory.mktemp("tiny-models")
    out = {}
    for arch in ARCHS:
        gguf_compat = {"query_pre_attn_scalar": 32} if arch == "gemma3" else {}
        st = build_hf_model(arch, root / arch)
        out[(arch, "safetensors")] = (str(st), str(st))
        if arch == "mistral":
            continue
        plain = build_hf_model(arch, root / f"{arch}-gguf-src", **gguf_compat) if gguf_compat else st
        out[(arch, "gguf")] = (str(write_gguf(plain, root / f"{arch}.gguf")), str(plain))
        q8 = build_hf_model(arch, root / f"{arch}-q8", weights_qtype=Q8_0, **gguf_compat)
        out[(arch, "gguf-q8_0")] = (str(write_gguf(q8, root / f"{arch}-q8_0.gguf", weights_qtype=Q8_0)), str(q8))
    return out


@pytest.fixture(scope="module")
def reference(tiny) -> dict[str, tuple[np.ndarray, list[int], np.ndarray]]:
    """transformers directory -> (last-position logits of PROMPT (vocab,), 24 greedy tokens,
    log-softmax of the logits before each greedy token (24, vocab)), float32."""
    import torch
    from transformers import AutoModelForCausalLM

    out = {}
    for _, hf_dir in tiny.values():
        if hf_dir in out:
            continue
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            ids = torch.tensor([PROMPT])
            logits = model(ids).logits[0, -1]
            gen = model.generate(ids, max_new_tokens=N_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
        tokens = gen.sequences[0, len(PROMPT):].tolist()
        logprobs = torch.log_softmax(torch.stack(gen.logits)[:, 0].float(), dim=-1).numpy()
        out[hf_dir] = (logits.numpy(), tokens, logprobs)
    return out


@pytest.mark.parametrize("weights", ["auto", "dense"])
@pytest.mark.parametrize("arch, source", SOURCES)
async def test_one_node_equals_transformers(tiny, reference, arch, source, weights):
    """The torch engine holding every layer: logits within 1e-4, then 24 greedy decode steps
    identical; and the same model as two shards, hidden states passed from one to the other."""
    from exo.inference.torch.engine import TorchInferenceEngine

    model_id, hf_dir = tiny[(arch, source)]
    want, want_tokens, _ = reference[hf_dir]
    n = {"gemma3": 6}.get(arch, 4)
    engine = TorchInferenceEngine(weights=weights)
    try:
        shard = Shard(model_id, 0, n - 1, n)
        logits = await engine.infer_tensor("r", shard, np.array([PROMPT]), 0)
        assert np.abs(logits - want).max() < 1e-4
        tokens, position = [int(np.argmax(logits))], len(PROMPT)
        while len(tokens) < N_TOKENS:
            out = await engine.infer_tensor("r", shard, np.array([[tokens[-1]]]), position)
            position += 1
            tokens.append(int(np.argmax(out)))
        assert tokens == want_tokens
        if weights == "auto" and source != "safetensors":
            assert engine.weights == "gguf" and engine._model.native_decode  # the native kernels ran the steps
    finally:
        await engine.close()
    first, second = TorchInferenceEngine(weights=weights), TorchInferenceEngine(weights=weights)
    try:
        hidden = await first.infer_tensor("q", Shard(model_id, 0, 1, n), np.array([PROMPT]), 0)
        logits = await second.infer_tensor("q", Shard(model_id, 2, n - 1, n), hidden, 0)
        assert np.abs(logits - want).max() < 1e-4
    finally:
        await first.close()
        await second.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def ring(tiny):
    """Two torch nodes on loopback (mDNS), each holding up to every tiny model's shard at once."""
    from exo.orchestration.launcher import start_node

    nodes = list(await asyncio.gather(*(
        start_node(loopback_config(node_id=f"arch-{i}", default_model=tiny[("llama", "safetensors")][0],
                                   cluster_secret="test-architectures", max_models=len(SOURCES)))
        for i in range(2))))
    try:
        await wait_for(lambda: all(len(n.node.topology.nodes) == 2 for n in nodes), timeout=20)
        yield [n.node for n in nodes]
    finally:
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)


@pytest.mark.parametrize("arch, source", SOURCES)
async def test_two_node_ring_equals_transformers(ring, tiny, reference, arch, source):
    """The ring splits the model's layers over both nodes; its 24 greedy tokens are
    transformers', and the log-probability of each within 1e-4 of transformers' log-softmax."""
    model_id, hf_dir = tiny[(arch, source)]
    _, want_tokens, want_logprobs = reference[hf_dir]
    card = await ring[0].model_card(model_id)
    partition = ring[0].partition(card)
    assert len(partition) == 2
    tokens, logprobs = [], []
    options = GenerationOptions(max_tokens=N_TOKENS, temperature=0.0, stop_token_ids=(), logprobs=True, top_logprobs=1)
    async for r in ring[0].generate(model_id, list(PROMPT), options):
        tokens += r.tokens
        logprobs += r.logprobs
    assert tokens == want_tokens
    got = np.array(logprobs)
    want = want_logprobs[np.arange(N_TOKENS), want_tokens]
    assert np.abs(got - want).max() < 1e-4
    for node, part in zip(ring, sorted(partition, key=lambda p: p.node_id)):
        held = node.engine_for(card.model_id).shard
        assert (held.start_layer, held.end_layer) in {(p.start_layer, p.end_layer) for p in partition}
