"""Every engine against the torch engine, on the same weights and a chat prompt.

Each engine runs the model split in two shards (layers 0-14 and 15-29, two engine instances),
so both inputs of the interface are exercised: token ids into the first shard, float32 hidden
states (the wire format) into the second.

Tolerance: logits within 2e-3 absolute of torch's (logits of this model reach ~30 in magnitude).
All engines compute in float32 from the same dequantized weights; what differs is the order of
floating-point sums (BLAS kernels, tinygrad's generated kernels, fused attention), which
measured here gives differences of ~1e-4 after 30 layers. 2e-3 leaves an order of magnitude of
headroom and is still far below the gap between the top two logits of every greedy step, which
the token test checks exactly (32 tokens).

An engine whose package (or tinygrad's clang) is missing is skipped with the reason.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import pytest_asyncio

from exo.inference.engine_common import RequestCaches
from exo.inference.shard import Shard
from helpers import smollm2_gguf_path

from exo.inference.tokenizers import tokenizer_for_path

asyncio_test = pytest.mark.asyncio(loop_scope="session")

MODEL = "smollm2-135m"
HALVES = (Shard(MODEL, 0, 14, 30), Shard(MODEL, 15, 29, 30))
N_TOKENS = 32
LOGITS_ATOL = 2e-3


def chat_prompt() -> list[int]:
    tok = tokenizer_for_path(smollm2_gguf_path())
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]))


async def run(engines, prompt: list[int], n: int, request_id: str = "r") -> tuple[np.ndarray, list[int]]:
    """Greedy decoding through the two halves; returns the prefill logits and ``n`` tokens."""
    x, pos, tokens, first_logits = np.asarray([prompt], dtype=np.int64), 0, [], None
    for _ in range(n):
        h = x
        for engine, shard in zip(engines, HALVES):
            h = await engine.infer_tensor(request_id, shard, h, pos)
            if not shard.is_last_layer:
                assert h.dtype == np.float32 and h.shape == (1, x.shape[1], 576)
        assert h.dtype == np.float32 and h.shape == (49152,)
        if first_logits is None:
            first_logits = h
        pos += x.shape[1]
        tokens.append(int(np.argmax(h)))
        x = np.asarray([[tokens[-1]]], dtype=np.int64)
    for engine in engines:
        await engine.clear_request(request_id)
    return first_logits, tokens


async def load_pair(name: str):
    from exo.inference.inference_engine import get_inference_engine

    engines = [get_inference_engine(name), get_inference_engine(name)]
    for engine, shard in zip(engines, HALVES):
        await engine.ensure_shard(shard)
    return engines


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def torch_pair():
    """The reference: two torch engines holding the same halves."""
    pytest.importorskip("torch", reason="the torch engine is the reference: pip install -e .[torch]")
    engines = await load_pair("torch")
    yield engines
    for e in engines:
        await e.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def reference(torch_pair):
    """The chat prompt, and the torch engine's prefill logits and greedy tokens for it."""
    prompt = chat_prompt()
    logits, tokens = await run(torch_pair, prompt, N_TOKENS)
    return prompt, logits, tokens


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def long_reference(torch_pair):
    """A ~300-token prompt (past the engines' first KV cache capacity of 256), with torch's
    prefill logits and 3 greedy tokens."""
    tok = tokenizer_for_path(smollm2_gguf_path())
    text = "The lighthouse keeper counted the ships that passed his rock every night. " * 20
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": text + "How many ships?"}]))
    assert 256 < len(prompt) < 400
    logits, tokens = await run(torch_pair, prompt, 3)
    return prompt, logits, tokens


def _require(name: str) -> None:
    if name == "tinygrad":
        pytest.importorskip("tinygrad", reason="tinygrad is not installed: pip install -e .[tinygrad]")
        if shutil.which("clang") is None:
            pytest.skip("tinygrad's CPU device needs clang (apt-get install clang)")
        pytest.importorskip("exo.inference.tinygrad.engine")
    elif name == "mlx":
        # importing the engine module first loads OpenBLAS, before mlx.core
        pytest.importorskip("exo.inference.mlx.engine", reason="mlx is not installed: pip install -e .[mlx]")


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=["tinygrad", "mlx"])
async def engine_pair(request):
    """Two engines of one kind holding layers 0-14 and 15-29."""
    _require(request.param)
    engines = await load_pair(request.param)
    yield request.param, engines
    for e in engines:
        await e.close()


@asyncio_test
async def test_engine_matches_torch_logits_and_greedy_tokens(engine_pair, reference):
    name, engines = engine_pair
    prompt, ref_logits, ref_tokens = reference
    logits, tokens = await run(engines, prompt, N_TOKENS)
    diff = float(np.abs(logits - ref_logits).max())
    assert diff < LOGITS_ATOL, f"{name} logits differ from torch's by {diff}"
    assert tokens == ref_tokens
    assert all(not e.cached_request_ids() for e in engines)


@asyncio_test
async def test_engine_kv_cache_rules_and_chunked_prompt(engine_pair, reference):
    """Position rules of the interface; a prompt fed in two chunks gives the same logits."""
    name, (first, last) = engine_pair
    prompt, ref_logits, _ = reference
    s1, s2 = HALVES
    ids = np.asarray([prompt], dtype=np.int64)
    cut = 21  # not a multiple of any chunk size
    h1 = await first.infer_tensor("a", s1, ids[:, :cut], 0)
    await last.infer_tensor("a", s2, h1, 0)
    with pytest.raises(ValueError, match="position"):
        await first.infer_tensor("a", s1, ids[:, cut:], cut + 1)
    with pytest.raises(KeyError):
        await first.infer_tensor("unknown", s1, ids[:, cut:], cut)
    with pytest.raises(ValueError, match="token ids"):
        await first.infer_tensor("b", s1, np.zeros((1, 3, 576), dtype=np.float32), 0)
    with pytest.raises(ValueError, match="hidden states"):
        await last.infer_tensor("b", s2, ids, 0)
    h2 = await first.infer_tensor("a", s1, ids[:, cut:], cut)
    logits = await last.infer_tensor("a", s2, h2, cut)
    assert float(np.abs(logits - ref_logits).max()) < LOGITS_ATOL
    assert first.cached_request_ids() == {"a"} and last.cached_request_ids() == {"a"}
    for e in (first, last):
        await e.clear_request("a")
        assert e.cached_request_ids() == set()


def test_request_caches_bound_and_position_rules():
    class C:
        def __init__(self):
            self.offset = 0

    caches = RequestCaches(max_requests=2, ttl=600)
    a = caches.for_step("a", 0, 3, 100, C)
    a.offset = 3
    assert caches.for_step("a", 3, 1, 100, C) is a
    with pytest.raises(ValueError, match="exceed the context"):
        caches.for_step("a", 3, 98, 100, C)
    caches.for_step("b", 0, 1, 100, C)
    caches.for_step("c", 0, 1, 100, C)  # evicts "a", the least recently used
    assert caches.ids() == {"b", "c"}
    with pytest.raises(KeyError):
        caches.for_step("a", 3, 1, 100, C)
    caches.ttl = 0
    caches.evict_idle()
    assert caches.ids() == set()


def test_default_engine_choice_is_installed():
    import importlib.util

    from exo.inference.inference_engine import ENGINES, default_engine_name

    name = default_engine_name()
    assert name in ENGINES and name != "dummy"
    module = {"torch": "torch", "tinygrad": "tinygrad", "mlx": "mlx"}[name]
    assert importlib.util.find_spec(module) is not None


@asyncio_test
async def test_engine_kv_cache_grows_past_its_first_capacity(engine_pair, long_reference):
    """Outgrowing the first KV cache buffers (a new capacity: new graphs in tinygrad) keeps the
    logits and the next tokens equal to torch's."""
    _, engines = engine_pair
    prompt, ref_logits, ref_tokens = long_reference
    logits, tokens = await run(engines, prompt, 3)
    assert float(np.abs(logits - ref_logits).max()) < LOGITS_ATOL
    assert tokens == ref_tokens


def test_mlx_binds_openblas_on_linux():
    """On Linux, mlx's bundled reference BLAS is ~50x slower: the engine package loads OpenBLAS
    before mlx.core whenever the system has it (scripts/test.sh installs it)."""
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("only the Linux CPU build of mlx bundles the slow BLAS")
    pytest.importorskip("exo.inference.mlx.engine", reason="mlx is not installed: pip install -e .[mlx]")
    if ctypes.util.find_library("openblas") is None:
        pytest.skip("no system OpenBLAS (apt-get install libopenblas0-pthread)")
    import exo.inference.mlx as exo_mlx

    assert exo_mlx.blas_library, "mlx.core was imported before exo.inference.mlx, or OpenBLAS failed to load"


def test_tinygrad_cpu_without_clang_is_a_clear_error(monkeypatch):
    pytest.importorskip("tinygrad", reason="tinygrad is not installed: pip install -e .[tinygrad]")
    from exo.inference.tinygrad.engine import _EXECUTOR, tinygrad_device

    if shutil.which("clang") and _EXECUTOR.submit(tinygrad_device).result().split(":")[0] != "CPU":
        pytest.skip("tinygrad runs on a GPU here")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError, match="clang"):
        _EXECUTOR.submit(tinygrad_device).result()  # tinygrad calls stay on the tinygrad thread


def test_tinygrad_kv_cache_grows_by_doubling_up_to_its_maximum():
    pytest.importorskip("tinygrad", reason="tinygrad is not installed: pip install -e .[tinygrad]")
    if shutil.which("clang") is None:
        pytest.skip("tinygrad's CPU device needs clang (apt-get install clang)")
    from exo.inference.tinygrad.engine import _EXECUTOR
    from exo.inference.tinygrad.model import KVCache

    def grow():  # on the tinygrad thread, as the engine runs it
        from tinygrad import Tensor

        cache = KVCache(1, 1, 2, capacity=4, max_capacity=10)
        cache.kv[0] = Tensor.arange(16, dtype="float32").reshape(2, 1, 1, 4, 2).contiguous().realize()
        sizes = []
        for n in (4, 5, 9):
            cache.reserve(n)
            sizes.append(cache.capacity)
        with pytest.raises(ValueError, match="maximum of 10"):
            cache.reserve(11)
        return sizes, cache.kv[0].numpy()

    sizes, kv = _EXECUTOR.submit(grow).result()
    assert sizes == [4, 8, 10]
    assert kv.shape == (2, 1, 1, 10, 2)
    assert np.array_equal(kv[:, :, :, :4].reshape(-1), np.arange(16, dtype=np.float32)) and not kv[:, :, :, 4:].any()
