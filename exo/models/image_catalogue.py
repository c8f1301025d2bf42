"""The image models of the catalogue: Stable Diffusion pipelines by a short id.

The entries are the ``[[image]]`` tables of ``catalogue.toml`` (beside this module; its comments
say where the facts come from). Each names a diffusers repository on the Hugging Face hub
(``model_index.json`` and component folders), fetched by ``exo.models.hub`` like any hub model.
Nothing here touches the network.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from importlib import resources

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class ImageEntry:
    """An image model users can ask for.

    Attributes:
        id: short id ("sd-1.5", "sdxl-turbo").
        name: human-readable name.
        architecture: "stable-diffusion" or "stable-diffusion-xl" (``exo.inference.diffusion``).
        hf_repo: the diffusers repository.
        params: parameters of all its components together (a count).
        hf_size: bytes of its fp16 weights (estimated).
        default_size: pixels of the side of the images it was trained for.
        default_steps: denoising steps when a request gives none.
        default_guidance: guidance scale when a request gives none (0: none, the Turbo models).
    """

    id: str
    name: str
    architecture: str
    hf_repo: str
    params: int
    hf_size: int
    default_size: int
    default_steps: int
    default_guidance: float


def _load() -> dict[str, ImageEntry]:
    """The ``[[image]]`` entries of ``catalogue.toml``, by id.

    Raises:
        ValueError: an entry with an unknown or a missing field.
    """
    data = tomllib.loads(resources.files(__package__).joinpath("catalogue.toml").read_text(encoding="utf-8"))
    names = {f.name for f in fields(ImageEntry)}
    out = {}
    for i, table in enumerate(data.get("image", [])):
        if set(table) != names:
            raise ValueError(f"catalogue.toml: image {table.get('id', i)!r}: unknown fields {sorted(set(table) - names)}, "
                             f"missing fields {sorted(names - set(table))}")
        out[table["id"]] = ImageEntry(**{**table, "default_guidance": float(table["default_guidance"])})
    return out


#: Every image entry, by id, in catalogue order.
IMAGE_CATALOGUE: dict[str, ImageEntry] = _load()


def resolve_image_alias(name: str) -> str | None:
    """The image catalogue id ``name`` stands for (the id itself or its repository, any case;
    a ":latest" tag dropped), or None."""
    key = name.strip().lower()
    if key.endswith(":latest"):
        key = key[: -len(":latest")]
    if key in IMAGE_CATALOGUE:
        return key
    for entry in IMAGE_CATALOGUE.values():
        if key == entry.hf_repo.lower():
            return entry.id
    return None
