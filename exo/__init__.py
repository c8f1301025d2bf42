"""exo: a peer-to-peer inference cluster that splits a model's layers across a ring of nodes."""

__version__ = "0.1.0"
