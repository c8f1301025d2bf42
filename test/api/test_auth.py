"""API keys: 401 in each dialect's own format without a key or with a wrong one, the right key
works with each official client (openai, anthropic, ollama), and the web page and health checks
stay public as configured.

The APIs under test are real ``ChatAPI`` applications on 127.0.0.1 over the dummy-engine node
of ``dummy_api`` (no weights to run, so each generation takes milliseconds).
"""

from __future__ import annotations

from typing import AsyncIterator

import aiohttp
import anthropic
import ollama
import openai
import pytest
import pytest_asyncio

from exo.api.chat_api import ChatAPI
from exo.api.chat_api.auth import check_key, is_public
from exo.config import AuthConfig

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
KEYS = ["key-one", "key-two"]
HI = [{"role": "user", "content": "hi"}]
# (method, path, JSON body) of each dialect's generating endpoint
CALLS = {
    "openai": ("POST", "/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 2}),
    "anthropic": ("POST", "/v1/messages", {"model": MODEL, "messages": HI, "max_tokens": 2}),
    "ollama": ("POST", "/api/chat", {"model": MODEL, "messages": HI, "stream": False, "options": {"num_predict": 2}}),
}


async def _start(node, **kwargs) -> ChatAPI:
    api = ChatAPI(node, default_model=MODEL, **kwargs)
    await api.run("127.0.0.1", 0)
    return api


@pytest_asyncio.fixture(loop_scope="session")
async def keyed(dummy_api, tinychat_dir) -> AsyncIterator[str]:
    """Base URL of an API over the dummy node that requires one of KEYS."""
    api = await _start(dummy_api.node, tinychat_dir=tinychat_dir, auth=AuthConfig(api_keys=KEYS))
    try:
        yield f"http://127.0.0.1:{api.port}"
    finally:
        await api.stop()


def assert_dialect_401(dialect: str, body: dict) -> None:
    if dialect == "openai":
        assert body["error"]["type"] == "authentication_error" and body["error"]["code"] in ("missing_api_key", "invalid_api_key")
    elif dialect == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error" and body["error"]["message"]
    else:
        assert set(body) == {"error"} and isinstance(body["error"], str)


@pytest.mark.parametrize("dialect", sorted(CALLS))
async def test_missing_and_wrong_key_get_401_in_dialect(keyed, dialect):
    method, path, body = CALLS[dialect]
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}, {"Authorization": "Basic key-one"}):
            async with s.request(method, keyed + path, json=body, headers=headers) as resp:
                assert resp.status == 401, (headers, await resp.text())
                assert resp.headers["WWW-Authenticate"] == "Bearer"
                assert_dialect_401(dialect, await resp.json())
        for headers in ({"Authorization": "Bearer key-one"}, {"authorization": "bearer key-two"}, {"x-api-key": "key-two"}):
            async with s.request(method, keyed + path, json=body, headers=headers) as resp:
                assert resp.status == 200, (headers, await resp.text())


async def test_official_clients_wrong_and_right_key(keyed):
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=f"{keyed}/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model=MODEL, messages=HI, max_tokens=2)
    r = await openai.AsyncOpenAI(base_url=f"{keyed}/v1", api_key="key-one", max_retries=0).chat.completions.create(
        model=MODEL, messages=HI, max_tokens=2)
    assert r.usage.completion_tokens == 2

    with pytest.raises(anthropic.AuthenticationError) as e:
        await anthropic.AsyncAnthropic(base_url=keyed, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, messages=HI, max_tokens=2)
    assert e.value.body["error"]["type"] == "authentication_error"
    m = await anthropic.AsyncAnthropic(base_url=keyed, api_key="key-two", max_retries=0).messages.create(
        model=MODEL, messages=HI, max_tokens=2)
    assert m.usage.output_tokens == 2

    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(ollama.ResponseError) as e:
            await ollama.AsyncClient(host=keyed, headers=headers).chat(model=MODEL, messages=HI, options={"num_predict": 2})
        assert e.value.status_code == 401
    with pytest.raises(ollama.ResponseError) as e:
        await ollama.AsyncClient(host=keyed).list()
    assert e.value.status_code == 401
    client = ollama.AsyncClient(host=keyed, headers={"Authorization": "Bearer key-one"})
    assert (await client.chat(model=MODEL, messages=HI, options={"num_predict": 2})).eval_count == 2
    assert f"{MODEL}:latest" in [m.model for m in (await client.list()).models]


async def test_web_page_and_health_stay_public(keyed):
    async with aiohttp.ClientSession() as s:
        for path in ("/", "/app.js", "/health", "/healthcheck"):
            async with s.get(keyed + path) as resp:
                assert resp.status == 200, path
        async with s.get(keyed + "/health") as resp:
            assert (await resp.json())["auth_required"] is True
        for path in ("/metrics", "/v1/models", "/v1/topology", "/api/tags", "/api/version"):
            async with s.get(keyed + path) as resp:
                assert resp.status == 401, path
        async with s.get(keyed + "/metrics", headers={"Authorization": "Bearer key-one"}) as resp:
            assert resp.status == 200
        # a browser's CORS preflight carries no credentials
        async with s.options(keyed + "/v1/chat/completions", headers={
                "Origin": "http://example.invalid", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"}) as resp:
            assert resp.status == 204


async def test_public_paths_are_configurable(dummy_api, tinychat_dir):
    api = await _start(dummy_api.node, tinychat_dir=tinychat_dir,
                       auth=AuthConfig(api_keys=KEYS, public_paths=["/metrics", "/api/v*"], web_ui_public=False))
    base = f"http://127.0.0.1:{api.port}"
    try:
        async with aiohttp.ClientSession() as s:
            for path, status in (("/metrics", 200), ("/api/version", 200), ("/", 401), ("/app.js", 401),
                                 ("/health", 401), ("/api/tags", 401)):
                async with s.get(base + path) as resp:
                    assert resp.status == status, path
    finally:
        await api.stop()


async def test_no_keys_means_open(dummy_api):
    async with aiohttp.ClientSession() as s:
        method, path, body = CALLS["anthropic"]
        async with s.request(method, dummy_api.api_url + path, json=body) as resp:
            assert resp.status == 200
        async with s.get(dummy_api.api_url + "/health") as resp:
            assert (await resp.json())["auth_required"] is False


async def test_key_checks():
    assert check_key("key-one", KEYS) and check_key("key-two", KEYS)
    assert not check_key("key-on", KEYS) and not check_key(None, KEYS) and not check_key("", KEYS)
    cfg = AuthConfig(api_keys=KEYS)
    assert is_public("/", cfg) and is_public("/js/app.js", cfg) and is_public("/health", cfg)
    assert not is_public("/v1/models", cfg) and not is_public("/api/tags", cfg) and not is_public("/metrics", cfg)
    assert not is_public("/chat/completions", cfg) and not is_public("/completions", cfg)
    with pytest.raises(ValueError, match="api_keys"):
        AuthConfig(api_keys=["ok", " "])
