"""Errors the Node raises to its callers (the API translates each to a status code)."""

from __future__ import annotations


class ModelNotFoundError(KeyError):
    """The requested model is no catalogue id, no existing path and no hub repo."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "model not found"


class InvalidModelError(ValueError):
    """The named file or repo is not a model exo can run (not a model, a truncated file, an
    unsupported architecture or tensor type); the message names the model and what is wrong."""


class ModelUnavailableError(ConnectionError):
    """The model's weights are not on this machine and cannot be fetched now (offline with
    nothing cached, the hub unreachable, a gated repo without a token); the message says why."""


class NoNodeAvailableError(RuntimeError):
    """No ring of live nodes can serve the model (weights missing, no node can hold a layer)."""


class GenerationError(RuntimeError):
    """A node of the ring failed while generating; the message names the node and the error."""


class GenerationTimeoutError(GenerationError):
    """No token arrived from the ring within the response timeout."""


class NodeStoppingError(ConnectionError):
    """This node is shutting down: it takes no new ring work and opens no new connections (a
    peer that sent it a message gets gRPC ``UNAVAILABLE``, as from a node that is gone)."""
