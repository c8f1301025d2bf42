"""Fixtures of the API tests.

* ``tiny_vocab``: a tiny real byte-level BPE tokenizer (no model files needed), for the
  token-handler unit tests.
* ``dummy_api``: a real node (launcher, Node, gRPC server, ChatAPI on 127.0.0.1) generating with
  the real ``DummyInferenceEngine``: its tokens are known in advance (``expected_tokens``), and
  its knobs (per-token delay, failing shard, forced tokens) give errors, timeouts and slow
  generations on demand. Each test gets it with the knobs reset.
"""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import pytest
import pytest_asyncio
from helpers import NodeUnderTest, loopback_config
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from exo.inference.tokenizers import Tokenizer, byte_level_decoder

WORDS = ["Hello", "Ġworld", "ĠParis", ".", "!", "ĠThe", "Ġcapital", "STOP", "ĠST", "OP", "Ġend"]
SPECIAL = "<|im_end|>"


class TinyVocab:
    """A byte-level BPE vocabulary: ids 0-255 are single bytes, then WORDS, then SPECIAL."""

    def __init__(self):
        byte_to_char = {b: c for c, b in byte_level_decoder().items()}
        tokens = [byte_to_char[b] for b in range(256)] + WORDS + [SPECIAL]
        self.ids = {t: i for i, t in enumerate(tokens)}
        backend = HFTokenizer(models.BPE(vocab=dict(self.ids), merges=[], fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(SPECIAL, special=True, normalized=False)])
        self.eos = self.ids[SPECIAL]
        self.tokenizer = Tokenizer(backend, chat_template=None, bos_token_id=None, eos_token_ids=[self.eos],
                                   special_token_ids=[self.eos])

    def word(self, w: str) -> int:
        return self.ids[w.replace(" ", "Ġ")]

    def byte_ids(self, text: str) -> list[int]:
        """One token per UTF-8 byte of ``text``."""
        return list(text.encode("utf-8"))


@pytest.fixture(scope="session")
def tiny_vocab() -> TinyVocab:
    return TinyVocab()


@pytest.fixture(scope="session")
def tinychat_dir(tmp_path_factory) -> Path:
    """A web UI directory with a file beside it that must never be served."""
    root = tmp_path_factory.mktemp("webroot")
    d = root / "tinychat"
    d.mkdir()
    (d / "index.html").write_text("<html>tinychat</html>")
    (d / "app.js").write_text("console.log(1)")
    (root / "secret.txt").write_text("secret")
    return d


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def _dummy_api_session(tinychat_dir) -> AsyncIterator[NodeUnderTest]:
    from exo.orchestration.launcher import start_node

    running = await start_node(loopback_config(node_id="api-dummy", discovery_module="none", inference_engine="dummy",
                                               tinychat_dir=tinychat_dir, image_threads=1))
    try:
        yield NodeUnderTest(running)
    finally:
        await running.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def dummy_api(_dummy_api_session) -> AsyncIterator[NodeUnderTest]:
    """The dummy-engine node with default knobs; they and the API's response timeout are reset
    after the test."""
    from exo.api.chat_api.state import STATE_KEY

    nut = _dummy_api_session
    engine, state = nut.node.engine, nut.running.api.app[STATE_KEY]
    timeout = state.response_timeout
    try:
        yield nut
    finally:
        engine.token_delay, engine.fail_layer, engine.fail_at_position, engine.forced_tokens = 0.0, None, 0, {}
        state.response_timeout = timeout
