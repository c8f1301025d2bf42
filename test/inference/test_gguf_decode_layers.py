"""The fused decode step of the GGUF block kernels (``decode_layers``) and their batched
attention (``decode_attention``), against a float32 torch reference of the transformer block
written here from its description (exo/models/architectures.py): Llama, Qwen2 (biases), Qwen3
(q/k norms, head_dim != hidden / heads), Gemma 3 (q/k norms, sandwich norms, GeGLU, its own
attention scale, sliding-window layers with their own RoPE table), partial rotary (Phi-4-mini),
mixed weight types per layer; each on every kernel build."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf_block_data import dequantized, gemma3_path, random_blocks, smollm2_path

from exo.inference.torch.gguf_weights import BF16, F16, F32, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0
from exo.inference.torch.kernels import gguf_kernels_error, load_emulated_kernels, load_portable_kernels

pytestmark = pytest.mark.skipif(gguf_kernels_error() is not None, reason=f"GGUF block kernels unavailable: {gguf_kernels_error()}")

SLOTS = ("attn_norm", "q", "k", "v", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm", "o", "attn_post_norm", "ffn_norm",
         "gate", "up", "down", "ffn_post_norm")
MATRICES = ("q", "k", "v", "o", "gate", "up", "down")


@pytest.fixture(scope="module", params=["native", "portable", "avx512"])
def ops(request):
    """One build of the kernels (``avx512``: its AVX-512 attention, activations and vector
    matrix path, emulated; x86-64 only)."""
    if request.param == "native":
        return torch.ops.exo_gguf
    if request.param == "portable":
        return load_portable_kernels()
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the AVX-512 emulation needs an x86-64 CPU")
    emulated = load_emulated_kernels()
    assert emulated.set_amx_rows(8) == 8  # 3-request batches stay on the vector path
    return emulated


@dataclass
class Block:
    """One architecture's block, small: sizes, switches, per-layer types, windows and tables."""

    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    inter: int = 512
    rope_dim: int | None = None  # None: head_dim
    eps: float = 1e-5
    attn_scale: float | None = None  # None: 1 / sqrt(head_dim)
    activation: int = 0  # 0 silu, 1 gelu_tanh
    qkv_bias: bool = False
    qk_norm: bool = False
    sandwich: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    layer_types: list[dict[str, int]] = field(default_factory=lambda: [{m: Q4_1 for m in MATRICES}] * 2)
    windows: list[int] | None = None  # per layer; None: no sliding window
    layer_rope: list[int] | None = None  # per layer; None: table 0
    rope_bases: tuple[float, ...] = (10000.0,)

    @property
    def layers(self) -> int:
        return len(self.layer_types)


LLAMA = Block(fused_qkv=True, fused_gate_up=True, layer_types=[{m: Q4_1 for m in MATRICES}, {m: Q8_0 for m in MATRICES}])
QWEN2 = Block(qkv_bias=True, layer_types=[{"q": Q4_K, "k": Q4_K, "v": Q6_K, "o": Q4_K, "gate": Q4_K, "up": Q4_K, "down": Q6_K},
                                          {"q": Q8_0, "k": Q8_0, "v": Q8_0, "o": Q5_0, "gate": Q5_1, "up": Q4_0, "down": Q5_K}])
QWEN3 = Block(heads=4, kv_heads=2, head_dim=128, qk_norm=True, eps=1e-6,
              layer_types=[{"q": Q5_K, "k": Q4_K, "v": Q6_K, "o": Q4_K, "gate": Q4_K, "up": Q4_K, "down": Q6_K}] * 2)
GEMMA3 = Block(heads=2, kv_heads=1, head_dim=256, inter=512, qk_norm=True, sandwich=True, activation=1, eps=1e-6,
               attn_scale=256 ** -0.5 * 0.8,  # query_pre_attn_scalar^-0.5, not head_dim's
               layer_types=[{"q": Q5_0, "k": Q5_0, "v": Q8_0, "o": Q4_K, "gate": Q5_0, "up": Q5_0, "down": dn}
                            for dn in (Q6_K, Q4_K, Q6_K, Q4_K)],
               windows=[8, 8, 0, 8], layer_rope=[0, 0, 1, 0], rope_bases=(10000.0, 1000000.0))
PHI4 = Block(heads=4, kv_heads=2, head_dim=64, rope_dim=48, fused_qkv=True, fused_gate_up=True,
             layer_types=[{m: t for m in MATRICES} for t in (F16, BF16, F32)])
EVERY_TYPE = Block(qkv_bias=True, fused_gate_up=True,
                   layer_types=[{"q": F32, "k": F16, "v": BF16, "o": Q4_0, "gate": Q4_1, "up": Q4_1, "down": Q5_0},
                                {"q": Q5_1, "k": Q8_0, "v": Q4_K, "o": Q5_K, "gate": Q6_K, "up": Q6_K, "down": Q8_0}])
BLOCKS = {"llama": LLAMA, "qwen2": QWEN2, "qwen3": QWEN3, "gemma3": GEMMA3, "phi4_partial_rotary": PHI4,
          "every_type": EVERY_TYPE}
#: Tokens already in each request's cache: a first token, short ones, and more than Gemma's window.
OFFSETS = [0, 5, 37]
CAPACITY = 48
#: About the standard deviation of a type's weights from random_blocks(scale=1) (float types:
#: normal values times 10).
_Q_STD = {Q4_0: 4.6, Q4_1: 4.6, Q5_0: 9.2, Q5_1: 9.2, Q8_0: 74.0, Q4_K: 140.0, Q5_K: 280.0, Q6_K: 500.0, F32: 10.0,
          F16: 10.0, BF16: 10.0}


def _matrix(ops, qtype: int, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random (rows, cols) matrix of ``qtype``, weights of about 1 / sqrt(cols): (its tiles,
    gguf-py's float32 dequantization)."""
    raw = random_blocks(qtype, rows, cols, np.random.default_rng(seed), scale=1.0 / (_Q_STD[qtype] * math.sqrt(cols)))
    return ops.pack(torch.from_numpy(raw), qtype), torch.from_numpy(dequantized(raw, qtype))


def _layer(ops, blk: Block, layer: int, gen: torch.Generator):
    """(16 weights in slot order, 16 GGML types, the dense float32 weights by slot name)."""
    H, KV, D, hid, inter = blk.heads, blk.kv_heads, blk.head_dim, blk.hidden, blk.inter
    types = blk.layer_types[layer]
    dense, slots = {}, {name: torch.empty(0) for name in SLOTS}
    empty = torch.empty(0, dtype=torch.uint8)
    seed = 1000 * layer
    # (slot, parts (name, rows), columns): a fused slot holds its parts' rows one after another
    qkv = [("q", H * D), ("k", KV * D), ("v", KV * D)]
    gate_up = [("gate", inter), ("up", inter)]
    matrices = [("q", qkv, hid)] if blk.fused_qkv else [(n, [(n, r)], hid) for n, r in qkv]
    matrices += [("o", [("o", hid)], H * D)]
    matrices += [("gate", gate_up, hid)] if blk.fused_gate_up else [(n, [(n, r)], hid) for n, r in gate_up]
    matrices += [("down", [("down", hid)], inter)]
    for slot, parts, cols in matrices:
        seed += 1
        slots[slot], whole = _matrix(ops, types[slot], sum(r for _, r in parts), cols, seed)
        dense.update(zip([n for n, _ in parts], whole.split([r for _, r in parts])))
    if blk.fused_qkv:
        slots["k"] = slots["v"] = empty
    if blk.fused_gate_up:
        slots["up"] = empty

    def vector(n: int, base: float = 1.0) -> torch.Tensor:
        return base + 0.1 * torch.randn(n, generator=gen)

    dense["attn_norm"], dense["ffn_norm"] = vector(hid), vector(hid)
    if blk.qkv_bias:
        dense["q_bias"], dense["k_bias"], dense["v_bias"] = vector(H * D, 0.0), vector(KV * D, 0.0), vector(KV * D, 0.0)
        if blk.fused_qkv:
            slots["q_bias"] = torch.cat([dense["q_bias"], dense["k_bias"], dense["v_bias"]])
        else:
            slots["q_bias"], slots["k_bias"], slots["v_bias"] = dense["q_bias"], dense["k_bias"], dense["v_bias"]
    if blk.qk_norm:
        slots["q_norm"], slots["k_norm"] = dense["q_norm"], dense["k_norm"] = vector(D), vector(D)
    if blk.sandwich:
        slots["attn_post_norm"], slots["ffn_post_norm"] = dense["attn_post_norm"], dense["ffn_post_norm"] = vector(hid), vector(hid)
    for name in ("attn_norm", "ffn_norm"):
        slots[name] = dense[name]
    return [slots[name] for name in SLOTS], [types.get(name, -1) for name in SLOTS], dense


def _rope_tables(blk: Block, positions: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per table: cos (B, rope_dim), the kernels' sin (first half negated), and the plain sin."""
    rd = blk.rope_dim or blk.head_dim
    cos, sin_k, sin = [], [], []
    for base in blk.rope_bases:
        inv = base ** (-torch.arange(0, rd, 2, dtype=torch.float64) / rd)
        ang = torch.tensor(positions, dtype=torch.float64)[:, None] * inv[None]
        c, s = torch.cat([ang.cos(), ang.cos()], -1).float(), torch.cat([ang.sin(), ang.sin()], -1).float()
        cos.append(c)
        sin.append(s)
        sin_k.append(torch.cat([-s[:, :rd // 2], s[:, rd // 2:]], -1))
    return cos, sin_k, sin


def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's apply_rotary_pos_emb on the first rope_dim dims of each head of x (heads, D)."""
    rd = cos.shape[-1]
    xr, rest = x[..., :rd], x[..., rd:]
    half = torch.cat([-xr[..., rd // 2:], xr[..., :rd // 2]], -1)
    return torch.cat([xr * cos + half * sin, rest], -1)


def _reference(blk: Block, x: torch.Tensor, dense: list[dict], cos, sin, k_caches, v_caches, offsets) -> torch.Tensor:
    """The block in float32 torch, one request at a time; appends to the caches as the kernel does."""
    H, KV, D, B = blk.heads, blk.kv_heads, blk.head_dim, x.shape[0]
    scale = blk.attn_scale if blk.attn_scale is not None else D ** -0.5
    h = x.clone()
    for layer, w in enumerate(dense):
        window = blk.windows[layer] if blk.windows else 0
        table = blk.layer_rope[layer] if blk.layer_rope else 0
        xn = _rmsnorm(h, w["attn_norm"], blk.eps)
        q, k, v = xn @ w["q"].T, xn @ w["k"].T, xn @ w["v"].T
        if "q_bias" in w:
            q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
        q, k, v = q.view(B, H, D), k.view(B, KV, D), v.view(B, KV, D)
        if "q_norm" in w:
            q, k = _rmsnorm(q, w["q_norm"], blk.eps), _rmsnorm(k, w["k_norm"], blk.eps)
        attn = []
        for b in range(B):
            qb = _rotate(q[b], cos[table][b], sin[table][b])
            kb = _rotate(k[b], cos[table][b], sin[table][b])
            pos = offsets[layer * B + b]
            kc, vc = k_caches[layer * B + b], v_caches[layer * B + b]
            kc[0, :, pos], vc[0, :, pos] = kb, v[b]
            lo = max(0, pos + 1 - window) if window > 0 else 0
            attn.append(F.scaled_dot_product_attention(qb[None, :, None], kc[:, :, lo:pos + 1], vc[:, :, lo:pos + 1],
                                                       scale=scale, enable_gqa=True)[0, :, 0].reshape(H * D))
        a = torch.stack(attn) @ w["o"].T
        if "attn_post_norm" in w:
            a = _rmsnorm(a, w["attn_post_norm"], blk.eps)
        h = h + a
        xn = _rmsnorm(h, w["ffn_norm"], blk.eps)
        g, u = xn @ w["gate"].T, xn @ w["up"].T
        act = F.silu(g) if blk.activation == 0 else F.gelu(g, approximate="tanh")
        f = (act * u) @ w["down"].T
        if "ffn_post_norm" in w:
            f = _rmsnorm(f, w["ffn_post_norm"], blk.eps)
        h = h + f
    return h


def _setup(ops, blk: Block, offsets: list[int], seed: int = 0):
    """Everything one decode_layers call takes, the dense weights, and copies of the caches."""
    gen = torch.Generator().manual_seed(seed)
    B, L = len(offsets), blk.layers
    KV, D = blk.kv_heads, blk.head_dim
    weights, qtypes, dense = [], [], []
    for layer in range(L):
        w, t, d = _layer(ops, blk, layer, gen)
        weights += w
        qtypes += t
        dense.append(d)
    k_caches = [torch.randn(1, KV, CAPACITY, D, generator=gen) for _ in range(L * B)]
    v_caches = [torch.randn(1, KV, CAPACITY, D, generator=gen) for _ in range(L * B)]
    x = torch.randn(B, 1, blk.hidden, generator=gen)
    return x, weights, qtypes, dense, k_caches, v_caches, [o for _ in range(L) for o in offsets]


def _call(ops, blk: Block, x, weights, qtypes, cos, sin, k_caches, v_caches, offsets):
    L = blk.layers
    return ops.decode_layers(x, weights, qtypes, cos, sin, blk.layer_rope or [0] * L, blk.windows or [0] * L, k_caches,
                             v_caches, offsets, blk.heads, blk.kv_heads, blk.head_dim, blk.rope_dim or blk.head_dim,
                             blk.eps, blk.attn_scale if blk.attn_scale is not None else blk.head_dim ** -0.5,
                             blk.activation)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_decode_layers_equals_the_reference_block(ops, name):
    blk = BLOCKS[name]
    x, weights, qtypes, dense, k_caches, v_caches, offsets = _setup(ops, blk, OFFSETS)
    cos, sin_k, sin = _rope_tables(blk, OFFSETS)
    k_ref, v_ref = [c.clone() for c in k_caches], [c.clone() for c in v_caches]
    expected = _reference(blk, x[:, 0], dense, cos, sin, k_ref, v_ref, offsets)
    got = _call(ops, blk, x, weights, qtypes, cos, sin_k, k_caches, v_caches, offsets)
    assert got.shape == x.shape
    scale = expected.abs().max().item()
    assert (got[:, 0] - expected).abs().max().item() < 1e-5 * scale, name
    for mine, theirs in zip(k_caches + v_caches, k_ref + v_ref):  # appended: this step's k (normed, rotated) and v
        assert (mine - theirs).abs().max().item() < 1e-5 * max(1.0, theirs.abs().max().item())


#: Real layers: (path getter, block, GGUF layer indices). SmolLM2: Llama, Q4_1, q/k/v apart;
#: Gemma 3 270M Q4_K_M: Q5_0, Q8_0, Q4_K and (layers 0, 1) Q6_K or (layer 2) Q4_K matrices,
#: here with windows small enough to matter in a short cache.
REAL = {
    "smollm2": (smollm2_path, Block(hidden=576, heads=9, kv_heads=3, head_dim=64, inter=1536, rope_bases=(100000.0,),
                                    layer_types=[{}] * 2), [0, 1]),
    "gemma3": (gemma3_path, Block(hidden=640, heads=4, kv_heads=1, head_dim=256, inter=2048, qk_norm=True, sandwich=True,
                                  activation=1, eps=1e-6, attn_scale=256 ** -0.5, windows=[4, 4, 0], layer_rope=[0, 0, 1],
                                  rope_bases=(10000.0, 1000000.0), layer_types=[{}] * 3), [0, 1, 2]),
}
_GGUF_NAMES = {"attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "q_norm": "attn_q_norm",
               "k_norm": "attn_k_norm", "o": "attn_output", "attn_post_norm": "post_attention_norm", "ffn_norm": "ffn_norm",
               "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down", "ffn_post_norm": "post_ffw_norm"}


def _real_layer(ops, path, layer: int):
    """A GGUF layer's tensors as decode_layers takes them, its types, and the dense weights."""
    from exo.models.gguf import open_gguf

    model = open_gguf(path)
    weights, qtypes, dense = [], [], {}
    for slot in SLOTS:
        name = f"blk.{layer}.{_GGUF_NAMES.get(slot, slot)}.weight"
        if name not in model.tensors:
            weights.append(torch.empty(0))
            qtypes.append(-1)
            continue
        t = model.tensors[name]
        raw = np.array(model.raw(name))
        dense[slot] = torch.from_numpy(dequantized(raw, t.qtype)).reshape(t.shape)
        weights.append(ops.pack(torch.from_numpy(raw), t.qtype) if slot in MATRICES else dense[slot].contiguous())
        qtypes.append(t.qtype if slot in MATRICES else -1)
    return weights, qtypes, dense


@pytest.mark.parametrize("name", list(REAL))
def test_decode_layers_on_real_layers(ops, name):
    path, blk, layers = REAL[name]
    path = path()
    gen = torch.Generator().manual_seed(3)
    weights, qtypes, dense = [], [], []
    for layer in layers:
        w, t, d = _real_layer(ops, path, layer)
        weights, qtypes, dense = weights + w, qtypes + t, dense + [d]
    if name == "gemma3":
        assert {qtypes[16 * i + 14] for i in range(3)} == {Q6_K, Q4_K} and Q5_0 in qtypes and Q8_0 in qtypes
    B, L = len(OFFSETS), len(layers)
    k_caches = [torch.randn(1, blk.kv_heads, CAPACITY, blk.head_dim, generator=gen) for _ in range(L * B)]
    v_caches = [torch.randn(1, blk.kv_heads, CAPACITY, blk.head_dim, generator=gen) for _ in range(L * B)]
    offsets = [o for _ in range(L) for o in OFFSETS]
    x = torch.randn(B, 1, blk.hidden, generator=gen)
    cos, sin_k, sin = _rope_tables(blk, OFFSETS)
    expected = _reference(blk, x[:, 0], dense, cos, sin, [c.clone() for c in k_caches], [c.clone() for c in v_caches], offsets)
    got = _call(ops, blk, x, weights, qtypes, cos, sin_k, k_caches, v_caches, offsets)
    assert (got[:, 0] - expected).abs().max().item() < 1e-5 * expected.abs().max().item()


def test_a_sliding_window_reads_only_its_keys(ops):
    """Keys before the window are never read: NaN there changes nothing (Gemma's 512-token
    window over a long context must not cost a read of the whole cache)."""
    blk = GEMMA3
    x, weights, qtypes, dense, k_caches, v_caches, offsets = _setup(ops, blk, OFFSETS, seed=1)
    cos, sin_k, _ = _rope_tables(blk, OFFSETS)
    clean = _call(ops, blk, x, weights, qtypes, cos, sin_k, [c.clone() for c in k_caches], [c.clone() for c in v_caches],
                  offsets)
    B = len(OFFSETS)
    for layer, window in enumerate(blk.windows):
        for b, pos in enumerate(OFFSETS):
            lo = max(0, pos + 1 - window) if window else 0
            k_caches[layer * B + b][0, :, :lo] = float("nan")
            v_caches[layer * B + b][0, :, :lo] = float("nan")
    assert torch.equal(_call(ops, blk, x, weights, qtypes, cos, sin_k, k_caches, v_caches, offsets), clean)


def test_decode_layers_on_the_amx_path_keeps_the_bound():
    """A batch of 9 requests (products of 9 rows: the AMX path from 8), emulated."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the AVX-512 emulation needs an x86-64 CPU")
    ops = load_emulated_kernels()
    assert ops.set_amx_rows(8) == 8
    blk = QWEN2
    offsets = [0, 1, 2, 3, 5, 8, 13, 21, 34]
    x, weights, qtypes, dense, k_caches, v_caches, offs = _setup(ops, blk, offsets, seed=2)
    cos, sin_k, sin = _rope_tables(blk, offsets)
    expected = _reference(blk, x[:, 0], dense, cos, sin, [c.clone() for c in k_caches], [c.clone() for c in v_caches], offs)
    got = _call(ops, blk, x, weights, qtypes, cos, sin_k, k_caches, v_caches, offs)
    assert (got[:, 0] - expected).abs().max().item() < 1e-5 * expected.abs().max().item()


def test_decode_layers_rejects_bad_arguments_with_clear_errors():
    ops = torch.ops.exo_gguf
    blk = QWEN2
    x, weights, qtypes, dense, k_caches, v_caches, offsets = _setup(ops, blk, OFFSETS)
    cos, sin_k, _ = _rope_tables(blk, OFFSETS)
    args = dict(weights=weights, qtypes=qtypes, offsets=offsets, k_caches=k_caches, v_caches=v_caches)

    def call(**changes):
        a = {**args, **changes}
        return _call(ops, blk, x, a["weights"], a["qtypes"], cos, sin_k, a["k_caches"], a["v_caches"], a["offsets"])

    with pytest.raises(RuntimeError, match="16 weights and 16 GGML types per layer"):
        call(weights=weights[:-1], qtypes=qtypes[:-1])
    with pytest.raises(RuntimeError, match="one KV cache and offset per layer and request"):
        call(k_caches=k_caches[:-1])
    with pytest.raises(RuntimeError, match="outside the cache capacity"):
        call(offsets=[CAPACITY] * len(offsets))
    bad = list(qtypes)
    bad[16 + 9] = Q4_1  # layer 1's o is Q5_0
    with pytest.raises(RuntimeError, match=r"layer 1's o\): Q4_1 tiles of"):
        call(qtypes=bad)
    bad[16 + 9] = 10
    with pytest.raises(RuntimeError, match=r"layer 1's o\): unsupported GGML type 10"):
        call(qtypes=bad)
    no_v = list(weights)
    no_v[3] = torch.empty(0, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="layer 0's v"):
        call(weights=no_v)
    short_norm = list(weights)
    short_norm[16 + 11] = torch.ones(10)
    with pytest.raises(RuntimeError, match="layer 1's ffn_norm must be contiguous float32 of 256"):
        call(weights=short_norm)
    with pytest.raises(RuntimeError, match="rope_dim"):
        ops.decode_layers(x, weights, qtypes, cos, sin_k, [0, 0], [0, 0], k_caches, v_caches, offsets, 4, 2, 64, 66, 1e-5,
                          0.125, 0)
    with pytest.raises(RuntimeError, match="activation must be 0"):
        ops.decode_layers(x, weights, qtypes, cos, sin_k, [0, 0], [0, 0], k_caches, v_caches, offsets, 4, 2, 64, 64, 1e-5,
                          0.125, 2)
    with pytest.raises(RuntimeError, match="layer 1 has RoPE table 1 of 1"):
        ops.decode_layers(x, weights, qtypes, cos, sin_k, [0, 1], [0, 0], k_caches, v_caches, offsets, 4, 2, 64, 64, 1e-5,
                          0.125, 0)


def _attention_reference(q, k_caches, v_caches, k_new, v_new, offsets, scale, window):
    """Per request: append, then SDPA over all keys with a boolean mask of the window."""
    out = []
    for i, off in enumerate(offsets):
        k, v = k_caches[i].clone(), v_caches[i].clone()
        k[0, :, off], v[0, :, off] = k_new[i], v_new[i]
        t = torch.arange(off + 1)
        mask = (t > off - window) if window > 0 else torch.ones(off + 1, dtype=torch.bool)
        out.append(F.scaled_dot_product_attention(q[i:i + 1, :, None], k[:, :, :off + 1], v[:, :, :off + 1],
                                                  attn_mask=mask[None, None, None], scale=scale, enable_gqa=True)[0, :, 0])
    return torch.stack(out)


@pytest.mark.parametrize("h, kv, d", [(9, 3, 64), (32, 8, 128), (8, 1, 32), (12, 2, 96), (8, 4, 256), (14, 7, 80), (28, 4, 128),
                                     (12, 4, 72), (4, 1, 256)])
def test_decode_attention_equals_sdpa_per_request_and_appends_to_each_cache(ops, h, kv, d):
    """Head sizes with a vector kernel (multiples of 16 up to 256) and one without (72), groups
    of 1 to 8 query heads per KV head, more heads in a group than the kernel keeps at once (6,
    7); 1 / sqrt(D) scaling and no window, then another scale and windows of 1, 5 and 64."""
    gen = torch.Generator().manual_seed(0)
    b = 5
    offsets = [0, 1, 17, 200, 255]
    k_caches = [torch.randn(1, kv, 256, d, generator=gen) for _ in range(b)]
    v_caches = [torch.randn(1, kv, 256, d, generator=gen) for _ in range(b)]
    q, k_new, v_new = torch.randn(b, h, d, generator=gen), torch.randn(b, kv, d, generator=gen), torch.randn(b, kv, d, generator=gen)
    for scale, window in ((d ** -0.5, 0), (0.3, 5), (0.05, 1), (d ** -0.5, 64)):
        expected = _attention_reference(q, k_caches, v_caches, k_new, v_new, offsets, scale, window)
        out = ops.decode_attention(q, k_new, v_new, k_caches, v_caches, offsets, scale, window)
        assert (out - expected).abs().max().item() < 1e-5, (scale, window)
        for i, off in enumerate(offsets):
            assert torch.equal(k_caches[i][0, :, off], k_new[i]) and torch.equal(v_caches[i][0, :, off], v_new[i])
    with pytest.raises(RuntimeError, match="outside the cache capacity"):
        ops.decode_attention(q, k_new, v_new, k_caches, v_caches, [0, 1, 2, 3, 256], d ** -0.5, 0)
    with pytest.raises(RuntimeError, match="window must be >= 0"):
        ops.decode_attention(q, k_new, v_new, k_caches, v_caches, offsets, d ** -0.5, -1)
    if kv > 1:
        with pytest.raises(RuntimeError, match="not a multiple"):
            ops.decode_attention(torch.zeros(b, kv + 1, d), k_new, v_new, k_caches, v_caches, offsets, 1.0, 0)


@pytest.mark.parametrize("gain", [1e-3, 1.0, 30.0, 1e4])
def test_gelu_tanh_over_a_wide_range_of_gate_values(ops, gain):
    """GeGLU with gate projections scaled by ``gain``: from the linear part near 0 to the
    extremes (the largest values keep g, the most negative give 0), finite everywhere."""
    blk = Block(heads=1, kv_heads=1, head_dim=64, inter=256, activation=1, layer_types=[{m: F32 for m in MATRICES}])
    x, weights, qtypes, dense, k_caches, v_caches, offsets = _setup(ops, blk, [0])
    dense[0]["gate"] = dense[0]["gate"] * gain
    weights[12] = ops.pack(torch.from_numpy(dense[0]["gate"].numpy().view(np.uint8)), F32)
    cos, sin_k, sin = _rope_tables(blk, [0])
    expected = _reference(blk, x[:, 0], dense, cos, sin, [c.clone() for c in k_caches], [c.clone() for c in v_caches], offsets)
    got = _call(ops, blk, x, weights, qtypes, cos, sin_k, k_caches, v_caches, offsets)
    assert torch.isfinite(got).all()
    assert (got[:, 0] - expected).abs().max().item() < 1e-5 * expected.abs().max().item()
