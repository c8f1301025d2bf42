"""What a JSON-schema constraint costs decode: SmolLM2 on the torch engine, one node, in one run.

    python -m bench.structured [--reps 4] [--decode-tokens 128] [--markdown PATH]

The same chat prompt ("list people as JSON") is generated through ``Node.generate`` with and
without a grammar (``exo.inference.grammar.json_schema_grammar`` of an array of at least 40
person records, so neither side can finish before ``--decode-tokens``; no stop tokens), greedy
and at temperature 1 (seeded). The four settings take turns ``--reps`` times after one warm-up
round, so the machine's drift weighs on all of them alike. Decode tokens/s of a run:
(tokens - 1) / (time of the last token - time of the first); each figure is the median over the
repetitions, and the constrained one is compared with the unconstrained one of the same
sampling. Target: the constraint costs at most 10%.

On a shared machine the runs' spread can exceed that, so the grammar's own cost is also timed
alone: the constrained greedy run's tokens replayed through a fresh ``GrammarMatcher``
(``apply_mask`` on (vocab,) float32 logits, then ``consume``), per token, against the median
time of an unconstrained decode step.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time

import numpy as np

from bench.common import MODEL, Table, fmt

logger = logging.getLogger(__name__)

SCHEMA = {
    "type": "array",
    "minItems": 40,
    "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                       "city": {"type": "string", "maxLength": 40}},
        "required": ["name", "age", "city"],
        "additionalProperties": False,
    },
}
PROMPT = "List forty people as a JSON array of objects with their name, age and city."


async def bench(reps: int, n_tokens: int) -> list[list[str]]:
    from exo.config import load_settings
    from exo.inference.generation import GenerationOptions
    from exo.inference.grammar import json_schema_grammar
    from exo.orchestration.launcher import start_node

    config = load_settings({"node.host": "127.0.0.1", "node.interfaces": ["127.0.0.1"], "node.discovery_module": "none",
                            "server.enabled": False, "model.inference_engine": "torch", "model.default": MODEL})
    running = await start_node(config)
    node = running.node
    try:
        tok = await node.get_tokenizer(MODEL)
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
        grammar = json_schema_grammar(SCHEMA)
        settings = {
            (sampling, constrained): GenerationOptions(max_tokens=n_tokens, temperature=temp, seed=1,
                                                       grammar=grammar if constrained else None)
            for sampling, temp in (("greedy", 0.0), ("temperature 1", 1.0)) for constrained in (False, True)
        }
        tps: dict[tuple, list[float]] = {k: [] for k in settings}
        texts: dict[tuple, str] = {}
        generated: dict[tuple, list[int]] = {}
        for rep in range(reps + 1):  # the first round warms up
            for key, options in settings.items():
                stamps, tokens = [], []
                async for r in node.generate(MODEL, ids, options):
                    stamps += [time.perf_counter()] * len(r.tokens)
                    tokens += r.tokens
                if rep:
                    tps[key].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
                texts[key], generated[key] = tok.decode(tokens), tokens
                logger.info("rep %d %s: %d tokens", rep, key, len(tokens))
        for key, text in texts.items():
            logger.info("%s: %r", key, text[:160])
        rows = []
        for (sampling, constrained), values in tps.items():
            base = statistics.median(tps[(sampling, False)])
            med = statistics.median(values)
            rows.append([sampling, "JSON schema" if constrained else "none", str(len(values)), fmt(med, 1),
                         f"{fmt(min(values), 1)}-{fmt(max(values), 1)}", f"{med / base:.3f}x"])
        own = _mask_cost(grammar, tok, generated[("greedy", True)])
        step_ms = 1e3 / statistics.median(tps[("greedy", False)])
        cost = [[fmt(statistics.median(own) * 1e3, 3), fmt(float(np.percentile(own, 99)) * 1e3, 3), fmt(step_ms, 1),
                 f"{statistics.median(own) * 1e3 / step_ms:.1%}"]]
        return rows, cost
    finally:
        await running.stop()


def _mask_cost(grammar: str, tok, tokens: list[int]) -> list[float]:
    """Seconds per token of ``GrammarMatcher.apply_mask`` + ``consume`` along ``tokens``."""
    from exo.inference.grammar import GrammarMatcher

    logits = np.random.default_rng(0).standard_normal(tok.vocab_size).astype(np.float32)
    times = []
    for _ in range(3):
        m = GrammarMatcher(grammar, tok)
        for t in tokens:
            t0 = time.perf_counter()
            m.apply_mask(logits)
            m.consume(t)
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--markdown", help="append the table to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("exo").setLevel(logging.WARNING)
    rows, cost = asyncio.run(bench(args.reps, args.decode_tokens))
    table = Table(f"Decode with and without a JSON-schema grammar: SmolLM2-135M, torch engine, one node, "
                  f"{args.decode_tokens} tokens, {args.reps} alternated repetitions",
                  ["sampling", "constraint", "runs", "decode tok/s (median)", "min-max", "vs none"], rows)
    own = Table("The grammar's own cost per token (apply_mask + consume, the greedy constrained run's tokens)",
                ["ms/token (median)", "ms/token (p99)", "unconstrained decode step ms", "share of a step"], cost)
    print(table.text() + "\n\n" + own.text())  # noqa: T201  (a benchmark's output is its table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + table.markdown() + "\n\n" + own.markdown() + "\n")


if __name__ == "__main__":
    main()
