"""Models named by path: a GGUF file, a split GGUF, a Hugging Face directory, served through the
API; and every kind of bad model name gets a 4xx in the dialect's format naming the model and
what is wrong, while the node stays up and keeps serving its other models.
"""

from __future__ import annotations

import json
import shutil

import aiohttp
import numpy as np
import pytest
from helpers import NodeUnderTest
from tiny_models import build_hf_model, write_gguf

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory) -> dict[str, str]:
    """Name -> a path that is not a model exo can run, each wrong in its own way."""
    import gguf

    root = tmp_path_factory.mktemp("bad-models")
    tiny = build_hf_model("llama", root / "tiny")
    good = write_gguf(tiny, root / "good.gguf")
    out = {"missing": str(root / "nowhere" / "model.gguf")}
    (root / "text.gguf").write_text("this is not a model\n" * 100)
    out["not a model"] = str(root / "text.gguf")
    data = good.read_bytes()
    (root / "truncated.gguf").write_bytes(data[:len(data) * 2 // 3])
    out["truncated"] = str(root / "truncated.gguf")
    w = gguf.GGUFWriter(str(root / "bert.gguf"), "bert")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out["unsupported architecture"] = str(root / "bert.gguf")
    hf = root / "gpt2-dir"
    shutil.copytree(tiny, hf)
    config = json.loads((hf / "config.json").read_text())
    config["model_type"] = "gpt2"
    (hf / "config.json").write_text(json.dumps(config))
    out["unsupported model type"] = str(hf)
    # a tensor of a type that does not exist: patch the type id of the first tensor in the header
    raw = bytearray(data)
    reader = gguf.GGUFReader(str(good))
    field = reader.tensors[0]
    name = field.name.encode()
    at = raw.index(name) + len(name)  # then n_dims (u32), dims (u64 each), type (u32)
    at += 4 + 8 * len(field.shape)
    raw[at:at + 4] = (77).to_bytes(4, "little")
    (root / "unknown-type.gguf").write_bytes(bytes(raw))
    out["unknown tensor type"] = str(root / "unknown-type.gguf")
    return out


@pytest.mark.parametrize("kind, status, words", [
    ("missing", 404, "no model at"),
    ("not a model", 400, "neither a GGUF file nor a Hugging Face model directory"),
    ("truncated", 400, "truncated"),
    ("unsupported architecture", 400, "'bert' is not supported"),
    ("unsupported model type", 400, "'gpt2' is not supported"),
    ("unknown tensor type", 400, "unknown GGML type 77"),
])
async def test_a_bad_model_is_a_4xx_naming_it_and_the_node_keeps_serving(dummy_api: NodeUnderTest, bad_models, kind,
                                                                         status, words):
    path = bad_models[kind]
    async with aiohttp.ClientSession() as s:
        for url, body, error_of in (
            ("/v1/chat/completions", {"model": path, "messages": HI}, lambda b: b["error"]["message"]),
            ("/v1/completions", {"model": path, "prompt": "x"}, lambda b: b["error"]["message"]),
            ("/api/chat", {"model": path, "messages": HI}, lambda b: b["error"]),
            ("/v1/messages", {"model": path, "max_tokens": 5, "messages": HI}, lambda b: b["error"]["message"]),
        ):
            async with s.post(dummy_api.api_url + url, json=body) as r:
                got = await r.json()
                assert r.status == status, (url, got)
                assert path in error_of(got) and words in error_of(got), (url, got)
        async with s.post(dummy_api.api_url + "/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 3}) as r:
            assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 3


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory) -> dict[str, str]:
    """The same tiny qwen3 model as a Hugging Face directory, a GGUF file and a split GGUF."""
    root = tmp_path_factory.mktemp("tiny-sources")
    hf = build_hf_model("qwen3", root / "qwen3")
    return {"directory": str(hf), "gguf": str(write_gguf(hf, root / "qwen3.gguf")),
            "split gguf": str(write_gguf(hf, root / "qwen3-split.gguf", split=3))}


async def test_a_model_named_by_path_is_served_whatever_its_form(single_node_api: NodeUnderTest, tiny_sources):
    """The torch node serves the tiny model from its directory, its GGUF and its split GGUF (any
    split named) beside its default model; the three answer with the same tokens."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=single_node_api.base_url, api_key="unused")
    texts = []
    split = tiny_sources["split gguf"]
    names = [tiny_sources["directory"], tiny_sources["gguf"], split, split.replace("00001-of-00003", "00002-of-00003")]
    for name in names:
        r = await client.completions.create(model=name, prompt="the cat", max_tokens=8, temperature=0)
        assert r.model == name.replace("00002-of", "00001-of") or r.model == name
        texts.append(r.choices[0].text)
    assert len(set(texts)) == 1 and texts[0]
    models = {m.id: m for m in (await client.models.list()).data}
    assert models[tiny_sources["gguf"]].model_extra["architecture"] == "qwen3"
    r = await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3)
    assert r.usage.completion_tokens == 3


async def test_a_base_model_has_no_chat_unless_the_config_names_a_template(dummy_api: NodeUnderTest):
    """Gemma 3 270M (base) has no chat template: chat is a 400 saying so, completions work; a
    node whose configuration names a template for it chats with that template."""
    from helpers import loopback_config

    from exo.orchestration.launcher import start_node

    gemma = "gemma3-270m"
    async with aiohttp.ClientSession() as s:
        async with s.post(dummy_api.api_url + "/v1/chat/completions", json={"model": gemma, "messages": HI}) as r:
            body = await r.json()
            assert r.status == 400 and "no chat template" in body["error"]["message"], body
        async with s.post(dummy_api.api_url + "/v1/completions", json={"model": gemma, "prompt": "x", "max_tokens": 2}) as r:
            assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 2
    running = await start_node(loopback_config(node_id="api-chat-template", discovery_module="none", inference_engine="dummy",
                                               default_model=gemma, chat_templates={gemma: "chatml"}))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(running.api_base_url + "/v1/chat/completions",
                              json={"model": gemma, "messages": HI, "max_tokens": 2}) as r:
                assert r.status == 200, await r.text()
    finally:
        await running.stop()


async def test_a_model_s_generation_config_gives_the_defaults_the_server_leaves_open(tmp_path):
    """generation_config.json's temperature and top_p apply to requests that leave them out,
    unless the server's configuration sets them."""
    from exo.api.chat_api.models import GenerationDefaults
    from exo.api.serving.resolve import model_defaults
    from exo.api.chat_api.state import APIState
    from exo.config import GenerationConfig
    from exo.inference.tokenizers import tokenizer_for_path

    tok = tokenizer_for_path(build_hf_model("qwen2", tmp_path / "m"))  # generation_config: temperature 0.7, top_p 0.9
    plain = APIState(node=None, default_model="x")
    assert model_defaults(plain, tok) == GenerationDefaults(temperature=0.7, top_p=0.9)
    configured = APIState(node=None, default_model="x", defaults=GenerationConfig(temperature=0.2).to_defaults())
    assert model_defaults(configured, tok) == GenerationDefaults(temperature=0.2, top_p=0.9)
