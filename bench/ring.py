"""Ring and concurrency measurements: nodes as separate processes on loopback.

    python -m bench.ring node  --node-id n1 --port P --peers peers.json [--max-seconds 900]
    python -m bench.ring drive --node-id n0 --port P --peers peers.json --nodes N [--streams 1,4,16]

Every node binds 127.0.0.1 only and finds the others through a manual peer file (no mDNS, so
nodes of other clusters on this machine never join). All nodes offer the same memory, so the
ring splits the layers evenly. The ``drive`` node is also the origin of every request: after
the ring has formed and one warm-up request has loaded every shard, it measures
- decode tokens/s of one stream (greedy, ``--decode-tokens`` tokens, EOS ignored), and the time
  to first token;
- for each k of ``--streams``, k simultaneous streams: aggregate tokens/s, k * tokens / the
  wall time from starting them until the last one finishes (prefills included), and aggregate
  decode tokens/s, the tokens that arrive after every stream has its first token (all prefills
  done) over the time from then to the last token;
each the median of ``--runs`` runs, and prints one BENCH-RESULT line. ``bench.run`` starts the
processes, reads each one's peak memory (VmHWM) and stops them.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import socket
import statistics
import time

from bench.common import MODEL, emit, median, peak_rss_bytes, prompts

logger = logging.getLogger(__name__)

#: Memory every benchmark node offers, in bytes (equal: the ring splits layers evenly).
NODE_MEMORY = 8 * 2**30


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_peer_file(path: str, ports: dict[str, int]) -> None:
    """The manual-discovery peer file for nodes ``{node_id: port}`` on 127.0.0.1."""
    caps = {"model": "bench", "chip": "cpu", "memory": NODE_MEMORY}
    peers = {nid: {"address": "127.0.0.1", "port": port, "device_capabilities": caps} for nid, port in ports.items()}
    with open(path, "w") as f:
        json.dump({"peers": peers}, f)


async def _start(args):
    from exo.config import load_settings
    from exo.orchestration.launcher import start_node

    settings = load_settings({
        "node.id": args.node_id, "node.host": "127.0.0.1", "node.port": args.port, "node.interfaces": ["127.0.0.1"],
        "node.discovery_module": "manual", "node.discovery_config_path": args.peers, "server.enabled": False,
        "node.memory": NODE_MEMORY, "model.inference_engine": args.engine,
        "engine.dtype": args.dtype if args.engine == "torch" else None, "engine.batch_invariant": args.batch_invariant,
        "node.health_check_interval": 0.5, "node.cluster_secret": args.cluster_secret,
        # no preload while the ring forms (a node would load the shard of a smaller
        # ring first, and its peak memory would show that): the warm-up loads it
        "model.default": ""})
    return await start_node(settings)


async def run_node(args) -> None:
    running = await _start(args)
    try:
        await asyncio.sleep(args.max_seconds)
    finally:
        await running.stop()


async def _generate(node, ids: list[int], n_tokens: int, tokens: list[int] | None = None) -> list[float]:
    """Times (perf_counter) at which each of ``n_tokens`` greedy tokens arrived; the tokens are
    appended to ``tokens`` when given."""
    from exo.inference.generation import GenerationOptions

    options = GenerationOptions(max_tokens=n_tokens, temperature=0.0, stop_token_ids=())
    stamps: list[float] = []
    async for r in node.generate(MODEL, ids, options):
        stamps += [time.perf_counter()] * len(r.tokens)
        if tokens is not None:
            tokens += r.tokens
    return stamps


def _distinct(ids: list[int], i: int) -> list[int]:
    """``ids`` with a token that differs for each ``i`` in front, so that no two measured
    prompts share a prefix (nothing comes from the prompt cache unless a row says so)."""
    return [1000 + i % 40000] + ids


@functools.cache
def _long_prompt() -> tuple[int, ...]:
    return tuple(prompts()["long"])


def _prompt_of(n: int) -> list[int]:
    """Token ids of exactly ``n`` tokens: the long benchmark prompt repeated and cut."""
    long = list(_long_prompt())
    return (long * (n // len(long) + 1))[:n]


async def _ttft(node, ids: list[int]) -> float:
    t = time.perf_counter()
    stamps = await _generate(node, ids, 1)
    return stamps[0] - t


async def _followup_ttft(node, tag: int) -> dict:
    """A chat client's second turn: a ~2000-token first prompt, 16 tokens of answer, then the
    whole conversation again with a short new user turn (what the chat template would add),
    as a client resends it. Returns both turns' times to first token."""
    from exo.inference.tokenizers import tokenizer_for_path
    from exo.models.sources import STORE

    tok = tokenizer_for_path(STORE.card(MODEL).path)
    first = _distinct(_prompt_of(1999), tag)
    t = time.perf_counter()
    answer: list[int] = []
    stamps = await _generate(node, first, 16, answer)
    first_ttft = stamps[0] - t
    turn = tok.encode("<|im_end|>\n<|im_start|>user\nAnd what follows from that?<|im_end|>\n<|im_start|>assistant\n")
    return {"first_ttft_s": first_ttft, "followup_ttft_s": await _ttft(node, first + answer + turn),
            "followup_tokens": len(first) + len(answer) + len(turn)}


async def _prefill_gap(node, streams: int, tag: int) -> dict:
    """While ``streams`` streams decode, a 2000-token prompt is prefilled: the streams' longest
    gap between two tokens while it is (from sending it to its first token), against their
    median gap over the whole run and before the prompt came, and its time to first token."""
    ids = prompts()["short"]
    long = _distinct(_prompt_of(1999), tag + streams)  # before the streams start: it loads a tokenizer
    stamps: list[list[float]] = [[] for _ in range(streams)]

    async def stream(i: int) -> None:
        from exo.inference.generation import GenerationOptions

        options = GenerationOptions(max_tokens=4000, temperature=0.0, stop_token_ids=())
        async for r in node.generate(MODEL, _distinct(ids, tag + i), options):
            stamps[i] += [time.perf_counter()] * len(r.tokens)

    tasks = [asyncio.create_task(stream(i)) for i in range(streams)]
    try:
        while min(len(s) for s in stamps) < 24:
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        ttft = await _ttft(node, long)
        t1 = t0 + ttft
        end = time.perf_counter() + 1.0  # and a second of decoding after it
        while time.perf_counter() < end:
            await asyncio.sleep(0.05)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    gaps = [(a, b - a) for s in stamps for a, b in zip(s, s[1:])]
    during = sorted(g for a, g in gaps if t0 <= a + g and a <= t1)
    before = [g for a, g in gaps if a + g < t0]
    return {"streams": streams, "ttft_s": ttft, "median_gap_s": statistics.median(g for _, g in gaps),
            "median_gap_before_s": statistics.median(before) if before else None,
            "max_gap_during_s": during[-1] if during else None,
            "gaps_during_s": {"p50": during[len(during) // 2], "p90": during[int(len(during) * 0.9)],
                              "top": during[-5:]} if during else None,
            "max_gap_at_s": next((a - t0 for a, g in gaps if during and g == during[-1]), None)}


async def drive(args) -> dict:
    from exo.models.sources import STORE

    running = await _start(args)
    node = running.node
    try:
        deadline = time.monotonic() + 60
        while len(node.topology.nodes) < args.nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the ring did not form: {len(node.topology.nodes)} of {args.nodes} nodes")
            await node.update_topology()
            await asyncio.sleep(0.2)
        ring = node.partition(STORE.card(MODEL))
        ids = prompts()["short"]
        await _generate(node, ids, 8)  # warm-up: every node loads its shard
        ttft, decode = [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            stamps = await _generate(node, ids, args.decode_tokens)
            ttft.append(stamps[0] - t)
            decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        concurrency: dict[str, dict] = {}
        tag = 0
        for k in args.streams:
            agg, dec, batches = [], [], []
            for _ in range(args.stream_runs or args.runs):
                engine = node.engine
                before = len(getattr(engine, "batch_sizes", []))
                t = time.perf_counter()
                tag += k
                results = await asyncio.gather(*(_generate(node, _distinct(ids, tag + i), args.stream_tokens or args.decode_tokens)
                                                 for i in range(k)))
                wall = time.perf_counter() - t
                agg.append(sum(len(s) for s in results) / wall)
                # decode alone: tokens after every stream has its first one (all prefills done)
                start, end = max(s[0] for s in results), max(s[-1] for s in results)
                in_window = sum(1 for s in results for stamp in s if stamp > start)
                dec.append(in_window / (end - start) if end > start else None)
                sizes = getattr(engine, "batch_sizes", [])[before:]
                if sizes:
                    batches.append(statistics.mean(sizes))
            concurrency[str(k)] = {"aggregate_tps": median(agg), "runs": agg, "decode_tps": median([d for d in dec if d]),
                                   "decode_runs": dec, "mean_batch": median(batches)}
        ttft_by_len = {}
        for n in args.ttft_lens:
            times = []
            for _ in range(args.runs):
                tag += 1
                times.append(await _ttft(node, _distinct(_prompt_of(n - 1), tag)))
            ttft_by_len[str(n)] = {"ttft_s": median(times), "runs": times}
        gap = await _prefill_gap(node, args.gap_streams, tag + 100) if args.gap_streams else None
        tag += 200
        followup = []
        if args.followup:
            for _ in range(args.runs):
                tag += 1
                followup.append(await _followup_ttft(node, tag))
        return {
            "nodes": args.nodes,
            "ttft_by_len": ttft_by_len,
            "prefill_gap": gap,
            "followup": followup,
            "ring": [{"node_id": p.node_id, "start_layer": p.start_layer, "end_layer": p.end_layer} for p in ring],
            "ttft_s": median(ttft),
            "decode_tps": median(decode),
            "runs": {"ttft_s": ttft, "decode_tps": decode},
            "concurrency": concurrency,
            "driver_peak_rss": peak_rss_bytes(),
            "driver_weight_bytes": node.engine.weight_bytes(),
        }
    finally:
        await running.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=["node", "drive"])
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--peers", required=True, help="manual-discovery peer file")
    parser.add_argument("--engine", default="torch", choices=["torch", "dummy"],
                        help="dummy: no weights, no compute, so a token's time is the ring's own cost")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True,
                        help="the torch engine's batch invariance (the node's --batch-invariant; default on)")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="a plain node stops after this long")
    parser.add_argument("--cluster-secret", default=None, help="the cluster secret of every node (mutual TLS between them)")
    parser.add_argument("--nodes", type=int, default=1, help="ring size the driver waits for")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",") if x], default=[])
    parser.add_argument("--stream-tokens", type=int, default=0, help="tokens per concurrent stream (0: --decode-tokens)")
    parser.add_argument("--stream-runs", type=int, default=0, help="runs per stream count (0: --runs)")
    parser.add_argument("--ttft-lens", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                        help="prompt lengths in tokens whose time to first token is measured (distinct prompts)")
    parser.add_argument("--gap-streams", type=int, default=0,
                        help="streams decoding while a 2000-token prompt is prefilled (their longest gap is measured)")
    parser.add_argument("--followup", action="store_true", help="time to first token of a second chat turn after ~2000 tokens")
    parser.add_argument("--cpus", type=lambda s: {int(x) for x in s.split(",") if x}, default=None,
                        help="CPU ids this process runs on (os.sched_setaffinity, set before torch is imported): "
                             "a node pinned to its own core is measured as a separate one-core machine")
    args = parser.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, args.cpus)
    logging.basicConfig(level=os.environ.get("BENCH_LOG", "WARNING"), format="%(created).6f %(levelname)s %(name)s: %(message)s")
    if args.role == "node":
        asyncio.run(run_node(args))
    else:
        emit(asyncio.run(drive(args)))


if __name__ == "__main__":
    main()
