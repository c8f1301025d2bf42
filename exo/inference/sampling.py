"""Token sampling from logits: greedy at temperature 0 (or below ``GREEDY_BELOW``), else temperature, top-k and top-p.

Pure functions over numpy arrays so every engine shares them. Nucleus (top-p) sampling:
Holtzman et al. 2019, arXiv:1904.09751. Presence and frequency penalties follow the OpenAI API
definition: ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from exo.inference.generation import GenerationOptions


def apply_penalties(logits: np.ndarray, counts: dict[int, int], presence_penalty: float, frequency_penalty: float) -> np.ndarray:
    """``logits`` (vocab,) float32 with the penalties of the tokens in ``counts`` (id -> times generated)."""
    if not counts or (presence_penalty == 0.0 and frequency_penalty == 0.0):
        return logits
    ids = np.fromiter(counts.keys(), dtype=np.int64)
    n = np.fromiter(counts.values(), dtype=np.float32)
    out = logits.copy()
    out[ids] -= n * frequency_penalty + presence_penalty
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Natural-log probabilities of ``logits`` (vocab,), computed in float64 for stability."""
    x = logits.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def filter_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` largest logits, set the rest to -inf (k <= 0 or k >= vocab: no-op)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def filter_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability sums to >= ``p``."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits)
    probs = np.exp(log_softmax(logits[order]))
    cum = np.cumsum(probs)
    keep = int(np.searchsorted(cum, p) + 1)  # tokens up to and including the one crossing p
    out = np.full_like(logits, -np.inf)
    out[order[:keep]] = logits[order[:keep]]
    return out


@dataclass
class SampleResult:
    """A sampled token with, when asked for, its log-probability and the top alternatives."""

    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


class Sampler:
    """The sampling state of one request: its random generator and the counts of tokens so far.

    Raises:
        ValueError: ``logits`` is not a 1-D array.
    """

    def __init__(self, options: GenerationOptions):
        self.options = options
        # numpy wants a seed >= 0: a negative one is read as its two's complement (mod 2^64)
        self.rng = np.random.default_rng(None if options.seed is None else options.seed % 2**64)
        self.counts: dict[int, int] = {}

    def sample(self, logits: np.ndarray) -> SampleResult:
        """Sample one token from ``logits`` (vocab,) float32."""
        if logits.ndim != 1:
            raise ValueError(f"logits must have shape (vocab,), got {logits.shape}")
        o = self.options
        logits = apply_penalties(logits.astype(np.float32, copy=False), self.counts, o.presence_penalty, o.frequency_penalty)
        if o.greedy:
            token = int(np.argmax(logits))
        else:
            scaled = filter_top_p(filter_top_k(logits / o.temperature, o.top_k), o.top_p)
            probs = np.exp(log_softmax(scaled))
            token = int(self.rng.choice(probs.shape[0], p=probs / probs.sum()))
        self.counts[token] = self.counts.get(token, 0) + 1
        result = SampleResult(token)
        if o.logprobs:
            lp = log_softmax(logits)
            result.logprob = float(lp[token])
            if o.top_logprobs:
                top = np.argpartition(-lp, o.top_logprobs)[: o.top_logprobs]
                top = top[np.argsort(-lp[top])]
                result.top_logprobs = [(int(i), float(lp[i])) for i in top]
        return result
