"""Single-node measurements of one engine, in a process of its own (so its peak memory is its own).

    python -m bench.single {exo,transformers,llamacpp} [--model smollm2-135m] [--dtype float32] [--runs 3] [--decode-tokens 64]

Measures, on the same token ids for every engine (``bench.common.prompts``):
- prefill tokens/s of the ~30- and ~500-token prompts (one forward pass over the prompt);
- time to first token of the short prompt through the engine's generation API
  (exo: ``Node.generate``; transformers: ``generate``; llama.cpp: ``Llama.generate``);
- decode tokens/s of that generation, greedy, ``--decode-tokens`` tokens, EOS ignored:
  (tokens - 1) / (time of the last token - time of the first);
- peak resident memory of the process, and its resident memory before loading the model.
Each figure is the median of ``--runs`` runs after one warm-up run. Prints one BENCH-RESULT line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time

from bench.common import MODEL, emit, median, peak_rss_bytes, prompts, rss_bytes

logger = logging.getLogger(__name__)


def _result(engine: str, baseline: int, load_s: float, prefill: dict, ttft: list, decode: list, **extra) -> dict:
    return {
        "engine": engine,
        "load_s": load_s,
        "baseline_rss": baseline,
        "peak_rss": peak_rss_bytes(),
        "prefill_tps": {k: median(v) for k, v in prefill.items()},
        "ttft_s": median(ttft),
        "decode_tps": median(decode),
        "runs": {"prefill_tps": prefill, "ttft_s": ttft, "decode_tps": decode},
        **extra,
    }


async def bench_exo(model: str, runs: int, n_tokens: int, dtype: str, weights: str = "auto") -> dict:
    """exo's torch engine behind a single Node (no network, no API)."""
    import numpy as np

    from exo.inference.generation import GenerationOptions
    from exo.inference.shard import Shard
    from exo.models.sources import STORE
    from exo.config import load_settings
    from exo.orchestration.launcher import start_node

    ids = prompts(model)
    baseline = rss_bytes()
    config = load_settings({"node.host": "127.0.0.1", "node.interfaces": ["127.0.0.1"], "node.discovery_module": "none",
                            "server.enabled": False, "model.inference_engine": "torch", "engine.dtype": dtype,
                            "engine.weights": weights, "model.default": model})
    t0 = time.perf_counter()
    running = await start_node(config)
    node, engine = running.node, running.node.engine
    shard = Shard.full(model, STORE.card(model).n_layers)
    await engine.ensure_shard(shard)
    load_s = time.perf_counter() - t0
    try:
        prefill: dict[str, list[float]] = {k: [] for k in ids}
        ttft, decode, engine_decode = [], [], []
        options = GenerationOptions(max_tokens=n_tokens, temperature=0.0, stop_token_ids=())
        for run in range(runs + 1):
            for name, p in ids.items():
                t = time.perf_counter()
                await engine.infer_tensor(f"prefill-{run}-{name}", shard, np.asarray([p]), 0)
                dt = time.perf_counter() - t
                await engine.clear_request(f"prefill-{run}-{name}")
                if run:
                    prefill[name].append(len(p) / dt)
            # the engine alone: greedy decode loop without the node around it
            rid = f"engine-{run}"
            logits = await engine.infer_tensor(rid, shard, np.asarray([ids["short"]]), 0)
            pos, times = len(ids["short"]), []
            for _ in range(n_tokens - 1):
                logits = await engine.infer_tensor(rid, shard, np.asarray([[int(logits.argmax())]]), pos)
                pos += 1
                times.append(time.perf_counter())
            await engine.clear_request(rid)
            # through the node, as a user's request runs
            t = time.perf_counter()
            stamps = []
            async for r in node.generate(model, ids["short"], options):
                stamps += [time.perf_counter()] * len(r.tokens)
            if run:
                engine_decode.append((len(times) - 1) / (times[-1] - times[0]))
                ttft.append(stamps[0] - t)
                decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        label = f"exo torch {engine.weights} weights, {dtype}" + (" (default)" if weights == "auto" else "")
        return _result(label, baseline, load_s, prefill, ttft, decode,
                       engine_decode_tps=median(engine_decode), weight_bytes=engine.weight_bytes())
    finally:
        await running.stop()


def bench_transformers(model: str, runs: int, n_tokens: int) -> dict:
    """transformers' model loaded from the same GGUF (dequantized to float32), ``generate``."""
    import torch
    import transformers

    from exo.models.sources import STORE

    ids = prompts(model)
    baseline = rss_bytes()
    path = STORE.card(model).path
    t0 = time.perf_counter()
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0

    class Stamps(transformers.generation.BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:  # the first call carries the prompt
                self.prompt_seen = True
                return
            self.times.append(time.perf_counter())

        def end(self):
            pass

    prefill: dict[str, list[float]] = {k: [] for k in ids}
    ttft, decode = [], []
    with torch.inference_mode():
        for run in range(runs + 1):
            for name, p in ids.items():
                x = torch.tensor([p])
                t = time.perf_counter()
                reference(x, use_cache=True)
                if run:
                    prefill[name].append(len(p) / (time.perf_counter() - t))
            streamer = Stamps()
            x = torch.tensor([ids["short"]])
            t = time.perf_counter()
            reference.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                           do_sample=False, streamer=streamer, pad_token_id=0)
            if run:
                ttft.append(streamer.times[0] - t)
                decode.append((len(streamer.times) - 1) / (streamer.times[-1] - streamer.times[0]))
    return _result(f"transformers {transformers.__version__} generate", baseline, load_s, prefill, ttft, decode)


def bench_llamacpp(model: str, runs: int, n_tokens: int) -> dict:
    """llama.cpp (llama-cpp-python) on the same GGUF, greedy ``Llama.generate``."""
    import llama_cpp

    from exo.models.sources import STORE

    ids = prompts(model)
    baseline = rss_bytes()
    threads = os.cpu_count() or 1
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(STORE.card(model).path), n_ctx=2048, n_batch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0
    prefill: dict[str, list[float]] = {k: [] for k in ids}
    ttft, decode = [], []
    for run in range(runs + 1):
        for name, p in ids.items():
            llm.reset()
            t = time.perf_counter()
            llm.eval(p)
            if run:
                prefill[name].append(len(p) / (time.perf_counter() - t))
        llm.reset()
        stamps = []
        t = time.perf_counter()
        for _ in llm.generate(ids["short"], top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == n_tokens:
                break
        if run:
            ttft.append(stamps[0] - t)
            decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return _result(f"llama.cpp {llama_cpp.__version__} (llama-cpp-python)", baseline, load_s, prefill, ttft, decode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", choices=["exo", "transformers", "llamacpp"])
    parser.add_argument("--model", default=MODEL, help="a model whose GGUF is on this machine")
    parser.add_argument("--dtype", default="float32", help="exo torch engine dtype")
    parser.add_argument("--weights", default="auto", choices=["auto", "gguf", "dense", "int4"], help="exo torch engine weights")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.engine == "exo":
        result = asyncio.run(bench_exo(args.model, args.runs, args.decode_tokens, args.dtype, args.weights))
    elif args.engine == "transformers":
        result = bench_transformers(args.model, args.runs, args.decode_tokens)
    else:
        result = bench_llamacpp(args.model, args.runs, args.decode_tokens)
    emit(result)


if __name__ == "__main__":
    main()
