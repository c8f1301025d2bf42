"""llguidance against outlines-core on SmolLM2's vocabulary (49,152 tokens), in one process.

    python -m bench.grammar_libraries [--runs 5] [--markdown PATH]

For each JSON schema (a simple object; a nested one with arrays and enums; one with a string
``pattern``), each library:
- compiles it for the vocabulary (llguidance: ``grammar_from_json_schema`` + ``LLMatcher``, its
  lexer and parser built lazily; outlines-core: ``build_regex_from_schema`` + ``Index``, a DFA
  over the whole vocabulary built ahead of time): median of ``--runs`` compiles;
- walks a valid instance token by token (the schema's example, compact JSON, tokenized by exo's
  tokenizer), writing the next-token bitmask (int32, one bit per token) before each token and
  then advancing: median and p99 of the mask time per token over ``--runs`` walks.
The tokenizer-side set-up (llguidance's ``LLTokenizer``, outlines-core's ``Vocabulary``) is
timed once. Then what each supports beyond that: recursive schemas, Lark grammars, tool-call
triggers (text with embedded structured segments). Prints the tables (``bench.common.Table``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time

import numpy as np

from bench.common import MODEL, Table, fmt

logger = logging.getLogger(__name__)

SCHEMAS = {
    "simple object": (
        {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
         "required": ["name", "age"]},
        {"name": "Ann Smith", "age": 34},
    ),
    "nested, arrays, enums": (
        {"type": "object",
         "properties": {
             "id": {"type": "integer"},
             "status": {"enum": ["active", "suspended", "deleted"]},
             "owner": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                       "required": ["name", "email"]},
             "items": {"type": "array", "items": {
                 "type": "object",
                 "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"},
                                "kind": {"enum": ["book", "food", "tool"]}},
                 "required": ["sku", "qty", "kind"]}},
         },
         "required": ["id", "status", "owner", "items"]},
        {"id": 1207, "status": "active", "owner": {"name": "Bo Li", "email": "bo@example.com"},
         "items": [{"sku": "A-17", "qty": 2, "kind": "book"}, {"sku": "Q-3", "qty": 10, "kind": "food"},
                   {"sku": "Z-99", "qty": 1, "kind": "tool"}]},
    ),
    "string pattern": (
        {"type": "object",
         "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                        "phone": {"type": "string", "pattern": "^\\+[0-9]{2} [0-9]{3} [0-9]{4,6}$"},
                        "note": {"type": "string", "maxLength": 40}},
         "required": ["code", "phone", "note"]},
        {"code": "XQZ-2024", "phone": "+41 044 123456", "note": "call after nine"},
    ),
}

RECURSIVE = {"$defs": {"node": {"type": "object", "properties": {
    "name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
    "required": ["name"]}}, "$ref": "#/$defs/node"}


def _median_p99(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), float(np.percentile(values, 99))


class Llguidance:
    name = "llguidance"

    def __init__(self, tok):
        import llguidance
        import llguidance.numpy

        self.ll, self.lln = llguidance, llguidance.numpy
        t = time.perf_counter()
        self.lltok = llguidance.LLTokenizer(tok.backend.to_str(), eos_token=list(tok.eos_token_ids))
        self.setup_s = time.perf_counter() - t
        self.version = llguidance.get_version() if hasattr(llguidance, "get_version") else "?"

    def compile(self, schema: dict):
        m = self.ll.LLMatcher(self.lltok, self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema)), log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def walk(self, matcher, tokens: list[int]) -> list[float]:
        bitmask = self.lln.allocate_token_bitmask(1, self.lltok.vocab_size)
        times = []
        for t in tokens:
            t0 = time.perf_counter()
            self.lln.fill_next_token_bitmask(matcher, bitmask)
            times.append(time.perf_counter() - t0)
            assert (int(bitmask[0, t // 32]) >> (t % 32)) & 1, "a token of the valid text is masked"
            if not matcher.consume_token(t):
                raise AssertionError(matcher.get_error())
        return times

    def recursion(self) -> str:
        try:
            self.compile(RECURSIVE)
            return "yes"
        except ValueError as e:
            return f"no ({e})"


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok):
        import importlib.metadata

        import outlines_core

        self.oc = outlines_core
        self.version = importlib.metadata.version("outlines-core")
        t = time.perf_counter()
        self.eos = eos = tok.eos_token_ids[0]
        vocab: dict[bytes, list[int]] = {}
        for i in range(tok.vocab_size):
            if i in tok.special_token_ids:  # outlines-core's map holds text tokens; EOS is given apart
                continue
            vocab.setdefault(tok.token_bytes(i), []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, vocab)
        self.n_words = (tok.vocab_size + 31) // 32
        self.setup_s = time.perf_counter() - t

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def walk(self, index, tokens: list[int]) -> list[float]:
        guide = self.oc.Guide(index)
        bitmask = np.zeros((1, self.n_words), dtype=np.int32)
        times = []
        for t in tokens:
            t0 = time.perf_counter()
            guide.write_mask_into(bitmask.ctypes.data, bitmask.size, 4)
            times.append(time.perf_counter() - t0)
            assert (int(bitmask[0, t // 32]) >> (t % 32)) & 1, "a token of the valid text is masked"
            if t != self.eos:  # the final EOS is only checked against the mask
                guide.advance(t, return_tokens=False)
        return times

    def recursion(self) -> str:
        try:
            self.compile(RECURSIVE)
            return "bounded depth (regex unrolled)"
        except Exception as e:  # noqa: BLE001  (whatever it raises is the answer)
            return f"no ({type(e).__name__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--markdown", help="append the tables to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from exo.inference.tokenizers import tokenizer_for_path
    from exo.models.sources import STORE

    tok = tokenizer_for_path(STORE.card(MODEL).path)
    libs = [Llguidance(tok), OutlinesCore(tok)]
    rows = []
    for name, (schema, example) in SCHEMAS.items():
        tokens = tok.encode(json.dumps(example, separators=(",", ":"))) + [tok.eos_token_ids[0]]
        for lib in libs:
            compile_s, mask_s = [], []
            for _ in range(args.runs):
                t = time.perf_counter()
                compiled = lib.compile(schema)
                compile_s.append(time.perf_counter() - t)
                mask_s += lib.walk(compiled, tokens)
            med, p99 = _median_p99(mask_s)
            rows.append([name, lib.name, str(len(tokens)), fmt(statistics.median(compile_s) * 1e3, 1),
                         fmt(med * 1e6, 0), fmt(p99 * 1e6, 0)])
            logger.info("%s / %s: compile %.1f ms, mask median %.0f us", name, lib.name,
                        statistics.median(compile_s) * 1e3, med * 1e6)
    machine = f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPUs"
    timing = Table(f"Grammar libraries on SmolLM2's vocabulary ({tok.vocab_size} tokens), {machine}, {args.runs} runs",
                   ["schema", "library", "tokens walked", "compile ms (median)", "mask us/token (median)",
                    "mask us/token (p99)"], rows)
    support = Table("What each library supports", ["library", "version", "tokenizer set-up s", "recursive schema",
                                                    "Lark grammars", "tool-call triggers"], [
        [libs[0].name, libs[0].version, fmt(libs[0].setup_s, 2), libs[0].recursion(),
         "yes (with embedded %json)", "yes (StructTag, lazy lexemes)"],
        [libs[1].name, libs[1].version, fmt(libs[1].setup_s, 2), libs[1].recursion(), "no (regex only)", "no"],
    ])
    for table in (timing, support):
        print(table.text() + "\n")  # noqa: T201  (a benchmark's output is its table)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + timing.markdown() + "\n\n" + support.markdown() + "\n")


if __name__ == "__main__":
    main()
