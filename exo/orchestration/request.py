"""What travels around the ring with every message of one request."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from exo.inference.generation import GenerationOptions
from exo.inference.shard import Shard
from exo.topology.partitioning import Partition


@dataclass(frozen=True)
class RequestContext:
    """The plan of one request, fixed by the node that received it from a client (the origin).

    Every node follows the origin's ``ring`` rather than recomputing it, so nodes whose view of
    the topology briefly differs still agree. A re-partition (a node left) makes a new context
    with a higher ``epoch``; messages of an older epoch are dropped.

    Attributes:
        request_id: unique id of the request.
        origin_node_id: node that streams results to the client.
        model_id: registry id of the model.
        n_layers: the model's total number of transformer layers.
        ring: partitions in ring order; the first holds layer 0, the last the output head.
        options: generation options.
        prompt_len: tokens of the prompt; the last shard counts generated tokens from it.
        epoch: incremented at each re-partition of this request.
        generated_tokens: on the replay prefill of a re-partition only, the tokens generated
            before it (the prefill's input is the prompt followed by them); the last shard
            rebuilds the sampler's state (penalty counts, random generator) from them. Empty on
            every other message, so decode steps stay small.
        prefix_entry, prefix_tokens: on the messages of a prefill that continues from the
            prompt cache (``exo.inference.prompt_cache``): the entry, chosen by the first node,
            whose first ``prefix_tokens`` keys and values every node copies; the prefill starts
            at that position. Empty and 0 otherwise.
        prompt_cache: False on the replay after a node missed a prompt cache entry: the first
            node prefills everything.
    """

    request_id: str
    origin_node_id: str
    model_id: str
    n_layers: int
    ring: tuple[Partition, ...]
    options: GenerationOptions
    prompt_len: int = 0
    epoch: int = 0
    generated_tokens: tuple[int, ...] = ()
    prefix_entry: str = ""
    prefix_tokens: int = 0
    prompt_cache: bool = True

    @property
    def prefill_end(self) -> int:
        """Tokens in the KV cache once this epoch's prefill is done: the prompt, and on a
        replay the tokens generated before it. The last shard samples only after that."""
        return self.prompt_len + len(self.generated_tokens)

    def partition_of(self, node_id: str) -> Partition:
        """The partition of ``node_id``. Raises KeyError if the node is not in the ring."""
        for p in self.ring:
            if p.node_id == node_id:
                return p
        raise KeyError(f"node {node_id!r} is not in the ring of request {self.request_id}")

    def shard_of(self, node_id: str) -> Shard:
        p = self.partition_of(node_id)
        return Shard(self.model_id, p.start_layer, p.end_layer, self.n_layers)

    def next_partition(self, node_id: str) -> Partition:
        """The partition after ``node_id``'s in the ring (wrapping to the first)."""
        for i, p in enumerate(self.ring):
            if p.node_id == node_id:
                return self.ring[(i + 1) % len(self.ring)]
        raise KeyError(f"node {node_id!r} is not in the ring of request {self.request_id}")



@dataclass
class TokenResult:
    """One or more tokens (or an error) for the origin node of a request.

    Attributes:
        request_id: the request.
        tokens: newly generated token ids (may be empty with an error or a finish).
        finish_reason: None while generating; "stop" (EOS), "length" (max_tokens) or "error".
        error: message of an error on any node; set together with finish_reason "error".
        logprobs: log-probability of each token in ``tokens`` (natural log), when asked for.
        top_logprobs: for each token, the alternatives' (token id, log-probability) pairs.
        epoch: the epoch of the request context the result was computed in; the origin drops
            results of an epoch other than its current one (sent before a re-partition).
        embedding: of an embedding request (``GenerationOptions.pooling``), its only result:
            the pooled final-normed hidden states, float32 ``(hidden,)``, not normalized; with
            finish_reason "stop" and no tokens. None otherwise.
        cached_tokens: on the first result of an epoch: how many prompt tokens came from the
            prompt cache instead of being prefilled.
    """

    request_id: str
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    epoch: int = 0
    embedding: np.ndarray | None = field(default=None, compare=False)  # an array has no truth value for ==
    cached_tokens: int = 0

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None
