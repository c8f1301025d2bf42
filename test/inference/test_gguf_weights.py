"""The GGUF block kernels (exo/inference/torch/kernels) and the engine's weights="gguf" mode,
against gguf-py's own dequantization of the shipped file."""

import numpy as np
import pytest
import torch

from exo.inference.shard import Shard
from exo.inference.torch.engine import TorchInferenceEngine
from exo.inference.torch.gguf_weights import KERNEL_MAX_ROWS, Q4_1, Q8_0, GGUFEmbedding, GGUFLinear
from exo.inference.torch.kernels import gguf_kernels_error, load_portable_kernels
from exo.models.gguf import open_gguf
from exo.models.sources import STORE

MODEL = "smollm2-135m"

pytestmark = pytest.mark.skipif(gguf_kernels_error() is not None, reason=f"GGUF block kernels unavailable: {gguf_kernels_error()}")


@pytest.fixture(scope="module")
def tensors():
    """(raw blocks, gguf-py's float32 dequantization, GGML type) of a Q4_1 and a Q8_0 matrix."""
    from gguf.quants import dequantize

    by_name = {t.name: t for t in open_gguf(STORE.card(MODEL).path).tensors}
    out = {}
    for name in ("blk.3.ffn_down.weight", "blk.0.attn_k.weight", "token_embd.weight"):
        t = by_name[name]
        rows = slice(0, 2048)  # a part of the 49152-row embedding is enough
        out[name] = (np.array(t.data[rows]), np.array(dequantize(t.data[rows], t.tensor_type), dtype=np.float32), int(t.tensor_type))
    assert {v[2] for v in out.values()} == {Q4_1, Q8_0}
    return out


@pytest.fixture(scope="module", params=["avx512-or-native", "portable"])
def ops(request):
    if request.param == "portable":
        return load_portable_kernels()
    return torch.ops.exo_gguf


def test_pack_and_dequantize_equal_gguf_py_exactly(tensors, ops):
    for name, (raw, ref, qtype) in tensors.items():
        tiles = ops.pack(torch.from_numpy(raw), qtype)
        rows = torch.tensor([[0, 1, 17], [raw.shape[0] - 1, 5, 16]])
        got = ops.dequantize_rows(tiles, qtype, ref.shape[1], rows)
        assert got.shape == (2, 3, ref.shape[1])
        assert torch.equal(got, torch.from_numpy(ref[rows.numpy()])), name
        assert torch.equal(ops.dequantize_t(tiles, qtype, ref.shape[1]), torch.from_numpy(ref).T), name


@pytest.mark.parametrize("m", [1, 3, 4, 5, 8, 33])
def test_linear_equals_a_float32_matmul_on_the_dequantized_weights(tensors, ops, m):
    gen = torch.Generator().manual_seed(m)
    for name, (raw, ref, qtype) in tensors.items():
        tiles = ops.pack(torch.from_numpy(raw), qtype)
        x = torch.randn(m, ref.shape[1], generator=gen)
        exact = x.double() @ torch.from_numpy(ref).double().T
        got = ops.linear(x, tiles, qtype)
        dense = x @ torch.from_numpy(ref).T
        # float32 accumulation in another order: the same size of error as the dense matmul's
        scale = exact.abs().max().item()
        assert (got.double() - exact).abs().max().item() < 1e-5 * scale + 1e-5, name
        assert (dense.double() - exact).abs().max().item() < 1e-5 * scale + 1e-5, name


@pytest.fixture
def amx_for_every_batch():
    """The AMX tile path for every product of rows, restored afterwards; skipped where the
    kernels were built without it or the OS refuses the tile state."""
    before = torch.ops.exo_gguf.amx_rows()
    if before == 0:
        pytest.skip("no AMX tile path on this machine")
    assert torch.ops.exo_gguf.set_amx_rows(1) == 1
    yield
    torch.ops.exo_gguf.set_amx_rows(before)


@pytest.mark.parametrize("m", [1, 8, 16, 33])
def test_the_amx_path_keeps_the_float32_bound(tensors, amx_for_every_batch, m):
    """bfloat16 tiles with each activation split into two parts: within the float32 path's
    bound, for one row, a whole tile of rows and rows beyond one tile."""
    gen = torch.Generator().manual_seed(100 + m)
    for name, (raw, ref, qtype) in tensors.items():
        tiles = torch.ops.exo_gguf.pack(torch.from_numpy(raw), qtype)
        x = torch.randn(m, ref.shape[1], generator=gen) * torch.logspace(-2, 1, ref.shape[1])[torch.randperm(ref.shape[1], generator=gen)]
        exact = x.double() @ torch.from_numpy(ref).double().T
        got = torch.ops.exo_gguf.linear(x, tiles, qtype)
        scale = exact.abs().max().item()
        assert (got.double() - exact).abs().max().item() < 1e-5 * scale + 1e-5, name


def test_the_amx_threshold_takes_only_a_row_count():
    with pytest.raises(RuntimeError, match="rows must be >= 0"):
        torch.ops.exo_gguf.set_amx_rows(-1)


def test_bad_arguments_raise_clear_errors(tensors):
    raw, ref, qtype = tensors["blk.3.ffn_down.weight"]
    tiles = torch.ops.exo_gguf.pack(torch.from_numpy(raw), qtype)
    with pytest.raises(RuntimeError, match="inputs per row"):
        torch.ops.exo_gguf.linear(torch.zeros(1, 64), tiles, qtype)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.exo_gguf.linear(torch.zeros(1, ref.shape[1], dtype=torch.float64), tiles, qtype)
    with pytest.raises(RuntimeError, match="unsupported GGML type"):
        torch.ops.exo_gguf.linear(torch.zeros(1, ref.shape[1]), tiles, 12)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.exo_gguf.pack(torch.from_numpy(raw[:15]), qtype)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.exo_gguf.dequantize_rows(tiles, qtype, ref.shape[1], torch.tensor([raw.shape[0]]))
    with pytest.raises(ValueError, match="multiple of 16"):
        GGUFLinear(576, 100, Q4_1)
    with pytest.raises(ValueError, match="not supported"):
        GGUFEmbedding(64, 64, 14)


def test_modules_use_the_kernel_for_decode_and_a_matmul_for_prefill(tensors):
    raw, ref, qtype = tensors["blk.3.ffn_down.weight"]
    layer = GGUFLinear(ref.shape[1], ref.shape[0], qtype)
    layer.load_rows(0, raw)
    for rows in (1, KERNEL_MAX_ROWS + 1):  # both paths
        x = torch.randn(1, rows, ref.shape[1])
        np.testing.assert_allclose(layer(x).numpy(), (x @ torch.from_numpy(ref).T).numpy(), atol=1e-4, rtol=0)
    raw, ref, qtype = tensors["token_embd.weight"]
    emb = GGUFEmbedding(ref.shape[0], ref.shape[1], qtype)
    emb.load_rows(0, raw)
    ids = torch.tensor([[3, 2047, 0]])
    assert torch.equal(emb(ids), torch.from_numpy(ref[ids.numpy()]))


@pytest.mark.asyncio
async def test_engine_holds_the_file_blocks_by_default_on_a_cpu(monkeypatch):
    monkeypatch.delenv("EXO_TORCH_WEIGHTS", raising=False)
    monkeypatch.delenv("EXO_TORCH_DTYPE", raising=False)
    shard = Shard.full(MODEL, 30)
    auto = TorchInferenceEngine(device="cpu")
    await auto.ensure_shard(shard)
    dense = TorchInferenceEngine(device="cpu", weights="dense")
    await dense.ensure_shard(shard)
    assert (auto.requested_weights, auto.weights, dense.weights) == ("auto", "gguf", "dense")
    assert auto.dtype == torch.float32
    # Q4_1 layers and a Q8_0 embedding/head: under a fifth of the float32 bytes
    assert auto.weight_bytes() < 0.2 * dense.weight_bytes()
    await auto.close()
    await dense.close()
    with pytest.raises(ValueError, match="float32"):
        TorchInferenceEngine(device="cpu", weights="gguf", dtype="bfloat16")
    # asking for bfloat16 without naming the weights gets dense bfloat16 weights
    bf16 = TorchInferenceEngine(device="cpu", dtype="bfloat16")
    await bf16.ensure_shard(Shard(MODEL, 29, 29, 30))
    assert bf16.weights == "dense"
    await bf16.close()


def test_worker_threads_give_the_same_bits_and_sleep_after_a_pass(tensors):
    raw, ref, qtype = tensors["blk.3.ffn_down.weight"]
    ops = torch.ops.exo_gguf
    tiles = ops.pack(torch.from_numpy(raw), qtype)
    x = torch.randn(3, ref.shape[1])
    threads = ops.get_threads()
    try:
        ops.set_threads(1)
        alone = ops.linear(x, tiles, qtype)
        ops.set_threads(3)
        ops.set_spin(True)
        spread = ops.linear(x, tiles, qtype)
    finally:
        ops.set_spin(False)
        ops.set_threads(threads)
    assert torch.equal(alone, spread)  # each output row is one thread's work: no reordering

    # with spinning off the workers block at once: an idle process burns (almost) no CPU
    assert _cpu_share_while_idle() < 0.1
    # a pass under way (spin held): only threads - 1 workers spin, not the extra ones a larger
    # pool size left behind (they spun too, and a 2-core machine ran 20x slower)
    ops.set_threads(3)
    ops.set_threads(2)
    ops.set_spin(True)
    try:
        assert _cpu_share_while_idle() < 1.5
    finally:
        ops.set_spin(False)
        ops.set_threads(threads)


def _cpu_share_while_idle(seconds: float = 0.3) -> float:
    """CPU seconds this process uses per second of an interval in which the test does nothing."""
    import resource
    import time

    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    time.sleep(seconds)  # an idle interval to observe, not a synchronisation
    after = resource.getrusage(resource.RUSAGE_SELF)
    return ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) / (time.monotonic() - t0)


@pytest.mark.parametrize("h, kv, d", [(9, 3, 64), (32, 8, 128), (8, 1, 32), (12, 2, 96), (8, 4, 256), (14, 7, 80), (28, 4, 128),
                                     (12, 4, 72)])
def test_decode_attention_equals_sdpa_per_request_and_appends_to_each_cache(h, kv, d):
    """Head sizes with a vector kernel (multiples of 16 up to 256) and one without (72), groups
    of 1 to 8 query heads per KV head, more heads in a group than the kernel keeps at once (6, 7)."""
    gen = torch.Generator().manual_seed(0)
    b = 5
    offsets = [0, 1, 17, 200, 255]
    k_caches = [torch.randn(1, kv, 256, d, generator=gen) for _ in range(b)]
    v_caches = [torch.randn(1, kv, 256, d, generator=gen) for _ in range(b)]
    q, k_new, v_new = torch.randn(b, h, d, generator=gen), torch.randn(b, kv, d, generator=gen), torch.randn(b, kv, d, generator=gen)
    expected = []
    for i, off in enumerate(offsets):
        k, v = k_caches[i].clone(), v_caches[i].clone()
        k[0, :, off], v[0, :, off] = k_new[i], v_new[i]
        expected.append(torch.nn.functional.scaled_dot_product_attention(
            q[i:i + 1, :, None], k[:, :, :off + 1], v[:, :, :off + 1], enable_gqa=True)[0, :, 0])
    out = torch.ops.exo_gguf.decode_attention(q, k_new, v_new, k_caches, v_caches, offsets)
    assert (out - torch.stack(expected)).abs().max().item() < 1e-5
    for i, off in enumerate(offsets):
        assert torch.equal(k_caches[i][0, :, off], k_new[i]) and torch.equal(v_caches[i][0, :, off], v_new[i])
    with pytest.raises(RuntimeError, match="outside the cache capacity"):
        torch.ops.exo_gguf.decode_attention(q, k_new, v_new, k_caches, v_caches, [0, 1, 2, 3, 256])
    if kv > 1:
        with pytest.raises(RuntimeError, match="not a multiple"):
            torch.ops.exo_gguf.decode_attention(torch.zeros(b, kv + 1, d), k_new, v_new, k_caches, v_caches, offsets)


@pytest.mark.asyncio
async def test_decode_layers_equals_the_layer_modules_for_a_batch_at_different_lengths():
    import copy

    engine = TorchInferenceEngine(device="cpu")
    await engine.ensure_shard(Shard(MODEL, 0, 3, 30))
    model = engine._model
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 17, 256]  # the last one fills its cache's first block: the step makes room
    with torch.no_grad():
        caches = []
        for n in lengths:
            c = model.new_caches()
            model.forward(torch.randint(0, 49152, (1, n), generator=gen), c, 0)
            caches.append(c)
        twins = copy.deepcopy(caches)
        x = torch.randint(0, 49152, (len(lengths), 1), generator=gen)
        fused = model.decode(x, caches, lengths)  # (B, 1, hidden): not the last shard
        h = model._embed(x)
        cos, sin = model.rotary.at(lengths, h.dtype, h.device)
        for layer, layer_caches in zip(model.layers, zip(*twins)):
            h = layer.decode(h, cos, sin, layer_caches)
    assert fused.shape == h.shape == (3, 1, 576)
    assert (fused - h).abs().max().item() < 1e-4 * h.abs().max().item()
    for mine, theirs in zip(caches, twins):
        for c, t in zip(mine, theirs):
            assert c.offset == t.offset and c.capacity >= c.offset
            assert torch.allclose(c.k[:, :, :c.offset], t.k[:, :, :t.offset], atol=1e-5)
            assert torch.allclose(c.v[:, :, :c.offset], t.v[:, :, :t.offset], atol=1e-5)
    weights, qtypes = model._native_weights(), model._native_qtypes
    k = [c.k for per_layer in zip(*caches) for c in per_layer]
    v = [c.v for per_layer in zip(*caches) for c in per_layer]
    offsets = [c.offset for per_layer in zip(*caches) for c in per_layer]
    args = model.args
    with pytest.raises(RuntimeError, match="outside the cache capacity"):
        torch.ops.exo_gguf.decode_layers(fused, weights, qtypes, cos.reshape(3, -1), sin.reshape(3, -1), k, v,
                                         [c.capacity for per_layer in zip(*caches) for c in per_layer],
                                         args.n_heads, args.n_kv_heads, args.rms_norm_eps)
    with pytest.raises(RuntimeError, match="one KV cache and offset per layer and request"):
        torch.ops.exo_gguf.decode_layers(fused, weights, qtypes, cos.reshape(3, -1), sin.reshape(3, -1), k[:-1], v,
                                         offsets, args.n_heads, args.n_kv_heads, args.rms_norm_eps)
    with pytest.raises(RuntimeError, match="6 weights per layer"):
        torch.ops.exo_gguf.decode_layers(fused, weights[:-1], qtypes, cos.reshape(3, -1), sin.reshape(3, -1), k, v,
                                         offsets, args.n_heads, args.n_kv_heads, args.rms_norm_eps)
    await engine.close()
