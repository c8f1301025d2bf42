"""Per-request generation options, resolved by the API and carried around the ring."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real

from exo.inference.pooling import POOLINGS

# Temperatures below this sample greedily: logits / T overflows float32 for T below ~1e-38 (and
# float64 below ~1e-300), and long before that the distribution is the argmax's alone. vLLM's
# sampler uses the same threshold (_SAMPLING_EPS).
GREEDY_BELOW = 1e-5
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a seed is a signed 64-bit integer (the wire's int64)
LOGIT_BIAS_MAX = 100.0  # OpenAI's bound on a logit_bias value (either sign)


@dataclass(frozen=True)
class GenerationOptions:
    """What a request asks of token generation.

    Attributes:
        max_tokens: most tokens to generate (>= 1).
        temperature: softmax temperature in [0, 2]; 0, and anything below GREEDY_BELOW, means
            greedy (argmax).
        top_p: nucleus sampling mass in (0, 1]; 1 disables it (Holtzman et al. 2019,
            "The Curious Case of Neural Text Degeneration").
        top_k: keep only the k most likely tokens; 0 disables it (and so does any k of
            2^31 or more, more than any vocabulary holds: it is stored as 0).
        seed: seed of the request's random generator, a signed 64-bit integer (a negative seed
            is a seed like any other); None draws from the OS.
        stop_token_ids: token ids that end generation (the model's EOS ids); the stop token
            itself is never shown to the client.
        presence_penalty, frequency_penalty: OpenAI-style penalties in [-2, 2] applied to the
            logits of tokens already generated.
        logprobs: whether to return the chosen token's log-probability.
        top_logprobs: how many alternatives' log-probabilities to return (0-20).
        grammar: an llguidance grammar (from ``exo.inference.grammar``: ``json_schema_grammar``,
            ``lark_grammar``) the output must follow, or None.
        logit_bias: (token id, bias) pairs, the bias added to that token's logit before sampling,
            each in [-100, 100] (OpenAI's ``logit_bias``); stored sorted by token id. A mapping
            (id -> bias) is accepted and stored the same way.
        pooling: None for a generation; for an embedding request, how the last shard pools the
            prompt's final-normed hidden states into one vector (``exo.inference.pooling.POOLINGS``:
            "mean", "last", "cls"): the request is that one prefill step, nothing is sampled.

    Raises:
        ValueError: naming the first option out of its range.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: str | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    pooling: str | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:  # NaN fails too
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_k >= 2**31:
            object.__setattr__(self, "top_k", 0)
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {v}")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be a signed 64-bit integer, in [{SEED_MIN}, {SEED_MAX}], got {self.seed}")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar):
            raise ValueError("grammar must be a non-empty llguidance grammar string or None")
        object.__setattr__(self, "logit_bias", _checked_logit_bias(self.logit_bias))
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)} (or None), got {self.pooling!r}")

    @property
    def is_embedding(self) -> bool:
        """Whether the request computes an embedding (``pooling`` set) instead of generating."""
        return self.pooling is not None

    @property
    def greedy(self) -> bool:
        """Whether tokens are chosen by argmax (temperature 0 or below GREEDY_BELOW)."""
        return self.temperature < GREEDY_BELOW


def _checked_logit_bias(bias) -> tuple[tuple[int, float], ...]:
    """``bias`` (pairs or a mapping of token id -> bias) as pairs sorted by token id.

    Raises:
        ValueError: naming logit_bias, for a negative or non-integer id, a repeated id, or a bias
            outside [-100, 100] (NaN included).
    """
    pairs = bias.items() if isinstance(bias, Mapping) else bias
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise ValueError(f"logit_bias must be (token id, bias) pairs or a mapping, got {type(bias).__name__}")
    out: dict[int, float] = {}
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"logit_bias must be (token id, bias) pairs, got {pair!r}")
        token, value = pair
        if isinstance(token, bool) or not isinstance(token, Integral) or not 0 <= token <= SEED_MAX:
            raise ValueError(f"logit_bias token ids must be integers >= 0 (64-bit), got {token!r}")
        if isinstance(value, bool) or not isinstance(value, Real) or not -LOGIT_BIAS_MAX <= value <= LOGIT_BIAS_MAX:
            raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {value!r} for token {token}")
        if int(token) in out:
            raise ValueError(f"logit_bias names token {token} twice")
        out[int(token)] = float(value)
    return tuple(sorted(out.items()))
