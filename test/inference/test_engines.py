"""The tinygrad and MLX engines against transformers, on the same weights.

Tiny random-weight models (``test/tiny_models.py``: 4 layers, hidden 64) of every architecture
the engines run (llama with Llama 3.1 RoPE scaling and an untied head, mistral with a sliding
window of 6, qwen2 with q/k/v bias and a tied head), read from their safetensors directory and
from a GGUF file: last-position logits of a 12-token prompt on one shard and on two shards (the
first's hidden states into the second) within 1e-4 of transformers' float32 forward, and 24
greedy tokens identical to ``generate(do_sample=False)``. The models the engines do not run
(qwen3, gemma3, phi3) are refused with a reason.

SmolLM2-135M (the registry's GGUF, Q4_1 dequantized to float32) split in two shards (layers
0-14 and 15-29, two engine instances): against transformers' ``LlamaForCausalLM`` holding the
same dequantized tensors. Tolerance 2e-3: every implementation computes in float32 from the same
weights, but the order of floating-point sums differs (BLAS kernels, tinygrad's generated
kernels, fused attention), which after 30 layers gives differences of ~1e-4 on logits of ~30;
the greedy tokens, far apart at every step, are checked exactly (32 tokens).

An engine whose package (or tinygrad's clang) is missing is skipped with the reason.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from helpers import smollm2_gguf_path

from exo.inference.engine_common import RequestCaches
from exo.inference.shard import Shard
from exo.inference.tokenizers import tokenizer_for_path
from exo.models.architectures import UnsupportedModelError

asyncio_test = pytest.mark.asyncio(loop_scope="session")

ENGINES = ("tinygrad", "mlx")
MODEL = "smollm2-135m"
HALVES = (Shard(MODEL, 0, 14, 30), Shard(MODEL, 15, 29, 30))
N_TOKENS = 32
LOGITS_ATOL = 2e-3

TINY_ARCHS = ("llama", "mistral", "qwen2")
UNSUPPORTED_ARCHS = {"qwen3": "QK norm", "gemma3": "QK norm", "phi3": "LongRoPE"}
TINY_PROMPT = [5, 17, 99, 200, 3, 45, 67, 300, 12, 8, 150, 77]
TINY_LONG_PROMPT = TINY_PROMPT + [(7 * i + 11) % 384 for i in range(16)]  # 28 tokens: two of tinygrad's prefill chunks
TINY_TOKENS = 24
TINY_ATOL = 1e-4


def _require(name: str) -> None:
    if name == "tinygrad":
        pytest.importorskip("tinygrad", reason="tinygrad is not installed: pip install -e .[tinygrad]")
        if shutil.which("clang") is None:
            pytest.skip("tinygrad's CPU device needs clang (apt-get install clang)")
        pytest.importorskip("exo.inference.tinygrad.engine")
    elif name == "mlx":
        # importing the engine module first loads OpenBLAS, before mlx.core
        pytest.importorskip("exo.inference.mlx.engine", reason="mlx is not installed: pip install -e .[mlx]")


class Engines:
    """Engines of one kind, one per shard, loaded on first use and kept for the module."""

    def __init__(self, name: str):
        self.name = name
        self._by_shard: dict[Shard, object] = {}

    async def get(self, shard: Shard):
        from exo.inference.inference_engine import get_inference_engine

        if shard not in self._by_shard:
            engine = get_inference_engine(self.name)
            await engine.ensure_shard(shard)
            self._by_shard[shard] = engine
        return self._by_shard[shard]

    async def stages(self, *shards: Shard) -> list[tuple[object, Shard]]:
        return [(await self.get(s), s) for s in shards]

    async def close(self) -> None:
        for e in self._by_shard.values():
            await e.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=ENGINES)
async def engines(request):
    _require(request.param)
    es = Engines(request.param)
    yield es
    await es.close()


async def step(stages, ids: np.ndarray, position: int, request_id: str) -> np.ndarray:
    """One step through every stage: token ids in, the last stage's output out."""
    h = ids
    for engine, shard in stages:
        h = await engine.infer_tensor(request_id, shard, h, position)
        if not shard.is_last_layer:
            assert h.dtype == np.float32 and h.ndim == 3 and h.shape[:2] == ids.shape
    return h


async def run(stages, prompt: list[int], n: int, request_id: str = "r") -> tuple[np.ndarray, list[int]]:
    """Greedy decoding (a prefill, then one-token steps); returns the prefill logits and ``n`` tokens."""
    x, pos, tokens, first_logits = np.asarray([prompt], dtype=np.int64), 0, [], None
    for _ in range(n):
        logits = await step(stages, x, pos, request_id)
        assert logits.dtype == np.float32 and logits.ndim == 1
        if first_logits is None:
            first_logits = logits
        pos += x.shape[1]
        tokens.append(int(np.argmax(logits)))
        x = np.asarray([[tokens[-1]]], dtype=np.int64)
    for engine, _ in stages:
        await engine.clear_request(request_id)
    return first_logits, tokens


# ---------------------------------------------------------------------------- tiny models


@dataclass
class Tiny:
    """A tiny model saved both ways, with transformers' answers for ``TINY_PROMPT``."""

    arch: str
    directory: Path
    gguf: Path
    logits: dict[str, np.ndarray] = field(default_factory=dict)  # by format: last-position logits; "long": TINY_LONG_PROMPT's
    tokens: list[int] = field(default_factory=list)  # greedy continuation

    def model_id(self, fmt: str) -> str:
        return str(self.directory if fmt == "safetensors" else self.gguf)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Tiny]:
    """Each tiny model built once, and transformers' logits and greedy tokens for it."""
    pytest.importorskip("transformers")
    import torch
    from tiny_models import build_hf_model, write_gguf
    from transformers import AutoModelForCausalLM

    out = {}
    root = tmp_path_factory.mktemp("tiny")
    ids = torch.tensor([TINY_PROMPT])
    for arch in TINY_ARCHS:
        directory = build_hf_model(arch, root / arch)
        t = Tiny(arch, directory, write_gguf(directory, root / f"{arch}.gguf"))
        ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        with torch.no_grad():
            t.logits["safetensors"] = ref(ids).logits[0, -1].numpy()
            t.logits["long"] = ref(torch.tensor([TINY_LONG_PROMPT])).logits[0, -1].numpy()
            generated = ref.generate(ids, do_sample=False, max_new_tokens=TINY_TOKENS, eos_token_id=None, pad_token_id=0)
            t.tokens = generated[0, len(TINY_PROMPT):].tolist()
            assert len(t.tokens) == TINY_TOKENS
            if arch == "mistral":
                # llama.cpp writes Mistral as a llama GGUF, which has no sliding window
                ref.config.sliding_window = None
                t.logits["gguf"] = ref(ids).logits[0, -1].numpy()
            else:
                t.logits["gguf"] = t.logits["safetensors"]
        out[arch] = t
    return out


def _tiny_shards(model_id: str) -> dict[str, tuple[Shard, ...]]:
    return {"one shard": (Shard(model_id, 0, 3, 4),), "two shards": (Shard(model_id, 0, 1, 4), Shard(model_id, 2, 3, 4))}


@asyncio_test
@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
async def test_tiny_model_logits_match_transformers(engines, tiny_models, arch, fmt):
    t = tiny_models[arch]
    for split, shards in _tiny_shards(t.model_id(fmt)).items():
        stages = await engines.stages(*shards)
        logits = await step(stages, np.asarray([TINY_PROMPT], dtype=np.int64), 0, "a")
        for engine, _ in stages:
            await engine.clear_request("a")
        diff = float(np.abs(logits - t.logits[fmt]).max())
        assert diff < TINY_ATOL, f"{engines.name} {arch} {fmt} {split}: logits differ from transformers' by {diff}"


@asyncio_test
@pytest.mark.parametrize("arch", TINY_ARCHS)
async def test_tiny_model_greedy_tokens_match_transformers(engines, tiny_models, arch):
    """Prefill, then one-token steps (mistral's window of 6 is passed from the prompt on)."""
    t = tiny_models[arch]
    for shards in _tiny_shards(t.model_id("safetensors")).values():
        _, tokens = await run(await engines.stages(*shards), TINY_PROMPT, TINY_TOKENS)
        assert tokens == t.tokens


@asyncio_test
@pytest.mark.parametrize("arch", TINY_ARCHS)
async def test_tiny_model_prompt_in_two_calls(engines, tiny_models, arch):
    """A 28-token prompt fed as 9 + 19 tokens gives transformers' logits: in tinygrad the second
    call is two prefill chunks of 16, so mistral's windows straddle calls and chunks."""
    t = tiny_models[arch]
    stages = await engines.stages(*_tiny_shards(t.model_id("safetensors"))["two shards"])
    ids = np.asarray([TINY_LONG_PROMPT], dtype=np.int64)
    await step(stages, ids[:, :9], 0, "w")
    logits = await step(stages, ids[:, 9:], 9, "w")
    for engine, _ in stages:
        await engine.clear_request("w")
    assert float(np.abs(logits - t.logits["long"]).max()) < TINY_ATOL


@pytest.fixture(scope="module")
def unsupported_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny qwen3, gemma3 and phi3 models (no reference needed)."""
    pytest.importorskip("transformers")
    from tiny_models import build_hf_model

    root = tmp_path_factory.mktemp("unsupported")
    return {arch: build_hf_model(arch, root / arch) for arch in UNSUPPORTED_ARCHS}


@asyncio_test
@pytest.mark.parametrize("arch", sorted(UNSUPPORTED_ARCHS))
async def test_unsupported_architecture_is_refused_with_its_reason(engines, unsupported_models, arch):
    from exo.inference.inference_engine import get_inference_engine, unsupported_reason
    from exo.models.sources import open_model

    model_id = str(unsupported_models[arch])
    args = open_model(model_id).args
    engine = get_inference_engine(engines.name)
    reason = engine.unsupported_reason(args)
    assert reason is not None and arch in reason and UNSUPPORTED_ARCHS[arch] in reason and "\n" not in reason
    assert unsupported_reason(engines.name, args) == reason  # what a peer answers from the engine's name
    with pytest.raises(UnsupportedModelError, match=UNSUPPORTED_ARCHS[arch]) as e:
        await engine.ensure_shard(Shard(model_id, 0, args.n_layers - 1, args.n_layers))
    assert reason in str(e.value)
    assert engine.shard is None


@asyncio_test
async def test_supported_models_have_no_reason_and_a_variant_is_named(engines, tiny_models):
    """The supported tiny models pass ``unsupported_reason``; a llama whose checkpoint adds a
    feature the engine lacks (a GGUF with QK norm tensors) is refused naming it."""
    import dataclasses

    from exo.inference.inference_engine import get_inference_engine
    from exo.models.sources import open_model

    engine = get_inference_engine(engines.name)
    assert type(engine).supported_architectures == frozenset(TINY_ARCHS)
    for t in tiny_models.values():
        for fmt in ("safetensors", "gguf"):
            assert engine.unsupported_reason(open_model(t.model_id(fmt)).args) is None
    args = open_model(tiny_models["llama"].model_id("safetensors")).args
    odd = dataclasses.replace(args, block=dataclasses.replace(args.block, qk_norm=True), embed_scale=8.0)
    reason = engine.unsupported_reason(odd)
    assert "llama" in reason and "QK norm" in reason and "scaled token embedding" in reason


@asyncio_test
async def test_layer_count_mismatch_is_refused(engines, tiny_models):
    from exo.inference.inference_engine import get_inference_engine

    engine = get_inference_engine(engines.name)
    with pytest.raises(ValueError, match="5 layers but .* has 4"):
        await engine.ensure_shard(Shard(tiny_models["llama"].model_id("gguf"), 0, 4, 5))


# ---------------------------------------------------------------------------- SmolLM2-135M


def chat_prompt() -> list[int]:
    tok = tokenizer_for_path(smollm2_gguf_path())
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]))


def long_prompt() -> list[int]:
    """A ~300-token prompt (past the engines' first KV cache capacity of 256)."""
    tok = tokenizer_for_path(smollm2_gguf_path())
    text = "The lighthouse keeper counted the ships that passed his rock every night. " * 20
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": text + "How many ships?"}]))
    assert 256 < len(prompt) < 400
    return prompt


@pytest.fixture(scope="module")
def smollm2_reference():
    """transformers' ``LlamaForCausalLM`` holding SmolLM2's dequantized tensors: the prefill
    logits and greedy tokens of the chat prompt (32) and of the long prompt (3)."""
    pytest.importorskip("transformers")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    from exo.models.architectures import HF_GLOBAL, architecture, parse_layer_name
    from exo.models.sources import open_model

    weights = open_model(MODEL)
    a = weights.args
    config = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                         num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                         head_dim=a.head_dim, rms_norm_eps=a.rms_norm_eps, max_position_embeddings=a.max_seq_len,
                         rope_parameters={"rope_type": "default", "rope_theta": a.ropes[0].theta},
                         tie_word_embeddings=a.tie_word_embeddings)
    hf_layer = architecture("llama").hf_layer
    state = {}
    for name, arr in weights.load_shard(0, a.n_layers - 1).items():
        parsed = parse_layer_name(name)
        if parsed:
            hf = f"model.layers.{parsed[0]}.{hf_layer[parsed[1]]}"
        else:
            hf = HF_GLOBAL[name] if name == "output" else f"model.{HF_GLOBAL[name]}"
        state[hf] = torch.from_numpy(arr)
    with no_init_weights():  # every weight comes from the checkpoint
        model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    model.eval()

    def greedy(prompt: list[int], n: int) -> tuple[np.ndarray, list[int]]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[0, len(prompt):].tolist()
        assert len(tokens) == n
        return out.logits[0][0].numpy(), tokens

    prompt, long = chat_prompt(), long_prompt()
    return {"chat": (prompt, *greedy(prompt, N_TOKENS)), "long": (long, *greedy(long, 3))}


@asyncio_test
async def test_engine_matches_transformers_logits_and_greedy_tokens(engines, smollm2_reference):
    prompt, ref_logits, ref_tokens = smollm2_reference["chat"]
    stages = await engines.stages(*HALVES)
    logits, tokens = await run(stages, prompt, N_TOKENS)
    assert logits.shape == (49152,)
    diff = float(np.abs(logits - ref_logits).max())
    assert diff < LOGITS_ATOL, f"{engines.name} logits differ from transformers' by {diff}"
    assert tokens == ref_tokens
    assert all(not e.cached_request_ids() for e, _ in stages)


@asyncio_test
async def test_engine_kv_cache_rules_and_chunked_prompt(engines, smollm2_reference):
    """Position rules of the interface; a prompt fed in two chunks gives the same logits."""
    prompt, ref_logits, _ = smollm2_reference["chat"]
    (first, s1), (last, s2) = await engines.stages(*HALVES)
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


@asyncio_test
async def test_engine_kv_cache_grows_past_its_first_capacity(engines, smollm2_reference):
    """Outgrowing the first KV cache buffers (a new capacity: new graphs in tinygrad) keeps the
    logits and the next tokens equal to transformers'."""
    prompt, ref_logits, ref_tokens = smollm2_reference["long"]
    logits, tokens = await run(await engines.stages(*HALVES), prompt, 3)
    assert float(np.abs(logits - ref_logits).max()) < LOGITS_ATOL
    assert tokens == ref_tokens


# ---------------------------------------------------------------------------- engine parts


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
