"""The embeddings endpoints (OpenAI ``/v1/embeddings``, Ollama ``/api/embed`` and
``/api/embeddings``) with the real ``openai`` and ``ollama`` clients, against a real node whose
dummy engine's final hidden states are known (``[token_j, j, 30, 0, ...]`` at position j), so
every vector is checked exactly."""

from __future__ import annotations

import base64
import json

import aiohttp
import numpy as np
import ollama
import openai
import pytest

from exo.inference.dummy import HIDDEN_SIZE
from exo.inference.pooling import l2_normalize, pool, truncate_dimensions

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
TEXTS = ["Hello world", "The capital of France is Paris."]


def dummy_hidden(ids: list[int], n_layers: int = 30) -> np.ndarray:
    h = np.zeros((len(ids), HIDDEN_SIZE), dtype=np.float32)
    h[:, 0], h[:, 1], h[:, 2] = ids, np.arange(len(ids)), n_layers
    return h


async def expected(node, text_or_ids, mode: str = "mean", normalize: bool = True, model: str = MODEL, n_layers: int = 30):
    ids = text_or_ids
    if isinstance(text_or_ids, str):
        ids = (await node.get_tokenizer(model)).encode(text_or_ids)
    v = pool(dummy_hidden(ids, n_layers), mode)
    return (l2_normalize(v) if normalize else v), len(ids)


async def post(url: str, body) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.json()


@pytest.mark.parametrize("encoding_format", ["float", "base64", None])
async def test_openai_client_embeddings_of_a_batch(dummy_api, encoding_format):
    client = openai.AsyncOpenAI(base_url=dummy_api.base_url, api_key="unused", max_retries=0)
    kwargs = {"encoding_format": encoding_format} if encoding_format else {}  # None: the client's default, base64
    resp = await client.embeddings.create(model=MODEL, input=TEXTS, **kwargs)
    await client.close()
    assert resp.object == "list" and resp.model == MODEL and [d.index for d in resp.data] == [0, 1]
    total = 0
    for d, text in zip(resp.data, TEXTS):
        want, n = await expected(dummy_api.node, text)
        assert d.object == "embedding"
        # asked for base64, the client hands the string over; by default it asks for base64 and decodes it
        got = np.frombuffer(base64.b64decode(d.embedding), "<f4") if encoding_format == "base64" else np.asarray(d.embedding)
        np.testing.assert_array_equal(got.astype(np.float32), want)
        total += n
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == total


async def test_openai_token_id_inputs_and_base64_bytes(dummy_api):
    status, body = await post(f"{dummy_api.base_url}/embeddings", {"model": MODEL, "input": [[40, 41, 42], [50]],
                                                                 "encoding_format": "base64"})
    assert status == 200, body
    for d, ids in zip(body["data"], [[40, 41, 42], [50]]):
        got = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(got, (await expected(dummy_api.node, ids))[0])
    status, body = await post(f"{dummy_api.api_url}/embeddings", {"model": MODEL, "input": [40, 41]})  # un-prefixed path
    assert status == 200 and len(body["data"]) == 1 and body["usage"]["prompt_tokens"] == 2


@pytest.mark.parametrize("body, status, param", [
    ({"model": MODEL, "input": ""}, 400, "input[0]"),
    ({"model": MODEL, "input": []}, 400, "input"),
    ({"model": MODEL}, 400, "input"),
    ({"model": MODEL, "input": [["a"]]}, 400, "input[0]"),
    ({"model": MODEL, "input": [[1, 2], "a", [3]]}, 200, None),  # mixed kinds, each valid
    ({"model": MODEL, "input": [[1, 49152]]}, 400, "input[0]"),  # SmolLM2's vocabulary is 49152 ids
    ({"model": MODEL, "input": [list(range(32, 32 + 8193))]}, 413, "input[0]"),  # context 8192
    ({"model": MODEL, "input": "hi", "dimensions": 4}, 400, "dimensions"),  # not Matryoshka
    ({"model": MODEL, "input": "hi", "dimensions": 0}, 400, "dimensions"),
    ({"model": MODEL, "input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "no-such-model", "input": "hi"}, 404, "model"),
])
async def test_openai_bad_requests_name_the_parameter(dummy_api, body, status, param):
    got, answer = await post(f"{dummy_api.base_url}/embeddings", body)
    assert got == status, answer
    if status != 200:
        assert answer["error"]["param"] == param and answer["error"]["message"]


async def test_openai_client_raises_on_a_bad_request(dummy_api):
    client = openai.AsyncOpenAI(base_url=dummy_api.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        await client.embeddings.create(model="no-such-model", input="hi")
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        await client.embeddings.create(model=MODEL, input="hi", dimensions=3)
    await client.close()


async def test_ollama_client_embed_and_the_older_embeddings(dummy_api):
    client = ollama.AsyncClient(host=dummy_api.api_url)
    resp = await client.embed(model=f"{MODEL}:latest", input=TEXTS)
    assert resp.model == f"{MODEL}:latest" and len(resp.embeddings) == 2
    total = 0
    for got, text in zip(resp.embeddings, TEXTS):
        want, n = await expected(dummy_api.node, text)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        total += n
    assert resp.prompt_eval_count == total and resp.total_duration >= resp.load_duration >= 0
    old = await client.embeddings(model=MODEL, prompt=TEXTS[0])  # Ollama's old endpoint: not normalized
    np.testing.assert_allclose(old.embedding, (await expected(dummy_api.node, TEXTS[0], normalize=False))[0], rtol=1e-6)
    assert (await client.embed(model=MODEL, input=[])).embeddings == []  # an empty input loads the model
    assert (await client.embeddings(model=MODEL, prompt="")).embedding == []


async def test_ollama_truncates_to_the_context_unless_told_not_to(dummy_api):
    long_text = "hello " * 9000  # more than SmolLM2's 8192 tokens
    status, body = await post(f"{dummy_api.api_url}/api/embed", {"model": MODEL, "input": long_text})
    assert status == 200 and body["prompt_eval_count"] == 8192
    status, body = await post(f"{dummy_api.api_url}/api/embed", {"model": MODEL, "input": long_text, "truncate": False})
    assert status == 400 and set(body) == {"error"} and "context length" in body["error"]


@pytest.mark.parametrize("path, body, status", [
    ("/api/embed", {"model": "no-such-model", "input": "hi"}, 404),
    ("/api/embed", {"model": MODEL, "input": "hi", "dimensions": 4}, 400),
    ("/api/embed", {"model": MODEL, "input": [1, 2]}, 400),
    ("/api/embed", {"input": "hi"}, 400),
    ("/api/embeddings", {"model": "no-such-model", "prompt": "hi"}, 404),
    ("/api/embeddings", {"prompt": "hi"}, 400),
])
async def test_ollama_errors_are_ollamas(dummy_api, path, body, status):
    got, answer = await post(f"{dummy_api.api_url}{path}", body)
    assert got == status and set(answer) == {"error"} and isinstance(answer["error"], str)


async def test_ollama_client_raises_response_error(dummy_api):
    client = ollama.AsyncClient(host=dummy_api.api_url)
    with pytest.raises(ollama.ResponseError) as e:
        await client.embed(model="no-such-model", input="hi")
    assert e.value.status_code == 404


async def test_a_failing_ring_step_is_a_500_not_a_hang(dummy_api):
    dummy_api.node.engine.fail_layer = 29
    status, body = await post(f"{dummy_api.base_url}/embeddings", {"model": MODEL, "input": "hi"})
    assert status == 500 and "layer 29 failed" in body["error"]["message"]
    assert not dummy_api.node.engine.cached_request_ids()


@pytest.fixture(scope="module")
def tiny_embedding_model(tmp_path_factory):
    """A tiny random Qwen3 saved as a sentence-transformers Qwen3-Embedding directory: last-token
    pooling (``1_Pooling``), Matryoshka (by its family's name)."""
    pytest.importorskip("transformers")
    from tiny_models import build_hf_model

    d = build_hf_model("qwen3", tmp_path_factory.mktemp("st") / "tiny-Qwen3-Embedding")
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, "pooling_mode_cls_token": False,
                                                             "pooling_mode_mean_tokens": False, "pooling_mode_lasttoken": True}))
    return d


async def test_a_matryoshka_model_truncates_and_renormalizes(dummy_api, tiny_embedding_model):
    model = str(tiny_embedding_model)
    card = await dummy_api.node.model_card(model)
    assert (card.pooling, card.matryoshka) == ("last", True)
    status, body = await post(f"{dummy_api.base_url}/embeddings", {"model": model, "input": "hello world", "dimensions": 4})
    assert status == 200, body
    full, _ = await expected(dummy_api.node, "hello world", mode="last", model=model, n_layers=4)
    got = np.asarray(body["data"][0]["embedding"], dtype=np.float32)
    np.testing.assert_allclose(got, truncate_dimensions(full, 4), rtol=1e-6)
    assert abs(float(np.linalg.norm(got)) - 1) < 1e-6
    status, body = await post(f"{dummy_api.base_url}/embeddings", {"model": model, "input": "hi", "dimensions": 65})
    assert status == 400 and body["error"]["param"] == "dimensions"
