"""Token sampling from logits: greedy at temperature 0 (or below ``GREEDY_BELOW``), else temperature, top-k and top-p.

Pure functions over numpy arrays so every engine shares them. The order of one step: penalties,
logit bias, grammar mask, then greedy or temperature / top-k / top-p sampling. Nucleus (top-p)
sampling: Holtzman et al. 2019, arXiv:1904.09751. Presence and frequency penalties follow the
OpenAI API definition: ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``;
``logit_bias`` as OpenAI's: the bias is added to the token's logit. The grammar mask
(``exo.inference.grammar.GrammarMatcher``) sets the logits of the tokens a request's grammar
forbids to -inf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from exo.inference.generation import GenerationOptions

if TYPE_CHECKING:
    from exo.inference.grammar import GrammarMatcher


def apply_penalties(logits: np.ndarray, counts: dict[int, int], presence_penalty: float, frequency_penalty: float) -> np.ndarray:
    """``logits`` (vocab,) float32 with the penalties of the tokens in ``counts`` (id -> times generated)."""
    if not counts or (presence_penalty == 0.0 and frequency_penalty == 0.0):
        return logits
    ids = np.fromiter(counts.keys(), dtype=np.int64)
    n = np.fromiter(counts.values(), dtype=np.float32)
    out = logits.copy()
    out[ids] -= n * frequency_penalty + presence_penalty
    return out


def apply_logit_bias(logits: np.ndarray, token_ids: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """``logits`` (vocab,) float32 plus ``biases`` (n,) float32 at ``token_ids`` (n,) int64: a new array.

    Raises:
        ValueError: naming logit_bias, when a token id is not below the vocabulary size.
    """
    if token_ids.size and token_ids[-1] >= logits.shape[0]:  # sorted (GenerationOptions)
        raise ValueError(f"logit_bias names token {int(token_ids[-1])}, but the model has {logits.shape[0]} tokens")
    out = logits.copy()
    out[token_ids] += biases
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
    """The sampling state of one request: its random generator, the counts of tokens so far, and
    its grammar's state.

    Args:
        options: the request's options (``logit_bias`` is applied here; ``grammar`` is not read:
            the caller builds ``matcher`` from it, since that needs the model's tokenizer).
        matcher: the request's grammar, consulted for every token and told each token sampled.

    Log-probabilities (``logprobs``) are those of the distribution the token is drawn from before
    temperature, top-k and top-p: the penalized logits, plus the logit bias, with the tokens the
    grammar forbids at -inf (so they sum to 1 over the allowed tokens). An unconstrained request
    without bias gets those of the penalized logits, as before.
    """

    def __init__(self, options: GenerationOptions, matcher: GrammarMatcher | None = None):
        self.options = options
        self.matcher = matcher
        # numpy wants a seed >= 0: a negative one is read as its two's complement (mod 2^64)
        self.rng = np.random.default_rng(None if options.seed is None else options.seed % 2**64)
        self.counts: dict[int, int] = {}
        self._bias_ids = np.array([t for t, _ in options.logit_bias], dtype=np.int64)
        self._biases = np.array([b for _, b in options.logit_bias], dtype=np.float32)

    def sample(self, logits: np.ndarray) -> SampleResult:
        """Sample one token from ``logits`` (vocab,) float32, and advance the grammar past it.

        Raises:
            ValueError: ``logits`` is not a 1-D array; ``logit_bias`` names a token past the
                vocabulary; the grammar allows no token here (or the matcher failed).
        """
        if logits.ndim != 1:
            raise ValueError(f"logits must have shape (vocab,), got {logits.shape}")
        o = self.options
        logits = apply_penalties(logits.astype(np.float32, copy=False), self.counts, o.presence_penalty, o.frequency_penalty)
        if self._bias_ids.size:
            logits = apply_logit_bias(logits, self._bias_ids, self._biases)
        if self.matcher is not None:
            logits = self.matcher.apply_mask(logits)
            if not (logits > -np.inf).any():  # sampling would divide 0 by 0
                raise ValueError("the grammar allows no token here (none of the model's tokens can continue it)")
        if o.greedy:
            token = int(np.argmax(logits))
        else:
            scaled = filter_top_p(filter_top_k(logits / o.temperature, o.top_k), o.top_p)
            probs = np.exp(log_softmax(scaled))
            token = int(self.rng.choice(probs.shape[0], p=probs / probs.sum()))
        if self.matcher is not None:
            self.matcher.consume(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        result = SampleResult(token)
        if o.logprobs:
            lp = log_softmax(logits)
            result.logprob = float(lp[token])
            if o.top_logprobs:
                top = np.argpartition(-lp, o.top_logprobs)[: o.top_logprobs]
                top = top[np.argsort(-lp[top])]
                top = top[lp[top] > -np.inf]  # not the tokens the grammar forbids
                result.top_logprobs = [(int(i), float(lp[i])) for i in top]
        return result
