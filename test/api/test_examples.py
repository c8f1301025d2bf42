"""The client scripts in examples/ run unchanged against a node (the dummy-engine node of
``dummy_api`` on 127.0.0.1, behind a key), each in its own process."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest
import pytest_asyncio

from exo.api.chat_api import ChatAPI
from exo.config import AuthConfig

pytestmark = pytest.mark.asyncio(loop_scope="session")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KEY = "example-key"


@pytest_asyncio.fixture(loop_scope="session")
async def keyed_url(dummy_api):
    api = ChatAPI(dummy_api.node, default_model="smollm2-135m", auth=AuthConfig(api_keys=[KEY]))
    await api.run("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{api.port}"
    finally:
        await api.stop()


async def _run(script: str, url: str, key: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "ANTHROPIC_", "OPENAI_"))}
    env.update(EXO_URL=url, EXO_API_KEY=key, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    proc = await asyncio.create_subprocess_exec(sys.executable, str(EXAMPLES / script), "Say hi.", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode, out.decode(errors="replace")


@pytest.mark.parametrize("script", ["openai_client.py", "ollama_client.py", "anthropic_client.py"])
async def test_example_runs(keyed_url, script):
    rc, out = await _run(script, keyed_url, KEY)
    assert rc == 0, out
    assert out.strip()
