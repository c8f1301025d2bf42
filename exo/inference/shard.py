"""The Shard: which contiguous layers of a model one node runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """An inclusive range of transformer layers of one model.

    ``start_layer`` and ``end_layer`` are 0-based and inclusive; ``n_layers`` is the model's
    total number of transformer layers. The first shard (``start_layer == 0``) also holds the
    token embedding; the last shard (``end_layer == n_layers - 1``) also holds the final norm
    and the output head.

    Raises:
        ValueError: if the range is empty or outside ``[0, n_layers)``.
    """

    model_id: str
    start_layer: int
    end_layer: int
    n_layers: int

    def __post_init__(self) -> None:
        if self.n_layers <= 0:
            raise ValueError(f"n_layers must be positive, got {self.n_layers}")
        if not 0 <= self.start_layer <= self.end_layer < self.n_layers:
            raise ValueError(
                f"invalid layer range [{self.start_layer}, {self.end_layer}] for a model of {self.n_layers} layers"
            )

    @classmethod
    def full(cls, model_id: str, n_layers: int) -> "Shard":
        """The shard holding every layer of the model."""
        return cls(model_id, 0, n_layers - 1, n_layers)

    @property
    def is_first_layer(self) -> bool:
        return self.start_layer == 0

    @property
    def is_last_layer(self) -> bool:
        return self.end_layer == self.n_layers - 1

    @property
    def n_shard_layers(self) -> int:
        """Number of layers this shard runs."""
        return self.end_layer - self.start_layer + 1

    def to_dict(self) -> dict:
        return {"model_id": self.model_id, "start_layer": self.start_layer, "end_layer": self.end_layer, "n_layers": self.n_layers}
