"""The ring measured as separate machines: every node pinned to a core of its own.

    python -m bench.scale [--reps 1] [--runs 1] [--streams 4,8,16,32,64] [--markdown PATH]

With both nodes of a 2-node ring on the same two cores, a ring can only lose against one node.
Here node ``i`` runs on CPU ``i`` alone (``os.sched_setaffinity`` in its process, before torch
starts its threads; the node sizes its thread pools from that affinity), as if each were a
one-core machine, and the first node drives: 1, 2, ... up to the machine's core count (or
``--max-nodes``), the ring sizes alternated ``--reps`` times. Per ring size:

- decode tokens/s of one stream (``--decode-tokens``, greedy, EOS ignored);
- aggregate decode tokens/s of k simultaneous streams (each its own prompt): the tokens that
  arrive after every stream has its first one over the time from then to the last token; and the
  mean decode batch on the first node;
- time to first token of a fresh 50- and 2000-token prompt (distinct prompts: nothing cached);
- a chat client's second turn after a ~2000-token first turn (the whole conversation resent
  with a short new user turn, token-exact with what was generated): its time to first token,
  which the prompt cache serves from the first turn's KV cache.

Targets (issue 22) are ratios against the 1-node ring of the same run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from bench.common import Table, fmt, median, ratio
from bench.run import load_average, merge_reps, ring_retrying

logger = logging.getLogger(__name__)


def _peak(conc: dict, ks: list[int]) -> tuple[float | None, int | None]:
    """The best aggregate decode tok/s over the stream counts ``ks`` and its stream count."""
    best = max(((conc[str(k)]["decode_tps"], k) for k in ks if conc.get(str(k), {}).get("decode_tps")), default=(None, None))
    return best


def tables(rings: dict[int, dict], streams: list[int]) -> list[Table]:
    """The results table and the targets table of ``rings`` ({nodes: merged ring result})."""
    rows = []
    for n, r in sorted(rings.items()):
        conc = r.get("concurrency") or {}
        ttft = r.get("ttft_by_len") or {}
        follow = [f["followup_ttft_s"] for f in r.get("followup") or []]
        peak, at = _peak(conc, streams)
        rows.append([str(n), " / ".join(str(p["end_layer"] - p["start_layer"] + 1) for p in r["ring"]), fmt(r["decode_tps"]),
                     *(f"{fmt(conc.get(str(k), {}).get('decode_tps'))} ({fmt(conc.get(str(k), {}).get('mean_batch'))})" for k in streams),
                     f"{fmt(peak)} @ {at}", fmt((ttft.get("50") or {}).get("ttft_s", 0) * 1000, 0),
                     fmt((ttft.get("2000") or {}).get("ttft_s", 0) * 1000, 0),
                     fmt(min(follow) * 1000, 0) if follow else "-"])
    results = Table("Separate machines: each node pinned to a core of its own (aggregate decode tok/s of k streams, "
                    "mean decode batch on the first node in brackets)",
                    ["nodes", "layers per node", "1 stream tok/s", *(f"{k} streams" for k in streams), "peak",
                     "TTFT 50 ms", "TTFT 2000 ms", "2nd turn TTFT ms"], rows)
    one, two = rings.get(1), rings.get(2)
    out = []

    def add(name: str, value: str, goal: str, ok: bool | None) -> None:
        out.append([name, value, goal, "-" if ok is None else ("met" if ok else "NOT met")])

    def num(a, b):
        return a / b if a and b else None

    if one and two:
        c1, c2 = one["concurrency"], two["concurrency"]
        p1, _ = _peak(c1, [k for k in streams if k >= 8])
        p2, _ = _peak(c2, [k for k in streams if k >= 8])
        cap = num(p2, p1)
        add("capacity: peak aggregate decode, 2 nodes / 1 node", ratio(p2, p1), ">= 1.8x", cap and cap >= 1.8)
        d16 = [c.get("16", {}).get("decode_tps") for c in (c1, c2)]
        r16 = num(d16[1], d16[0])
        add("aggregate decode at 16 streams, 2 nodes / 1 node", ratio(d16[1], d16[0]), ">= 1.4x", r16 and r16 >= 1.4)
        a8, a16 = c1.get("8", {}).get("decode_tps"), c1.get("16", {}).get("decode_tps")
        if a8 and a16:  # one node's step time at 16 rows over its time at 8: 16/a16 over 8/a8
            add("(bound at 16 streams: one node's step at 16 rows / at 8 rows)", f"{2 * a8 / a16:.2f}x", "-", None)
        single = num(two["decode_tps"], one["decode_tps"])
        add("single stream, 2 nodes / 1 node", ratio(two["decode_tps"], one["decode_tps"]), ">= 0.92x", single and single >= 0.92)
        t1, t2 = [(r.get("ttft_by_len") or {}).get("2000", {}).get("ttft_s") for r in (one, two)]
        tt = num(t2, t1)
        add("TTFT of a 2000-token prompt, 2 nodes / 1 node", ratio(t2, t1), "<= 0.65x", tt and tt <= 0.65)
    for n, r in sorted(rings.items()):
        fresh = (r.get("ttft_by_len") or {}).get("50", {}).get("ttft_s")
        follow = [f["followup_ttft_s"] for f in r.get("followup") or []]
        f = min(follow) if follow else None
        v = num(f, fresh)
        add(f"{n} node(s): 2nd-turn TTFT after ~2000 tokens / fresh 50-token TTFT", ratio(f, fresh), "<= 1.5x", v and v <= 1.5)
    for n, r in sorted(rings.items()):
        g = r.get("prefill_gap")
        if g and g.get("max_gap_during_s"):
            v = g["max_gap_during_s"] / g["median_gap_s"]
            before = g.get("median_gap_before_s")
            add(f"{n} node(s): {g['streams']} streams' longest gap while a 2000-token prompt is prefilled / median gap",
                f"{g['max_gap_during_s'] * 1000:.0f} / {g['median_gap_s'] * 1000:.0f} ms = {v:.2f}x "
                f"(median {before * 1000:.0f} ms before it; its TTFT {g['ttft_s']:.1f} s)", "< 3x", v < 3)
    return [results, Table("Targets (issue 22; one core per node, ratios against the 1-node ring of this run)",
                           ["target", "measured", "goal", "status"], out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=1, help="the ring sizes are measured this many times, alternately")
    parser.add_argument("--runs", type=int, default=2, help="runs of the single-stream, TTFT and follow-up figures")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--stream-tokens", type=int, default=32, help="tokens per stream in the concurrency rows")
    parser.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",") if x], default=[4, 8, 16, 32, 64])
    parser.add_argument("--max-nodes", type=int, default=0, help="largest ring (default: the CPUs this process may use)")
    parser.add_argument("--markdown", default=None, help="append the tables to this markdown file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cpus = sorted(os.sched_getaffinity(0))
    sizes = list(range(1, min(len(cpus), args.max_nodes or len(cpus)) + 1))
    start_load = load_average()
    drive = ["--ttft-lens", "50,2000", "--followup", "--gap-streams", "4", "--stream-tokens", str(args.stream_tokens), "--stream-runs", "1"]
    reps: dict[int, list[dict]] = {n: [] for n in sizes}
    for _ in range(max(1, args.reps)):
        for n in sizes:
            reps[n].append(ring_retrying(n, args.runs, args.decode_tokens, args.streams, "float32", cpus=cpus[:n], drive_args=drive))
    rings = {n: merge_reps(r) for n, r in reps.items()}
    for n, r in rings.items():  # the medians over every run of every repetition
        lens = reps[n][0].get("ttft_by_len") or {}
        r["ttft_by_len"] = {k: {"ttft_s": median([t for rep in reps[n] for t in rep["ttft_by_len"][k]["runs"]])} for k in lens}
        r["followup"] = [f for rep in reps[n] for f in rep.get("followup") or []]
        r["prefill_gap"] = reps[n][0].get("prefill_gap")
    out = tables(rings, args.streams)
    footer = f"Machine: {len(cpus)} CPUs; load average {start_load} at the start, {load_average()} at the end."
    for t in out:
        sys.stdout.write(t.text() + "\n\n")
    sys.stdout.write(footer + "\n")
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + "\n\n".join(t.markdown() for t in out) + "\n\n" + footer + "\n")


if __name__ == "__main__":
    main()
