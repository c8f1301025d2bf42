"""The GGUF block kernels (exo/inference/torch/kernels) for every weight type they take, and
the modules of exo/inference/torch/gguf_weights.py, against gguf-py's own dequantization.

Each kernel build is tested: the one for this CPU (``native``), the plain loops every other
CPU runs (``portable``), and the AVX-512 and AMX paths with their intrinsics emulated
(``avx512``, ``amx``: any x86-64 CPU, so those paths are tested where the CPU lacks them)."""

import numpy as np
import pytest
import torch
from gguf_block_data import NAMES, dequantized, gemma3_path, random_blocks, real_matrix, smollm2_path

from exo.inference.torch.gguf_weights import (
    BF16, F16, F32, FORMATS, KERNEL_MAX_ROWS, Q4_1, Q4_K, Q6_K, Q8_0, TILE_ROWS, GGUFEmbedding, GGUFLinear, kernel_supports,
    native_types, packed_bytes)
from exo.inference.torch.kernels import gguf_kernels_error, load_emulated_kernels, load_portable_kernels

pytestmark = pytest.mark.skipif(gguf_kernels_error() is not None, reason=f"GGUF block kernels unavailable: {gguf_kernels_error()}")

TYPES = sorted(FORMATS)
BUILDS = ["native", "portable", "avx512", "amx"]


@pytest.fixture(scope="module", params=BUILDS)
def ops(request):
    """One build of the kernels; ``amx``: the emulated build with the AMX path for every
    product (1 row and up), ``avx512``: the emulated build with the AMX path off."""
    if request.param == "native":
        yield torch.ops.exo_gguf
    elif request.param == "portable":
        yield load_portable_kernels()
    else:
        if not _x86():
            pytest.skip("the AVX-512 emulation needs an x86-64 CPU")
        emulated = load_emulated_kernels()
        before = emulated.amx_rows()
        assert emulated.set_amx_rows(1 if request.param == "amx" else 0) == (1 if request.param == "amx" else 0)
        yield emulated
        emulated.set_amx_rows(before)


def _x86() -> bool:
    import platform

    return platform.machine() in ("x86_64", "AMD64")


def _close_to_float32_matmul(got: torch.Tensor, x: torch.Tensor, ref: np.ndarray) -> float:
    """max |got - x @ ref.T| over max |x @ ref.T| (computed in float64), after checking torch's
    own float32 matmul keeps the same bound: float32 accumulation in another order."""
    exact = x.double() @ torch.from_numpy(ref).double().T
    scale = exact.abs().max().item()
    dense = x @ torch.from_numpy(ref).T
    assert (dense.double() - exact).abs().max().item() < 1e-5 * scale + 1e-5
    return (got.double() - exact).abs().max().item() / (scale + 1)


def test_the_python_table_is_the_kernels_own(ops):
    assert native_types() == frozenset(TYPES) == {0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30}
    for qtype, f in FORMATS.items():
        assert list(ops.block_format(qtype)) == [f.block_weights, f.file_block_bytes, f.tile_bytes, int(f.amx)], f.name
        assert f.name == NAMES[qtype]
    with pytest.raises(RuntimeError, match="unsupported GGML type 15"):
        ops.block_format(15)


def test_bytes_per_weight_stay_near_the_files():
    """The whole point of holding blocks is reading fewer bytes per decode step."""
    for qtype, f in FORMATS.items():
        assert f.bytes_per_weight <= 1.03 * f.file_bytes_per_weight, f.name
    assert FORMATS[Q4_1].bytes_per_weight == 0.625 and FORMATS[Q6_K].bytes_per_weight == 210 / 256
    assert packed_bytes(Q4_K, 640, 1024) == 640 * 1024 * 148 // 256


@pytest.mark.parametrize("qtype", TYPES, ids=[NAMES[t] for t in TYPES])
def test_pack_and_dequantize_equal_gguf_py_exactly(ops, qtype):
    rng = np.random.default_rng(qtype)
    rows, cols = 48, 512
    raw = random_blocks(qtype, rows, cols, rng)
    ref = dequantized(raw, qtype)
    tiles = ops.pack(torch.from_numpy(raw), qtype)
    assert tiles.shape == (rows // TILE_ROWS, cols // FORMATS[qtype].block_weights * FORMATS[qtype].tile_bytes)
    ids = torch.tensor([[0, 1, 17], [rows - 1, 5, 16]])
    got = ops.dequantize_rows(tiles, qtype, cols, ids)
    assert got.shape == (2, 3, cols)
    assert torch.equal(got, torch.from_numpy(ref[ids.numpy()]))
    assert torch.equal(ops.dequantize_t(tiles, qtype, cols), torch.from_numpy(ref).T)


@pytest.mark.parametrize("qtype", TYPES, ids=[NAMES[t] for t in TYPES])
def test_linear_equals_a_float32_matmul_on_the_dequantized_weights(ops, qtype):
    """1 row (decode), 3, 8 (a whole activation tile of the vector path, the AMX threshold),
    16 (an AMX tile), 33 (more than two)."""
    rng = np.random.default_rng(100 + qtype)
    gen = torch.Generator().manual_seed(qtype)
    raw = random_blocks(qtype, 48, 768 if FORMATS[qtype].block_weights == 256 else 544, rng)
    ref = dequantized(raw, qtype)
    tiles = ops.pack(torch.from_numpy(raw), qtype)
    for m in (1, 3, 8, 16, 33):
        x = torch.randn(m, ref.shape[1], generator=gen)
        assert _close_to_float32_matmul(ops.linear(x, tiles, qtype), x, ref) < 1e-5, (NAMES[qtype], m)


@pytest.mark.parametrize("qtype", TYPES, ids=[NAMES[t] for t in TYPES])
def test_each_row_of_a_product_off_the_amx_path_is_bitwise_the_row_alone(ops, qtype):
    """Batch invariance (issue 23): with allow_amx=False every row of a product of 1 to 40 rows
    (the vector path's row blocks, threads splitting the output tiles) is the row's product
    alone, bit for bit; on the ``amx`` build (AMX from 1 row) too."""
    gen = torch.Generator().manual_seed(300 + qtype)
    raw = random_blocks(qtype, 64, 512, np.random.default_rng(300 + qtype))
    tiles = ops.pack(torch.from_numpy(raw), qtype)
    x = torch.randn(40, 512, generator=gen) * torch.logspace(-2, 1, 512)
    alone = torch.cat([ops.linear(x[i:i + 1].clone(), tiles, qtype, False) for i in range(x.shape[0])])
    for m in (2, 3, 8, 9, 16, 40):
        assert torch.equal(ops.linear(x[:m], tiles, qtype, False), alone[:m]), (NAMES[qtype], m)


@pytest.mark.parametrize("qtype", TYPES, ids=[NAMES[t] for t in TYPES])
def test_activations_of_very_different_sizes_keep_the_bound(ops, qtype):
    """Activations spread over three decades: the AMX path splits each into two bfloat16 parts
    (16 of float32's 24 bits), within the float32 bound."""
    gen = torch.Generator().manual_seed(200 + qtype)
    raw = random_blocks(qtype, 32, 512, np.random.default_rng(qtype))
    ref = dequantized(raw, qtype)
    tiles = ops.pack(torch.from_numpy(raw), qtype)
    for m in (1, 16, 17):
        spread = torch.logspace(-2, 1, ref.shape[1])[torch.randperm(ref.shape[1], generator=gen)]
        x = torch.randn(m, ref.shape[1], generator=gen) * spread
        assert _close_to_float32_matmul(ops.linear(x, tiles, qtype), x, ref) < 1e-5, (NAMES[qtype], m)


def _real_tensors():
    """(label, path getter, tensor name, rows) of real matrices: every type the two files hold."""
    return [
        ("smollm2 Q4_1 ffn_down", smollm2_path, "blk.3.ffn_down.weight", None),
        ("smollm2 Q4_1 attn_k", smollm2_path, "blk.0.attn_k.weight", None),
        ("smollm2 Q8_0 token_embd", smollm2_path, "token_embd.weight", 1024),
        ("gemma3 Q5_0 attn_q", gemma3_path, "blk.0.attn_q.weight", None),
        ("gemma3 Q8_0 attn_v", gemma3_path, "blk.0.attn_v.weight", None),
        ("gemma3 Q4_K attn_output", gemma3_path, "blk.0.attn_output.weight", None),
        ("gemma3 Q6_K ffn_down", gemma3_path, "blk.0.ffn_down.weight", None),
        ("gemma3 Q4_K ffn_down", gemma3_path, "blk.2.ffn_down.weight", None),
    ]


@pytest.mark.parametrize("label, path, name, rows", _real_tensors(), ids=[t[0] for t in _real_tensors()])
def test_real_tensors(ops, label, path, name, rows):
    raw, ref, qtype = real_matrix(path(), name, rows)
    tiles = ops.pack(torch.from_numpy(raw), qtype)
    assert torch.equal(ops.dequantize_t(tiles, qtype, ref.shape[1]), torch.from_numpy(ref).T), label
    ids = torch.tensor([0, 15, 16, ref.shape[0] - 1])
    assert torch.equal(ops.dequantize_rows(tiles, qtype, ref.shape[1], ids), torch.from_numpy(ref[ids.numpy()])), label
    gen = torch.Generator().manual_seed(len(label))
    for m in (1, 3, 8, 16, 33):
        x = torch.randn(m, ref.shape[1], generator=gen)
        assert _close_to_float32_matmul(ops.linear(x, tiles, qtype), x, ref) < 1e-5, (label, m)


def test_the_amx_threshold_takes_only_a_row_count():
    with pytest.raises(RuntimeError, match="rows must be >= 0"):
        torch.ops.exo_gguf.set_amx_rows(-1)


@pytest.mark.parametrize("m", [8, 16, 33])
def test_the_native_amx_path_where_the_cpu_has_it(m):
    """The real tile unit (skipped where the kernels were built without it or the OS refuses
    the tile state; the ``amx`` build above covers the same code emulated)."""
    before = torch.ops.exo_gguf.amx_rows()
    if before == 0:
        pytest.skip("no AMX tile path on this machine")
    gen = torch.Generator().manual_seed(m)
    try:
        assert torch.ops.exo_gguf.set_amx_rows(1) == 1
        for qtype in TYPES:
            raw = random_blocks(qtype, 64, 512, np.random.default_rng(qtype))
            ref = dequantized(raw, qtype)
            tiles = torch.ops.exo_gguf.pack(torch.from_numpy(raw), qtype)
            x = torch.randn(m, 512, generator=gen) * torch.logspace(-2, 1, 512)[torch.randperm(512, generator=gen)]
            assert _close_to_float32_matmul(torch.ops.exo_gguf.linear(x, tiles, qtype), x, ref) < 1e-5, NAMES[qtype]
    finally:
        torch.ops.exo_gguf.set_amx_rows(before)


def test_bad_arguments_raise_clear_errors():
    ops = torch.ops.exo_gguf
    raw = random_blocks(Q4_1, 32, 512, np.random.default_rng(0))
    tiles = ops.pack(torch.from_numpy(raw), Q4_1)
    with pytest.raises(RuntimeError, match="inputs per row"):
        ops.linear(torch.zeros(1, 64), tiles, Q4_1)
    with pytest.raises(RuntimeError, match="float32"):
        ops.linear(torch.zeros(1, 512, dtype=torch.float64), tiles, Q4_1)
    with pytest.raises(RuntimeError, match="unsupported GGML type 10"):
        ops.linear(torch.zeros(1, 512), tiles, 10)  # Q2_K
    with pytest.raises(RuntimeError, match="Q4_1 rows .15. must be a multiple of 16"):
        ops.pack(torch.from_numpy(raw[:15]), Q4_1)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.dequantize_rows(tiles, Q4_1, 512, torch.tensor([32]))
    # K-quants need whole super-blocks of 256 weights: a 640-column row is 2.5 of them
    q4k = random_blocks(Q4_K, 16, 768, np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="not a whole number of Q4_K blocks .144 bytes per 256 weights"):
        ops.pack(torch.from_numpy(q4k[:, :360]), Q4_K)
    q4k_tiles = ops.pack(torch.from_numpy(q4k), Q4_K)
    with pytest.raises(RuntimeError, match="Q4_K needs K a multiple of 256, got K = 640"):
        ops.dequantize_t(q4k_tiles, Q4_K, 640)
    with pytest.raises(RuntimeError, match="x has K = 640 but the Q4_K tiles hold 768"):
        ops.linear(torch.zeros(1, 640), q4k_tiles, Q4_K)


def test_python_shape_checks_name_the_type_and_shape():
    assert kernel_supports(Q4_K, 640, 1024) and kernel_supports(Q8_0, 256, 640) and kernel_supports(BF16, 16, 32)
    assert not kernel_supports(Q4_K, 2048, 640)  # Gemma 3's gate is Q5_0 for this reason
    assert not kernel_supports(Q8_0, 100, 640) and not kernel_supports(10, 256, 256)
    with pytest.raises(ValueError, match=r"Q4_K block weights need rows a multiple of 16 and columns a multiple of 256, "
                                         r"got \(2048, 640\)"):
        GGUFLinear(640, 2048, Q4_K)
    with pytest.raises(ValueError, match="multiple of 16"):
        GGUFLinear(576, 100, Q4_1)
    with pytest.raises(ValueError, match="GGML type 11 is not supported"):
        GGUFEmbedding(64, 64, 11)


def test_modules_use_the_kernel_for_decode_and_a_matmul_for_prefill():
    raw, ref, qtype = real_matrix(gemma3_path(), "blk.0.attn_output.weight")
    assert qtype == Q4_K
    layer = GGUFLinear(ref.shape[1], ref.shape[0], qtype)
    layer.load_rows(0, raw[:320])
    layer.load_rows(320, raw[320:])
    for rows in (1, KERNEL_MAX_ROWS + 1):  # both paths
        x = torch.randn(1, rows, ref.shape[1])
        np.testing.assert_allclose(layer(x).numpy(), (x @ torch.from_numpy(ref).T).numpy(), atol=1e-4, rtol=0)
    raw, ref, qtype = real_matrix(smollm2_path(), "token_embd.weight", 2048)
    emb = GGUFEmbedding(ref.shape[0], ref.shape[1], qtype)
    emb.load_rows(0, raw)
    ids = torch.tensor([[3, 2047, 0]])
    assert torch.equal(emb(ids), torch.from_numpy(ref[ids.numpy()]))
    with pytest.raises(ValueError, match="cannot load rows 0..16"):
        emb.load_rows(0, raw[:16, :-1])


@pytest.mark.parametrize("qtype, np_type, torch_type", [(F32, np.float32, torch.float32), (F16, np.float16, torch.float16),
                                                        (BF16, None, torch.bfloat16)])
def test_unquantized_matrices_load_from_their_own_element_type(qtype, np_type, torch_type):
    """A safetensors checkpoint's tensors go in as they are (their bytes are the file's)."""
    w = torch.randn(32, 64).to(torch_type)
    layer = GGUFLinear(64, 32, qtype)
    layer.load_rows(0, w)
    if np_type is not None:
        layer2 = GGUFLinear(64, 32, qtype)
        layer2.load_rows(0, w.numpy())
        assert torch.equal(layer.tiles, layer2.tiles)
    assert torch.equal(layer.dequantize(torch.arange(32)), w.float())
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), x @ w.float().T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot load torch.float64 rows"):
        layer.load_rows(0, w.double())


def test_worker_threads_give_the_same_bits_and_sleep_after_a_pass():
    ops = torch.ops.exo_gguf
    raw = random_blocks(Q4_K, 576, 1536, np.random.default_rng(1))
    tiles = ops.pack(torch.from_numpy(raw), Q4_K)
    x = torch.randn(3, 1536)
    threads = ops.get_threads()
    try:
        ops.set_threads(1)
        alone = ops.linear(x, tiles, Q4_K)
        ops.set_threads(3)
        ops.set_spin(True)
        spread = ops.linear(x, tiles, Q4_K)
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
