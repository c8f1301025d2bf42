"""What a diffusers pipeline directory holds, read from its JSON files only (no torch).

A directory is a pipeline exo can run when ``model_index.json`` names a Stable Diffusion
pipeline class (``SUPPORTED``) and each component it needs is a folder beside it: ``unet/``,
``vae/``, ``text_encoder/`` (SDXL: and ``text_encoder_2/``) with a ``config.json`` and a
weights file (safetensors or a torch ``.bin``), ``tokenizer/`` (and ``tokenizer_2/``) and
``scheduler/`` with ``scheduler_config.json``. Weights stored only as the ``fp16`` variant
(``diffusion_pytorch_model.fp16.safetensors``) load with ``variant="fp16"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

#: model_index.json ``_class_name`` -> exo's architecture name.
SUPPORTED = {
    "StableDiffusionPipeline": "stable-diffusion",
    "StableDiffusionImg2ImgPipeline": "stable-diffusion",
    "StableDiffusionXLPipeline": "stable-diffusion-xl",
    "StableDiffusionXLImg2ImgPipeline": "stable-diffusion-xl",
}
#: Components with weights, per architecture, in the order a generation runs them.
WEIGHTED = {
    "stable-diffusion": ("text_encoder", "unet", "vae"),
    "stable-diffusion-xl": ("text_encoder", "text_encoder_2", "unet", "vae"),
}
TOKENIZERS = {"stable-diffusion": ("tokenizer",), "stable-diffusion-xl": ("tokenizer", "tokenizer_2")}
WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
#: Tokens a CLIP text encoder reads of a prompt (longer prompts are cut by the tokenizer).
CLIP_CONTEXT = 77


class PipelineError(ValueError):
    """A directory that is not a pipeline exo can run (the message names the file at fault)."""


@dataclass(frozen=True)
class PipelineInfo:
    """A pipeline directory's facts.

    Attributes:
        path: the directory.
        class_name: model_index.json's ``_class_name``.
        architecture: "stable-diffusion" or "stable-diffusion-xl".
        component_bytes: bytes of each weighted component's weights file, in run order.
        default_size: pixels of the side of the images it was trained for (the UNet's
            ``sample_size`` x the VAE's scale factor).
        vae_scale: pixels per latent (2 ** (VAE blocks - 1)); image sides must be multiples of it.
        variant: "fp16" when the weights exist only as that variant, else None.
        components: every component model_index.json names (null ones excluded).
    """

    path: Path
    class_name: str
    architecture: str
    component_bytes: dict[str, int]
    default_size: int
    vae_scale: int
    variant: str | None
    components: tuple[str, ...]

    @property
    def size(self) -> int:
        """Bytes of all the weights."""
        return sum(self.component_bytes.values())


def is_pipeline_dir(path: Path) -> bool:
    """Whether ``path`` is a directory with a ``model_index.json`` (a diffusers pipeline, valid or not)."""
    try:
        return path.is_dir() and (path / "model_index.json").is_file()
    except OSError:
        return False


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PipelineError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise PipelineError(f"{path} is not a JSON object")
    return value


def _weights(folder: Path) -> tuple[Path, str | None]:
    """The weights file of a component folder and its variant (None or "fp16")."""
    for variant in (None, "fp16"):
        for stem in WEIGHT_NAMES:
            for suffix in WEIGHT_SUFFIXES:
                p = folder / (f"{stem}.{variant}{suffix}" if variant else f"{stem}{suffix}")
                if p.is_file():
                    return p, variant
    raise PipelineError(f"{folder} holds no weights file ({WEIGHT_NAMES[0]}.safetensors or model.safetensors)")


def read_pipeline(path: Path) -> PipelineInfo:
    """The facts of the pipeline directory ``path``.

    Raises:
        PipelineError: no model_index.json or one that is no JSON object; a pipeline class exo
            does not run; a component folder, its config or its weights missing; a config
            that is no JSON object (the message names the file).
    """
    path = Path(path)
    index = _json(path / "model_index.json")
    class_name = index.get("_class_name")
    architecture = SUPPORTED.get(class_name) if isinstance(class_name, str) else None
    if architecture is None:
        raise PipelineError(f"{path / 'model_index.json'}: pipeline class {class_name!r} is not one exo runs "
                            f"({', '.join(sorted(SUPPORTED))})")
    components = tuple(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)
                       and len(v) == 2 and v[0] is not None)
    sizes: dict[str, int] = {}
    variants = set()
    for name in WEIGHTED[architecture]:
        folder = path / name
        _json(folder / "config.json")
        weights, variant = _weights(folder)
        sizes[name] = weights.stat().st_size
        variants.add(variant)
    for name in TOKENIZERS[architecture]:
        if not (path / name).is_dir() or not any((path / name).iterdir()):
            raise PipelineError(f"{path / name} is missing or empty (the tokenizer's files)")
    _json(path / "scheduler" / "scheduler_config.json")
    unet, vae = _json(path / "unet" / "config.json"), _json(path / "vae" / "config.json")
    blocks = vae.get("block_out_channels") or [0, 0, 0, 0]
    scale = 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else 8
    sample = unet.get("sample_size")
    sample = sample[0] if isinstance(sample, list) and sample else sample
    default = int(sample) * scale if isinstance(sample, int) and sample > 0 else 512
    variant = "fp16" if variants == {"fp16"} else None
    return PipelineInfo(path, class_name, architecture, sizes, default, scale, variant, components)
