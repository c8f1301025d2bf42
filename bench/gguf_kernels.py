"""The GGUF block kernels against torch's float32 matmul, one matrix product at a time.

    python -m bench.gguf_kernels [--rows 1,8,16] [--shape 2048x2048] [--reps 5]
    python -m bench.gguf_kernels --crossover [--rows 1,4,8,16,32,64,128,512]

Default: for every GGML type the kernels take (``gguf_weights.FORMATS``) and each number of
activation rows M, one (N, K) matrix of random blocks: microseconds per
``torch.ops.exo_gguf.linear`` call, the weights' bytes read per second (the bytes the kernels
hold, which is what bounds a decode step: it reads every weight once), and the same for
``torch.nn.functional.linear`` on float32 weights of the same shape, measured in the same run.
Weights are cycled over copies totalling ``--megabytes``, so that, as in a forward pass, they
come from memory rather than from a cache that still holds the last call's.

``--crossover``: SmolLM2-135M's shapes (a layer's fused QKV, output, fused gate/up and down
projections in Q4_1, the output head in Q8_0) with a third column, dequantizing to float32 then
``torch.mm`` (the path above ``KERNEL_MAX_ROWS``): the crossover between the kernel and that
path is what ``exo.inference.torch.gguf_weights.KERNEL_MAX_ROWS`` is set from.

The kernels run as the engine runs them: their own threads spinning through the call, torch's
intra-op threads at one meanwhile.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import Table, fmt

CROSSOVER_SHAPES = {  # name: (rows N, columns K, GGML type)
    "qkv (960x576, Q4_1)": (960, 576, 3),
    "o (576x576, Q4_1)": (576, 576, 3),
    "gate_up (3072x576, Q4_1)": (3072, 576, 3),
    "down (576x1536, Q4_1)": (576, 1536, 3),
    "head (49152x576, Q8_0)": (49152, 576, 8),
}
# byte offsets of the fp16 scales in one file block (set to a sane value, 0x2c00 = 0.0625)
_FP16_SCALES = {2: (0,), 3: (0, 2), 6: (0,), 7: (0, 2), 8: (0,), 12: (0, 2), 13: (0, 2), 14: (208,)}


def random_tiles(n: int, k: int, qtype: int, gen: np.random.Generator) -> torch.Tensor:
    """Random (n, k) weights of type ``qtype`` with finite scales, packed as the kernels hold them."""
    from exo.inference.torch.gguf_weights import FORMATS

    f = FORMATS[qtype]
    if qtype in (0, 1, 30):  # F32, F16, BF16: normal values
        values = gen.standard_normal((n, k)).astype(np.float32)
        if qtype == 0:
            raw = values.view(np.uint8)
        elif qtype == 1:
            raw = values.astype(np.float16).view(np.uint8)
        else:  # bfloat16: the top halves
            raw = (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    else:
        blocks = gen.integers(0, 256, (n, k // f.block_weights, f.file_block_bytes), dtype=np.uint8)
        for offset in _FP16_SCALES[qtype]:
            blocks[:, :, offset], blocks[:, :, offset + 1] = 0x00, 0x2C
        raw = blocks.reshape(n, -1)
    return torch.ops.exo_gguf.pack(torch.from_numpy(np.ascontiguousarray(raw)), qtype)


def _time(fn, items, reps: int) -> float:
    """Microseconds per call of fn over items, after one warm-up call."""
    fn(items[0])
    t = time.perf_counter()
    for _ in range(reps):
        for it in items:
            fn(it)
    return (time.perf_counter() - t) / (reps * len(items)) * 1e6


def _kernel_time(x: torch.Tensor, tiles: list[torch.Tensor], qtype: int, reps: int) -> float:
    """As the engine runs a decode pass: the kernels' threads spin, torch's are one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.ops.exo_gguf.set_spin(True)
    try:
        return _time(lambda t: torch.ops.exo_gguf.linear(x, t, qtype), tiles, reps)
    finally:
        torch.ops.exo_gguf.set_spin(False)
        torch.set_num_threads(threads)


def types_table(n: int, k: int, rows: list[int], reps: int, megabytes: float) -> Table:
    from exo.inference.torch.gguf_weights import FORMATS

    gen = np.random.default_rng(0)
    tgen = torch.Generator().manual_seed(0)
    dense_copies = max(2, int(megabytes * 2 ** 20 // (n * k * 4)) + 1)
    dense = [torch.randn(n, k, generator=tgen) for _ in range(dense_copies)]
    f32 = {}
    for m in rows:
        x = torch.randn(m, k, generator=tgen)
        f32[m] = _time(lambda w: torch.nn.functional.linear(x, w), dense, reps)
    out = []
    for qtype, f in sorted(FORMATS.items(), key=lambda kv: kv[1].bytes_per_weight):
        nbytes = n * k * f.bytes_per_weight
        tiles = [random_tiles(n, k, qtype, gen) for _ in range(max(2, int(megabytes * 2 ** 20 // nbytes) + 1))]
        for m in rows:
            x = torch.randn(m, k, generator=tgen)
            us = _kernel_time(x, tiles, qtype, reps)
            out.append([f.name, f"{f.bytes_per_weight:.4f}", f"{f.file_bytes_per_weight:.4f}", str(m), fmt(us, 0),
                        f"{nbytes / us / 1e3:.1f}", f"{n * k * m / us / 1e3:.1f}", fmt(f32[m], 0),
                        f"{n * k * 4 / f32[m] / 1e3:.1f}", f"{f32[m] / us:.2f}x"])
    return Table(f"GGUF block kernels vs float32 matmul, ({n}, {k}) weights, {torch.ops.exo_gguf.get_threads()} threads",
                 ["type", "B/w held", "B/w file", "M", "kernel us", "kernel GB/s", "kernel GMAC/s", "f32 us", "f32 GB/s",
                  "speedup"], out)


def crossover_table(rows: list[int], reps: int, copies: int) -> Table:
    gen = np.random.default_rng(0)
    tgen = torch.Generator().manual_seed(0)
    out = []
    for name, (n, k, qtype) in CROSSOVER_SHAPES.items():
        count = max(2, copies // 4) if n > 10000 else copies
        tiles = [random_tiles(n, k, qtype, gen) for _ in range(count)]
        dense = [torch.ops.exo_gguf.dequantize_t(t, qtype, k).T.contiguous() for t in tiles]
        for m in rows:
            if n > 10000 and m > 16:
                continue  # the head only ever sees the last position of each request
            x = torch.randn(m, k, generator=tgen)
            kernel = _kernel_time(x, tiles, qtype, reps)
            deq = _time(lambda t: torch.mm(x, torch.ops.exo_gguf.dequantize_t(t, qtype, k)), tiles, reps)
            f32 = _time(lambda w: torch.nn.functional.linear(x, w), dense, reps)
            out.append([name, str(m), fmt(kernel, 0), fmt(deq, 0), fmt(f32, 0), f"{n * k * m / kernel / 1e3:.1f}"])
    return Table(f"GGUF block kernels vs float32 matmul, microseconds per call ({torch.get_num_threads()} threads)",
                 ["matrix", "M", "kernel", "dequant+mm", "dense f32", "kernel G MAC/s"], out)


def main() -> None:
    from exo.inference.torch.kernels import gguf_kernels_error

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=None, help="activation rows M (default 1,8,16; with --crossover 1,4,...,512)")
    parser.add_argument("--shape", default="2048x2048", help="N x K of the per-type table (K a multiple of 256)")
    parser.add_argument("--megabytes", type=float, default=64, help="weights cycled through per type (> the CPU's caches)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--crossover", action="store_true", help="SmolLM2's shapes with the dequantize+matmul path")
    parser.add_argument("--copies", type=int, default=24, help="with --crossover: weight copies cycled (head: a quarter)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    error = gguf_kernels_error()
    if error:
        raise SystemExit(f"the GGUF block kernels are unavailable: {error}")
    if args.crossover:
        table = crossover_table([int(r) for r in (args.rows or "1,4,8,16,32,64,128,512").split(",")], args.reps, args.copies)
    else:
        n, k = (int(v) for v in args.shape.lower().split("x"))
        table = types_table(n, k, [int(r) for r in (args.rows or "1,8,16").split(",")], args.reps, args.megabytes)
    print(table.markdown() if args.markdown else table.text())


if __name__ == "__main__":
    main()
