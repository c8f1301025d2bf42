"""The GGUF block kernels against torch's float32 matmul, one projection at a time.

    python -m bench.gguf_kernels [--copies 24] [--reps 5]

For each matrix shape of SmolLM2-135M (a layer's fused QKV, output, fused gate/up and down
projections in Q4_1, the output head in Q8_0) and each number of activation rows M, it prints
microseconds per call for
- ``kernel``: ``torch.ops.exo_gguf.linear`` on the blocks (the decode path);
- ``dequant+mm``: dequantizing to float32 then ``torch.mm`` (the path above ``KERNEL_MAX_ROWS``);
- ``dense f32``: ``torch.nn.functional.linear`` on float32 weights (the dense engine);
with the weights cycled over ``--copies`` copies, so that, as in a forward pass, they come from
memory rather than from a cache that still holds the last call's. The crossover between the
first two is what ``exo.inference.torch.gguf_weights.KERNEL_MAX_ROWS`` is set from.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import Table, fmt

SHAPES = {  # name: (rows N, columns K, GGML type)
    "qkv (960x576, Q4_1)": (960, 576, 3),
    "o (576x576, Q4_1)": (576, 576, 3),
    "gate_up (3072x576, Q4_1)": (3072, 576, 3),
    "down (576x1536, Q4_1)": (576, 1536, 3),
    "head (49152x576, Q8_0)": (49152, 576, 8),
}


def _random_tiles(n: int, k: int, qtype: int, gen: torch.Generator) -> torch.Tensor:
    """Random blocks in the tiled layout with finite fp16 scales (0x3c3c = 1.06)."""
    tile = 320 if qtype == 3 else 544
    t = torch.randint(0, 256, (n // 16, k // 32 * tile), dtype=torch.uint8, generator=gen)
    t.view(n // 16, k // 32, tile)[:, :, :64 if qtype == 3 else 32] = 0x3C
    return t


def _time(fn, items, reps: int) -> float:
    fn(items[0])
    t = time.perf_counter()
    for _ in range(reps):
        for it in items:
            fn(it)
    return (time.perf_counter() - t) / (reps * len(items)) * 1e6


def main() -> None:
    from exo.inference.torch.kernels import gguf_kernels_error

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=24, help="weight copies cycled through (head: a quarter)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rows", default="1,4,8,16,32,64,128,512", help="activation rows M")
    args = parser.parse_args()
    error = gguf_kernels_error()
    if error:
        raise SystemExit(f"the GGUF block kernels are unavailable: {error}")
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    out = []
    for name, (n, k, qtype) in SHAPES.items():
        copies = max(2, args.copies // 4) if n > 10000 else args.copies
        tiles = [_random_tiles(n, k, qtype, gen) for _ in range(copies)]
        dense = [torch.ops.exo_gguf.dequantize_t(t, qtype, k).T.contiguous() for t in tiles]
        for m in (int(r) for r in args.rows.split(",")):
            if n > 10000 and m > 16:
                continue  # the head only ever sees the last position of each request
            x = torch.randn(m, k, generator=gen)
            # as the engine runs them: a decode pass spins the kernels' threads and keeps torch's
            # to one; the dequantize-and-matmul path uses torch's threads
            torch.set_num_threads(1)
            torch.ops.exo_gguf.set_spin(True)
            try:
                kernel = _time(lambda t: torch.ops.exo_gguf.linear(x, t, qtype), tiles, args.reps)
            finally:
                torch.ops.exo_gguf.set_spin(False)
                torch.set_num_threads(threads)
            deq = _time(lambda t: torch.mm(x, torch.ops.exo_gguf.dequantize_t(t, qtype, k)), tiles, args.reps)
            f32 = _time(lambda w: torch.nn.functional.linear(x, w), dense, args.reps)
            out.append([name, str(m), fmt(kernel, 0), fmt(deq, 0), fmt(f32, 0), f"{n * k * m / kernel / 1e3:.1f}"])
    print(Table(f"GGUF block kernels vs float32 matmul, microseconds per call ({threads} threads)",
                ["matrix", "M", "kernel", "dequant+mm", "dense f32", "kernel G MAC/s"], out).text())


if __name__ == "__main__":
    main()
