"""The image endpoints against a real node (the dummy-engine API node) drawing with real
diffusers on a tiny random-weight Stable Diffusion pipeline (``tiny_diffusion``): PNGs of the
size and count asked, equal bytes for equal seeds, ``url`` answers fetchable, progress events in
order, image-to-image, the real ``openai`` client, ``/v1/models``, and every bad input answered
4xx naming its parameter (in each dialect's format) while the node stays up."""

from __future__ import annotations

import base64
import io
import json
import shutil

import aiohttp
import pytest
from PIL import Image

from exo.models.sources import STORE

pytestmark = pytest.mark.asyncio(loop_scope="session")
STEPS = {"num_inference_steps": 2, "guidance_scale": 1.0}  # no guidance: one UNet pass per step


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as img:
        return img.size


async def post(url: str, body) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        return r.status, await r.json()


async def test_openai_client_generates_pngs_and_equal_seeds_give_equal_bytes(dummy_api, tiny_sd_pipeline):
    import openai

    client = openai.AsyncOpenAI(base_url=dummy_api.base_url, api_key="none")
    model = str(tiny_sd_pipeline)
    first = await client.images.generate(model=model, prompt="a red cat", n=2, size="32x32",
                                         response_format="b64_json", extra_body={"seed": 7, **STEPS})
    pngs = [base64.b64decode(d.b64_json) for d in first.data]
    assert len(pngs) == 2 and all(png_size(p) == (32, 32) for p in pngs)
    assert pngs[0] != pngs[1]  # image k is drawn with seed + k
    again = await client.images.generate(model=model, prompt="a red cat", size="32x32", response_format="b64_json",
                                         extra_body={"seed": 8, **STEPS})
    assert base64.b64decode(again.data[0].b64_json) == pngs[1]
    models = {m.id: m for m in (await client.models.list()).data}
    assert models[model].kind == "image" and models[model].state == "ready"
    assert models["sd-turbo"].kind == "image" and models["smollm2-135m"].kind == "text"


async def test_url_answers_are_fetchable_and_stream_reports_each_step(dummy_api, tiny_sd_pipeline):
    body = {"model": str(tiny_sd_pipeline), "prompt": "a boat", "size": "48x32", "seed": 1, **STEPS}
    status, answer = await post(f"{dummy_api.base_url}/images/generations", body)
    assert status == 200 and answer["size"] == "48x32" and answer["data"][0]["seed"] == 1
    url = answer["data"][0]["url"]
    assert url.startswith(dummy_api.api_url + "/images/")
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.status == 200 and r.content_type == "image/png"
            from_url = await r.read()
        assert png_size(from_url) == (48, 32)
        async with s.get(f"{dummy_api.api_url}/images/{'0' * 32}.png") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "image_not_found"
        async with s.post(f"{dummy_api.base_url}/images/generations",
                          json={**body, "stream": True, "response_format": "b64_json"}) as r:
            assert r.status == 200 and r.content_type == "text/event-stream"
            events = [json.loads(line[6:]) for line in (await r.text()).splitlines() if line.startswith("data: ")]
    assert [(e["type"], e.get("step")) for e in events] == [
        ("image_generation.progress", 1), ("image_generation.progress", 2), ("image_generation.completed", None)]
    assert events[0]["total_steps"] == 2
    assert base64.b64decode(events[-1]["b64_json"]) == from_url  # same seed, same bytes, streamed or not


async def test_openai_client_edits_an_image(dummy_api, tiny_sd_pipeline):
    import openai

    source = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(source, format="PNG")
    client = openai.AsyncOpenAI(base_url=dummy_api.base_url, api_key="none")
    edit = await client.images.edit(model=str(tiny_sd_pipeline), image=("red.png", source.getvalue(), "image/png"),
                                    prompt="a blue square", response_format="b64_json",
                                    extra_body={"seed": 3, "strength": 0.5, "num_inference_steps": 4})
    assert png_size(base64.b64decode(edit.data[0].b64_json)) == (32, 32)


@pytest.mark.parametrize("body, param", [
    ({"size": "banana"}, "size"),
    ({"size": "30x30"}, "size"),
    ({"size": "4096x4096"}, "size"),
    ({"n": 0}, "n"),
    ({"n": 11}, "n"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"response_format": "gif"}, "response_format"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"seed": -5}, "seed"),
    ({"strength": 0.5}, "strength"),
    ({"model": "smollm2-135m"}, "model"),
    ({"model": None}, "model"),
    ({"wat": 1}, "wat"),
])
async def test_bad_generation_requests_name_the_parameter(dummy_api, tiny_sd_pipeline, body, param):
    request = {"model": str(tiny_sd_pipeline), "prompt": "x", "size": "32x32", **STEPS, **body}
    request = {k: v for k, v in request.items() if v is not None}
    status, answer = await post(f"{dummy_api.base_url}/images/generations", request)
    assert status == 400, answer
    assert answer["error"]["param"] == param


async def test_bad_edits_and_broken_pipelines_are_4xx_and_the_node_stays_up(dummy_api, tiny_sd_pipeline, tmp_path):
    url = f"{dummy_api.base_url}/images/edits"
    base = {"model": str(tiny_sd_pipeline), "prompt": "x", **STEPS}
    status, answer = await post(url, base)
    assert status == 400 and answer["error"]["param"] == "image"
    status, answer = await post(url, {**base, "image": base64.b64encode(b"not a picture").decode()})
    assert status == 400 and answer["error"]["param"] == "image"
    status, answer = await post(url, {**base, "image": "%%%"})
    assert status == 400 and answer["error"]["param"] == "image"
    broken = tmp_path / "broken-sd"
    shutil.copytree(tiny_sd_pipeline, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    no_index = tmp_path / "bad-index"
    shutil.copytree(tiny_sd_pipeline, no_index)
    (no_index / "model_index.json").write_text("{not json")
    for bad in (broken, no_index):
        status, answer = await post(f"{dummy_api.base_url}/images/generations", {**base, "model": str(bad)})
        assert status == 400 and answer["error"]["param"] == "model" and answer["error"]["code"] == "invalid_model", answer
    status, answer = await post(f"{dummy_api.base_url}/images/generations", {**base, "model": str(tmp_path / "none")})
    assert status == 404 and answer["error"]["param"] == "model"
    status, answer = await post(f"{dummy_api.base_url}/images/generations", {**base, "size": "32x32"})
    assert status == 200 and len(answer["data"]) == 1  # still up, still drawing


async def test_text_dialects_refuse_image_models_in_their_own_format(dummy_api, tiny_sd_pipeline):
    model = str(tiny_sd_pipeline)
    status, answer = await post(f"{dummy_api.base_url}/chat/completions",
                                {"model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and answer["error"]["param"] == "model" and "image model" in answer["error"]["message"]
    status, answer = await post(f"{dummy_api.base_url}/embeddings", {"model": model, "input": "hi"})
    assert status == 400 and answer["error"]["param"] == "model"
    status, answer = await post(f"{dummy_api.api_url}/api/chat",
                                {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False})
    assert status == 400 and set(answer) == {"error"} and "image model" in answer["error"]
    status, answer = await post(f"{dummy_api.base_url}/messages",
                                {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    assert "image model" in answer["error"]["message"]
    assert STORE.card(model).kind == "image"
