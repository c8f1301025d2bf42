"""What batch invariance costs (issue 23): one node, 1 and 16 simultaneous streams, with the
torch engine's ``batch_invariant`` on (the default) and off, alternated.

    python -m bench.invariance [--reps 2] [--runs 2] [--decode-tokens 32]

Each repetition starts a fresh one-node "ring" (``bench.run.ring``, a node process on loopback)
with invariance on, then one with it off, so that the machine's drift over minutes weighs on
both alike; each measures the aggregate decode tokens/s of 1 and of 16 streams (the tokens
after every stream has its first one, over the time to the last token; see ``bench.ring``).
Reported: the medians over every run of every repetition, and 16 streams over 1 for each
setting. Invariance changes only batched products: on a CPU without Intel AMX both settings
run the same float32 kernels and the difference is noise; with AMX, invariance keeps batches
off the tile unit.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from bench.common import Table, emit, fmt, median, ratio

SETTINGS = {"on": [], "off": ["--no-batch-invariant"]}
STREAMS = [1, 16]


def measure(reps: int, runs: int, tokens: int) -> dict:
    """{"on" | "off": {"1": [decode tok/s, ...], "16": [...]}}, every run of every repetition,
    the two settings alternated ``reps`` times."""
    from bench.run import ring_retrying

    out: dict[str, dict[str, list[float]]] = {s: {str(k): [] for k in STREAMS} for s in SETTINGS}
    for _ in range(max(1, reps)):
        for setting, node_args in SETTINGS.items():
            print(f"  batch invariance {setting}:", file=sys.stderr, flush=True)
            try:
                r = ring_retrying(1, runs, tokens, STREAMS, "float32", node_args=node_args)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"  batch invariance {setting}: {e}", file=sys.stderr)
                continue
            for k in STREAMS:
                out[setting][str(k)] += [d for d in r["concurrency"][str(k)]["decode_runs"] if d]
    return out


def table(result: dict) -> Table:
    """One row per setting: 1 and 16 streams' aggregate decode tok/s and their ratio, and the
    16-stream figure against the faster path's."""
    med = {s: {k: median(v) if v else None for k, v in by.items()} for s, by in result.items()}
    rows = []
    for s in SETTINGS:
        one, sixteen = med[s]["1"], med[s]["16"]
        rows.append([s + (" (default)" if s == "on" else ""), fmt(one), fmt(sixteen), ratio(sixteen, one),
                     ratio(sixteen, med["off"]["16"]), str(len(result[s]["16"]))])
    return Table("Batch invariance (issue 23): one node, aggregate decode tok/s, invariance on and off alternated",
                 ["batch_invariant", "1 stream", "16 streams", "16 vs 1", "16 streams vs off", "runs"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2, help="alternations of the two settings")
    parser.add_argument("--runs", type=int, default=2, help="runs per setting and repetition")
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args()
    result = measure(args.reps, args.runs, args.decode_tokens)
    print(table(result).text())
    emit(result)


if __name__ == "__main__":
    main()
