"""Decode and prefill speed of each inference engine on this machine, one engine holding every layer.

    python -m bench.engines [--engines torch,tinygrad,mlx,dummy] [--tokens 32] [--runs 3]

For each engine that is installed (others are listed as skipped, with the reason): load
SmolLM2-135M (all 30 layers) through ``ensure_shard``, then ``--runs`` times after one warm-up
run: prefill a chat prompt (~35 tokens) and decode ``--tokens`` tokens greedily through
``infer_tensor`` (EOS ignored). Reported, each the median over the runs:
    - prefill tokens/s: prompt tokens / time of the prefill call;
    - decode tokens/s: decoded tokens / time of the decode calls (no network, no sampling
      beyond argmax, so this is the engine alone);
    - load s: ``ensure_shard`` time, tinygrad's graph capture included.
Writes a markdown table to stdout. Self-contained: needs only exo and the engines' packages.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import platform
import shutil
import statistics
import sys
import time

import numpy as np

from exo.config import DEFAULT_MODEL

logger = logging.getLogger("bench.engines")

MODEL = DEFAULT_MODEL
PROMPT = "Tell me a story about a lighthouse keeper."
ALL_ENGINES = ("torch", "tinygrad", "mlx", "dummy")


def missing_reason(name: str) -> str | None:
    """Why engine ``name`` cannot run here, or None."""
    if name == "dummy":
        return None
    if importlib.util.find_spec({"torch": "torch", "tinygrad": "tinygrad", "mlx": "mlx"}[name]) is None:
        return f"not installed (pip install -e .[{name}])"
    if name == "tinygrad" and shutil.which("clang") is None:
        return "tinygrad's CPU device needs clang"
    return None


async def measure(name: str, prompt: list[int], n_tokens: int, runs: int) -> dict:
    """Load ``name`` with every layer and time prefill and greedy decode; medians over ``runs``."""
    from exo.inference.inference_engine import get_inference_engine
    from exo.inference.shard import Shard
    from exo.models.sources import STORE

    engine = get_inference_engine(name)
    shard = Shard.full(MODEL, STORE.card(MODEL).n_layers)
    t0 = time.perf_counter()
    await engine.ensure_shard(shard)
    load_s = time.perf_counter() - t0
    prefill_tps, decode_tps = [], []
    try:
        for run in range(runs + 1):  # run 0 warms up
            rid = f"bench-{run}"
            t0 = time.perf_counter()
            logits = await engine.infer_tensor(rid, shard, np.asarray([prompt], dtype=np.int64), 0)
            t1 = time.perf_counter()
            pos, tok = len(prompt), int(np.argmax(logits))
            for _ in range(n_tokens):
                logits = await engine.infer_tensor(rid, shard, np.asarray([[tok]], dtype=np.int64), pos)
                pos, tok = pos + 1, int(np.argmax(logits))
            t2 = time.perf_counter()
            await engine.clear_request(rid)
            if run:
                prefill_tps.append(len(prompt) / (t1 - t0))
                decode_tps.append(n_tokens / (t2 - t1))
            logger.info("%s run %d: prefill %.1f tok/s, decode %.2f tok/s", name, run, len(prompt) / (t1 - t0), n_tokens / (t2 - t1))
    finally:
        await engine.close()
    return {"load_s": load_s, "prefill_tps": statistics.median(prefill_tps), "decode_tps": statistics.median(decode_tps),
            "device": _device(name, engine)}


def _device(name: str, engine) -> str:
    if name == "torch":
        return f"{engine.device} {str(engine.dtype).replace('torch.', '')}"
    if name == "tinygrad":
        return f"{engine.device} float32"
    if name == "mlx":
        import exo.inference.mlx as exo_mlx
        import mlx.core as mx

        blas = "OpenBLAS" if exo_mlx.blas_library else "bundled BLAS"
        return f"{mx.default_device()} float32, {blas}"
    return "no weights"


async def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", default=",".join(ALL_ENGINES), help="comma list of engines (default: all)")
    p.add_argument("--tokens", type=int, default=32, help="tokens decoded per run")
    p.add_argument("--runs", type=int, default=3, help="measured runs per engine (after one warm-up run)")
    args = p.parse_args(argv)
    from exo.inference.tokenizers import tokenizer_for_path
    from exo.models.sources import STORE

    tok = tokenizer_for_path(STORE.card(MODEL).path)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    rows = []
    for name in [e.strip() for e in args.engines.split(",") if e.strip()]:
        if name not in ALL_ENGINES:
            raise SystemExit(f"unknown engine {name!r}; choose from {', '.join(ALL_ENGINES)}")
        reason = missing_reason(name)
        if reason:
            rows.append(f"| {name} | skipped: {reason} | | | |")
            continue
        r = await measure(name, prompt, args.tokens, args.runs)
        rows.append(f"| {name} | {r['device']} | {r['decode_tps']:.1f} | {r['prefill_tps']:.1f} | {r['load_s']:.1f} |")
    out = [f"Engines on {platform.machine()} {platform.system()}, {MODEL}, one engine holding all layers; "
           f"prompt {len(prompt)} tokens, {args.tokens} decoded tokens, median of {args.runs} runs.", "",
           "| engine | device | decode tokens/s | prefill tokens/s | load s |", "|---|---|---|---|---|", *rows]
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(main())
