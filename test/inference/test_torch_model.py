"""The torch engine and tokenizer against transformers' Llama loaded from the same GGUF."""

import asyncio

import numpy as np
import pytest
import torch

from exo.inference.shard import Shard
from helpers import smollm2_gguf_path

from exo.inference.tokenizers import IncrementalDetokenizer, tokenizer_for_path
from exo.inference.torch.engine import TorchInferenceEngine

MODEL = "smollm2-135m"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def reference(smollm2_transformers):
    """transformers' model and tokenizer built from the shipped GGUF (conftest.py: loaded once)."""
    return smollm2_transformers


@pytest.fixture(scope="session")
def tokenizer():
    return tokenizer_for_path(smollm2_gguf_path())


@pytest.fixture(scope="session")
def chat_ids(tokenizer):
    return tokenizer.encode(tokenizer.apply_chat_template(CHAT))


async def _engine_logits(engine, shard, ids):
    return await engine.infer_tensor("ref", shard, np.asarray([ids], dtype=np.int64), 0)


def test_chat_template_and_ids_match_reference(reference, tokenizer, chat_ids):
    _, ref_tok = reference
    ref_ids = ref_tok.apply_chat_template(CHAT, add_generation_prompt=True)
    ref_ids = ref_ids["input_ids"] if not isinstance(ref_ids, list) else ref_ids
    assert chat_ids == list(ref_ids)


@pytest.mark.parametrize("text", [
    "Hello, world! How's it going?",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "Ünïcödé — ça va? 日本語のテキスト 🚀",
    "<|im_start|>user\nhi<|im_end|>",
    "def f(x):\n    return x ** two",
])
def test_tokenizer_matches_reference(reference, tokenizer, text):
    _, ref_tok = reference
    assert tokenizer.encode(text) == ref_tok.encode(text, add_special_tokens=False)
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


def test_digits_are_split_one_by_one(tokenizer):
    # SmolLM2 was trained with digits split individually (its tokenizer.json: Digits(individual);
    # llama.cpp's "smollm" pre-tokenizer does the same); transformers' GGUF converter does not.
    ids = tokenizer.encode("2024")
    assert [tokenizer.decode([i]) for i in ids] == ["2", "0", "2", "4"]


def test_incremental_detokenizer_is_utf8_safe(tokenizer):
    text = "naïve café 🚀 日本"
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(t) for t in tokenizer.encode(text)] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.asyncio
@pytest.mark.parametrize("weights", ["auto", "dense"])
async def test_logits_match_reference(reference, chat_ids, weights):
    """Both ways of holding the weights on a CPU: the default ("auto": the GGUF's blocks where
    the native kernels build, test_gguf_weights.py) and float32 dense matrices."""
    model, _ = reference
    engine = TorchInferenceEngine(device="cpu", dtype="float32", weights=weights)
    shard = Shard.full(MODEL, 30)
    await engine.ensure_shard(shard)
    ours = await _engine_logits(engine, shard, chat_ids)
    with torch.no_grad():
        ref = model(torch.tensor([chat_ids])).logits[0, -1].numpy()
    assert ours.shape == ref.shape == (49152,)
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
    # one decode step through the KV cache matches the reference run over the longer sequence
    nxt = int(ours.argmax())
    step = await engine.infer_tensor("ref", shard, np.asarray([[nxt]]), len(chat_ids))
    with torch.no_grad():
        ref2 = model(torch.tensor([chat_ids + [nxt]])).logits[0, -1].numpy()
    np.testing.assert_allclose(step, ref2, atol=1e-3, rtol=0)
    await engine.close()


@pytest.mark.asyncio
async def test_chained_shards_equal_full_model(chat_ids):
    full_engine = TorchInferenceEngine(device="cpu", dtype="float32")
    full = Shard.full(MODEL, 30)
    await full_engine.ensure_shard(full)
    expected = await _engine_logits(full_engine, full, chat_ids)
    x = np.asarray([chat_ids], dtype=np.int64)
    for start, end in [(0, 9), (10, 21), (22, 29)]:
        engine = TorchInferenceEngine(device="cpu", dtype="float32")
        shard = Shard(MODEL, start, end, 30)
        await engine.ensure_shard(shard)
        x = await engine.infer_tensor("r", shard, x, 0)
        assert x.dtype == np.float32
        await engine.close()
    np.testing.assert_allclose(x, expected, atol=1e-4, rtol=0)
    await full_engine.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("weights", ["auto", "dense"])
async def test_half_shard_holds_less_weight_memory(weights):
    engines = {}
    for name, shard in {"full": Shard.full(MODEL, 30), "first_half": Shard(MODEL, 0, 14, 30), "second_half": Shard(MODEL, 15, 29, 30),
                        "one_layer": Shard(MODEL, 7, 7, 30)}.items():
        e = TorchInferenceEngine(device="cpu", dtype="float32", weights=weights)
        await e.ensure_shard(shard)
        engines[name] = e.weight_bytes()
        await e.close()
    # each half holds half the layers plus one copy of the embedding (as input or tied output
    # head): the full model less 15 layers
    for half in ("first_half", "second_half"):
        assert engines[half] < engines["full"] - 14 * engines["one_layer"], half


@pytest.mark.asyncio
async def test_bad_input_raises_clear_errors(chat_ids):
    engine = TorchInferenceEngine(device="cpu", dtype="float32")
    shard = Shard(MODEL, 0, 14, 30)
    await engine.ensure_shard(shard)
    with pytest.raises(ValueError, match="token ids"):
        await engine.infer_tensor("r", shard, np.zeros((1, 3, 576), np.float32), 0)
    with pytest.raises(ValueError, match=r"\[0, 49152\)"):
        await engine.infer_tensor("r", shard, np.asarray([[49152]]), 0)
    await engine.infer_tensor("r", shard, np.asarray([chat_ids]), 0)
    with pytest.raises(ValueError, match="position"):
        await engine.infer_tensor("r", shard, np.asarray([[1]]), 3)
    with pytest.raises(KeyError):
        await engine.infer_tensor("unknown", shard, np.asarray([[1]]), 5)
    await engine.clear_request("r")
    assert engine.cached_request_ids() == set()
    await engine.close()


async def _greedy(engine, shard, rid, ids, n, prefilled: asyncio.Barrier | None = None):
    """n greedy tokens of request ``rid`` (prefill, then n - 1 decode steps) and their logits;
    with ``prefilled``, the decode steps wait for every request's prefill (the engine runs
    prefills between decode batches, so requests that start together otherwise decode apart)."""
    logits = await engine.infer_tensor(rid, shard, np.asarray([ids]), 0)
    if prefilled is not None:
        await prefilled.wait()
    tokens, all_logits, pos = [int(logits.argmax())], [logits], len(ids)
    for _ in range(n - 1):
        logits = await engine.infer_tensor(rid, shard, np.asarray([[tokens[-1]]]), pos)
        tokens.append(int(logits.argmax()))
        all_logits.append(logits)
        pos += 1
    return tokens, np.stack(all_logits)


@pytest.mark.asyncio
async def test_default_cpu_dtype_is_the_one_the_logits_check_uses(monkeypatch):
    # the logits check above runs float32: the CPU default must be the dtype it checks
    monkeypatch.delenv("EXO_TORCH_DTYPE", raising=False)
    engine = TorchInferenceEngine(device="cpu")
    assert engine.dtype == torch.float32
    await engine.close()


@pytest.mark.asyncio
async def test_batched_decode_equals_sequential_decode(chat_ids):
    """Concurrent requests at different positions decode in one batched forward pass and get
    exactly the tokens (and, to float32 rounding, the logits) each gets alone."""
    shard = Shard.full(MODEL, 30)
    prompts = [chat_ids, chat_ids[:-7], list(range(200, 212)), chat_ids[5:]]
    alone = TorchInferenceEngine(device="cpu", dtype="float32", max_batch=1)
    await alone.ensure_shard(shard)
    expected = [await _greedy(alone, shard, f"a{i}", p, 6) for i, p in enumerate(prompts)]
    await alone.close()
    assert alone.batch_sizes == []

    batched = TorchInferenceEngine(device="cpu", dtype="float32")
    await batched.ensure_shard(shard)
    got = await asyncio.gather(*(_greedy(batched, shard, f"b{i}", p, 6) for i, p in enumerate(prompts)))
    assert max(batched.batch_sizes) > 1  # the steps really ran batched
    for (tokens, logits), (exp_tokens, exp_logits) in zip(got, expected):
        assert tokens == exp_tokens
        np.testing.assert_allclose(logits, exp_logits, atol=1e-4, rtol=0)
    assert batched.cached_request_ids() == {f"b{i}" for i in range(len(prompts))}

    # a bad step fails alone; the others of its batch go on
    results = await asyncio.gather(
        batched.infer_tensor("b0", shard, np.asarray([[1]]), len(prompts[0]) + 6 - 1),
        batched.infer_tensor("b1", shard, np.asarray([[1]]), 999),
        batched.infer_tensor("unknown", shard, np.asarray([[1]]), 3),
        return_exceptions=True)
    assert results[0].shape == (49152,)
    assert isinstance(results[1], ValueError) and "position" in str(results[1])
    assert isinstance(results[2], KeyError)
    await batched.close()


@pytest.mark.asyncio
async def test_a_large_batch_decodes_as_each_request_alone(chat_ids):
    """Twelve requests in one batch: on a CPU with AMX their products take the tile path
    (exo_gguf.amx_rows() rows or more), and still give each request's own greedy tokens and
    its logits within the suite's 1e-3."""
    shard = Shard.full(MODEL, 30)
    prompts = [chat_ids[i:] for i in range(0, 24, 2)]
    alone = TorchInferenceEngine(device="cpu", dtype="float32", max_batch=1)
    await alone.ensure_shard(shard)
    expected = [await _greedy(alone, shard, f"a{i}", p, 4) for i, p in enumerate(prompts)]
    await alone.close()
    batched = TorchInferenceEngine(device="cpu", dtype="float32")
    await batched.ensure_shard(shard)
    barrier = asyncio.Barrier(len(prompts))
    got = await asyncio.gather(*(_greedy(batched, shard, f"b{i}", p, 4, barrier) for i, p in enumerate(prompts)))
    assert max(batched.batch_sizes) == len(prompts)
    for (tokens, logits), (exp_tokens, exp_logits) in zip(got, expected):
        assert tokens == exp_tokens
        np.testing.assert_allclose(logits, exp_logits, atol=1e-3, rtol=0)
    await batched.close()


@pytest.mark.asyncio
async def test_batched_decode_through_a_split_ring(chat_ids):
    """Batched decode steps of hidden states on a later shard equal the full model's."""
    first, last = Shard(MODEL, 0, 11, 30), Shard(MODEL, 12, 29, 30)
    e1 = TorchInferenceEngine(device="cpu", dtype="float32")
    e2 = TorchInferenceEngine(device="cpu", dtype="float32")
    await e1.ensure_shard(first)
    await e2.ensure_shard(last)

    async def ring_greedy(rid, ids, n):
        pos, x, tokens = 0, np.asarray([ids]), []
        for _ in range(n):
            h = await e1.infer_tensor(rid, first, x, pos)
            logits = await e2.infer_tensor(rid, last, h, pos)
            pos += x.shape[1]
            tokens.append(int(logits.argmax()))
            x = np.asarray([[tokens[-1]]])
        return tokens

    prompts = [chat_ids, list(range(300, 305)), chat_ids[3:]]
    got = await asyncio.gather(*(ring_greedy(f"r{i}", p, 5) for i, p in enumerate(prompts)))
    assert max(e2.batch_sizes) > 1
    full = TorchInferenceEngine(device="cpu", dtype="float32", max_batch=1)
    await full.ensure_shard(Shard.full(MODEL, 30))
    for i, p in enumerate(prompts):
        assert got[i] == (await _greedy(full, Shard.full(MODEL, 30), f"f{i}", p, 5))[0]
    for e in (e1, e2, full):
        await e.close()


@pytest.mark.asyncio
async def test_int4_weights_follow_the_float32_model(chat_ids):
    """The opt-in int4 weights (bfloat16 activations) are not held to 1e-3, but along the float32
    model's own greedy continuation each step's top token is among float32's top 2, and no
    logit is off by more than 2 (float32 logits span ~30)."""
    shard = Shard.full(MODEL, 30)
    dense = TorchInferenceEngine(device="cpu", dtype="float32", max_batch=1)
    await dense.ensure_shard(shard)
    tokens, expected = await _greedy(dense, shard, "d", chat_ids, 8)
    await dense.close()
    q = TorchInferenceEngine(device="cpu", weights="int4")
    await q.ensure_shard(shard)
    assert q.dtype == torch.bfloat16 and q.weight_bytes() < 0.3 * 513 * 2**20
    got = [await q.infer_tensor("q", shard, np.asarray([chat_ids]), 0)]
    for i, t in enumerate(tokens[:-1]):
        got.append(await q.infer_tensor("q", shard, np.asarray([[t]]), len(chat_ids) + i))
    for step, (g, e) in enumerate(zip(got, expected)):
        assert int(g.argmax()) in np.argsort(-e)[:2], step
        assert np.abs(g - e).max() < 2.0, step
    await q.close()
    with pytest.raises(ValueError, match="weights"):
        TorchInferenceEngine(device="cpu", weights="int3")
    with pytest.raises(ValueError, match="bfloat16"):
        TorchInferenceEngine(device="cpu", weights="int4", dtype="float32")
