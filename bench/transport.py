"""The ring's transport before and after a change, alternated in one run.

    python -m bench.transport --reference REF [--reps 3] [--runs 3]

``REF`` is a git commit of this repository (e.g. the one before the transport changed): it is
checked out into a temporary worktree, and its node processes run from there, alternating with
this tree's, so that the machine's drift over the minutes of a run weighs on both alike. For
each repetition and side it measures, with ``bench.run.ring``:

- the ring's own cost: exo's dummy engine (no weights, no compute) on 1 and 2 nodes, so a
  token's time is messages and scheduling only; per hop = (2-node - 1-node time per token) / 2;
- the 2-node decode ratio: the real model (SmolLM2-135M, the torch engine) on 2 nodes over 1.

Sides: ``before`` (REF with the given ``--reference-env``, e.g. ``EXO_RING_LANE=0
EXO_RING_SOCKET=0`` for its gRPC stream), ``before, its default`` (REF as it runs by default),
``after`` (this tree, no cluster secret) and ``after, TLS`` (this tree, every node with one
cluster secret: mutual TLS). Prints one table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import Table, fmt, median
from bench.run import ROOT, load_average, ring_retrying


def _side_runs(root: Path, env: dict, node_args: list[str], runs: int, tokens: int) -> dict:
    """Time per token (s) of the dummy ring of 1 and 2 nodes, and decode tok/s of the real
    model on 1 and 2 nodes."""
    out = {}
    for n in (1, 2):
        r = ring_retrying(n, runs, 200, [], "float32", engine="dummy", env=env, root=root, node_args=node_args)
        out[f"dummy{n}"] = 1 / r["decode_tps"]
    for n in (1, 2):
        r = ring_retrying(n, runs, tokens, [], "float32", env=env, root=root, node_args=node_args)
        out[f"real{n}"] = r["decode_tps"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="git commit whose transport is the 'before'")
    parser.add_argument("--reference-env", default="EXO_RING_LANE=0 EXO_RING_SOCKET=0",
                        help="environment of the reference's nodes, 'K=V K=V' (default: its gRPC stream)")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions")
    parser.add_argument("--runs", type=int, default=3, help="runs per ring (the median)")
    parser.add_argument("--decode-tokens", type=int, default=64)
    args = parser.parse_args()
    ref_env = dict(kv.split("=", 1) for kv in args.reference_env.split())
    print(f"load {load_average()}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        before_root = Path(tmp) / "reference"
        subprocess.run(["git", "worktree", "add", "--detach", str(before_root), args.reference], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            sides = {
                "before": (before_root, ref_env, []),
                "before, its default": (before_root, {}, []),
                "after": (ROOT, {}, []),
                "after, TLS": (ROOT, {}, ["--cluster-secret", "bench-" + os.urandom(16).hex()]),
            }
            got: dict[str, list[dict]] = {name: [] for name in sides}
            for rep in range(args.reps):
                for name, (root, env, node_args) in sides.items():
                    print(f"repetition {rep + 1}/{args.reps}: {name}", file=sys.stderr, flush=True)
                    got[name].append(_side_runs(root, env, node_args, args.runs, args.decode_tokens))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before_root)], cwd=ROOT, capture_output=True)
    rows = []
    for name, reps in got.items():
        d1 = median([r["dummy1"] for r in reps])
        d2 = median([r["dummy2"] for r in reps])
        hop = median([(r["dummy2"] - r["dummy1"]) / 2 for r in reps])
        ratios = [r["real2"] / r["real1"] for r in reps]
        rows.append([name, fmt(d1 * 1000, 2), fmt(d2 * 1000, 2), fmt(hop * 1000, 3),
                     fmt(median([r["real1"] for r in reps])), fmt(median([r["real2"] for r in reps])),
                     f"{median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"])
    table = Table(f"The ring's transport, before ({args.reference[:12]}, {args.reference_env or 'its default'}) and after, "
                  f"alternated {args.reps} times; dummy engine for the ring's own cost, SmolLM2-135M for decode",
                  ["side", "dummy 1 node ms/token", "dummy 2 nodes ms/token", "ms per hop", "1 node tok/s",
                   "2 nodes tok/s", "2 nodes / 1 node (min-max)"], rows)
    print(table.text())
    print(f"\nload at the end {load_average()}")


if __name__ == "__main__":
    main()
