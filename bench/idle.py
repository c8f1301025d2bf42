"""Decode speed when the steps come with pauses between them, as each node of a ring sees them.

    python -m bench.idle [--gap-ms 3] [--rounds 8] [--steps 25]

On a ring each node waits while the others compute: on a 2-node ring each half of the model
pauses about as long as the other half's step takes (~3 ms here) before its next step. This
measures, in one process with no ring and no network, what such pauses cost the steps
themselves. Two torch engines hold the two halves of SmolLM2-135M's layers; one request's
decode steps alternate between them (``infer_tensor``, as a node runs them), in blocks of ``--steps``
tokens, each block in one regime:
    - back to back: each half's step starts as soon as the other's ends (one node's pattern);
    - idle pauses: the thread sleeps ``--gap-ms`` before each step, the kernels' pool threads
      wait (each node's pattern on a ring of two);
    - busy pauses: as idle, but the calling thread spins in Python and the kernels' pool
      threads spin (``set_spin``), so no core idles during a pause.
The regimes take turns block by block for ``--rounds`` rounds, so they share the machine's
drift and the KV cache lengths. The first ``SETTLE`` steps of each block are left out, since
on some machines the speed takes tens of ms to settle after the regime changes.

Prints a table and emits the medians (ms per step) as a ``BENCH-RESULT`` line (bench.common).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import numpy as np

from bench.common import MODEL, Table, emit, fmt, prompts, ratio

#: The regimes, in the order each round runs them.
REGIMES = ("back to back", "idle pauses", "busy pauses")
#: Steps at the start of each block that are not counted.
SETTLE = 8


def _spin_until(deadline: float) -> None:
    while time.perf_counter() < deadline:
        pass


async def measure(gap_ms: float, rounds: int, steps: int) -> dict:
    """Median ms of a decode step of each half in each regime: ``{regime: [first half, second
    half]}``, with ``gap_ms`` and the counts under "gap_ms", "rounds", "steps".

    Raises:
        ValueError: ``steps`` is not larger than ``SETTLE``, or ``gap_ms`` is not positive.
    """
    if steps <= SETTLE or gap_ms <= 0:
        raise ValueError(f"--steps must exceed {SETTLE} and --gap-ms must be positive")
    import torch

    from exo.inference.shard import Shard
    from exo.inference.torch.engine import TorchInferenceEngine
    from exo.models.sources import STORE

    n_layers = STORE.card(MODEL).n_layers
    half = n_layers // 2
    shards = (Shard(MODEL, 0, half - 1, n_layers), Shard(MODEL, half, n_layers - 1, n_layers))
    engines = (TorchInferenceEngine(), TorchInferenceEngine())
    times: dict[str, list[list[float]]] = {r: [[], []] for r in REGIMES}
    try:
        for e, s in zip(engines, shards):
            await e.ensure_shard(s)
        spin = torch.ops.exo_gguf.set_spin  # the block kernels are loaded with the shard
        rid, ids = "idle-bench", np.asarray([prompts()["short"]], dtype=np.int64)
        hidden = await engines[0].infer_tensor(rid, shards[0], ids, 0)
        logits = await engines[1].infer_tensor(rid, shards[1], hidden, 0)
        position, token = ids.shape[1], np.asarray([[int(np.argmax(logits))]], dtype=np.int64)

        def pause(regime: str) -> None:
            if regime == "idle pauses":
                time.sleep(gap_ms / 1000)
            elif regime == "busy pauses":
                spin(True)
                try:
                    _spin_until(time.perf_counter() + gap_ms / 1000)
                finally:
                    spin(False)

        for _ in range(rounds):
            for regime in REGIMES:
                for j in range(steps):
                    x = token
                    for h in (0, 1):
                        pause(regime)
                        t0 = time.perf_counter()
                        x = await engines[h].infer_tensor(rid, shards[h], x, position)
                        if j >= SETTLE:
                            times[regime][h].append((time.perf_counter() - t0) * 1000)
                    token = np.asarray([[int(np.argmax(x))]], dtype=np.int64)
                    position += 1
    finally:
        for e in engines:
            await e.close()
    result: dict = {r: [statistics.median(h) for h in v] for r, v in times.items()}
    result.update(gap_ms=gap_ms, rounds=rounds, steps=steps)
    return result


def table(result: dict) -> Table:
    """Rows: the regimes; each half's median step time, both together, and their ratio to back to back."""
    base = result[REGIMES[0]]
    rows = [[r, fmt(a, 2), fmt(b, 2), fmt(a + b, 2), ratio(a + b, sum(base))] for r in REGIMES for a, b in [result[r]]]
    return Table(f"Decode steps with pauses: the model's two halves in one process, no ring; pauses of {result['gap_ms']:g} ms "
                 f"before each step; blocks of {result['steps']} tokens per regime, {result['rounds']} rounds (bench/idle.py)",
                 ["regime", "layers 0-14 ms/step", "layers 15-29 + head ms/step", "both ms", "vs back to back"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gap-ms", type=float, default=3.0, help="pause before each step, in ms")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of one block per regime")
    parser.add_argument("--steps", type=int, default=25, help=f"tokens per block (the first {SETTLE} are not counted)")
    args = parser.parse_args()
    result = asyncio.run(measure(args.gap_ms, args.rounds, args.steps))
    print(table(result).text(), file=sys.stderr)
    emit(result)


if __name__ == "__main__":
    main()
