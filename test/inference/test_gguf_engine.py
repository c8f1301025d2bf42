"""The torch engine's weights="gguf" mode and its fused decode step, against its own torch
modules. The kernels themselves are tested in test_gguf_weights.py and test_gguf_decode_layers.py."""

import pytest
import torch

from exo.inference.shard import Shard
from exo.inference.torch.engine import TorchInferenceEngine

MODEL = "smollm2-135m"


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
        tables = [r.at(lengths, h.dtype, h.device) for r in model.rotary]
        for layer, layer_caches in zip(model.layers, zip(*twins)):
            cos, sin = tables[layer.self_attn.rope_index]
            h = layer.decode(h, cos, sin, layer_caches)
    assert model.native_decode
    assert fused.shape == h.shape == (3, 1, 576)
    assert (fused - h).abs().max().item() < 1e-4 * h.abs().max().item()
    for mine, theirs in zip(caches, twins):
        for c, t in zip(mine, theirs):
            assert c.offset == t.offset and c.capacity >= c.offset
            assert torch.allclose(c.k[:, :, :c.offset], t.k[:, :, :t.offset], atol=1e-5)
            assert torch.allclose(c.v[:, :, :c.offset], t.v[:, :, :t.offset], atol=1e-5)
    weights, qtypes = model._native_weights()
    k = [c.k for per_layer in zip(*caches) for c in per_layer]
    v = [c.v for per_layer in zip(*caches) for c in per_layer]
    offsets = [c.offset for per_layer in zip(*caches) for c in per_layer]
    a = model.args
    cos, sin = tables[0]

    def call(weights=weights, k=k, offsets=offsets):
        return torch.ops.exo_gguf.decode_layers(fused, weights, qtypes, [cos.reshape(3, -1)], [sin.reshape(3, -1)],
                                                [0] * 4, [0] * 4, k, v, offsets, a.n_heads, a.n_kv_heads, a.head_dim,
                                                a.rope_dim, a.rms_norm_eps, a.attn_scale, 0)

    with pytest.raises(RuntimeError, match="outside the cache capacity"):
        call(offsets=[c.capacity for per_layer in zip(*caches) for c in per_layer])
    with pytest.raises(RuntimeError, match="one KV cache and offset per layer and request"):
        call(k=k[:-1])
    with pytest.raises(RuntimeError, match="16 weights and 16 GGML types per layer"):
        call(weights=weights[:-1])
    await engine.close()
