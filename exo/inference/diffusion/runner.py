"""``DiffusionRunner``: a diffusers pipeline loaded on the torch device, generating PNGs.

The pipeline is ``diffusers``' own (``AutoPipelineForText2Image``; image-to-image shares its
components through ``AutoPipelineForImage2Image.from_pipe``): exo does not re-implement the
UNet. On CUDA the weights are float16, on the CPU float32. Noise comes from a CPU
``torch.Generator`` seeded with the request's seed, so equal seeds give equal bytes.
Everything here blocks: the node calls ``generate`` from one worker thread, one request at a time.
"""

from __future__ import annotations

import io
import logging
from typing import Callable

from exo.inference.diffusion.params import ImageParams
from exo.inference.diffusion.pipeline_dir import PipelineInfo

logger = logging.getLogger(__name__)


class Cancelled(Exception):
    """The request was ended while its images were being drawn."""


def default_device() -> str:
    """The torch engine's device rule: "cuda" where torch sees a GPU, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def decode_image(data: bytes, width: int, height: int):
    """``data`` (PNG, JPEG, WebP, ...) as an RGB ``PIL.Image`` of ``width`` x ``height`` pixels.

    Raises:
        ValueError: not an image Pillow can read.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"image is not a picture Pillow can read: {e}") from None
    return rgb if rgb.size == (width, height) else rgb.resize((width, height))


def png_bytes(image) -> bytes:
    """A ``PIL.Image`` as PNG bytes (deterministic: equal pixels, equal bytes)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class DiffusionRunner:
    """Holds one pipeline at a time and draws images with it.

    Args:
        device: torch device ("cuda", "cpu", ...); None: ``default_device()``.
        threads: torch intra-op threads while drawing on the CPU (None: torch's setting).
            torch's thread count is per process: it is set before each request.
    """

    def __init__(self, device: str | None = None, threads: int | None = None):
        self.device = device or default_device()
        self.threads = threads
        self._path: str | None = None
        self._text2img = None
        self._img2img = None

    @property
    def loaded(self) -> str | None:
        """The directory of the pipeline held, or None."""
        return self._path

    def load(self, info: PipelineInfo) -> None:
        """Hold ``info``'s pipeline (nothing to do when it is the one held).

        Raises:
            ValueError: diffusers cannot load it (a corrupt weights file, a config it rejects).
        """
        if self._path == str(info.path):
            return
        import torch
        from diffusers import AutoPipelineForText2Image

        self.unload()
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        kwargs = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in info.components else {}
        try:
            pipe = AutoPipelineForText2Image.from_pretrained(str(info.path), dtype=dtype, variant=info.variant,
                                                             local_files_only=True, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError, EnvironmentError) as e:
            raise ValueError(f"diffusers cannot load the pipeline at {info.path}: {type(e).__name__}: {e}") from None
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self._text2img, self._img2img, self._path = pipe, None, str(info.path)
        logger.info("loaded image pipeline %s (%s) on %s, %s", info.path, info.class_name, self.device, dtype)

    def unload(self) -> None:
        """Drop the pipeline held (its memory is freed once nothing else refers to it)."""
        self._text2img = self._img2img = self._path = None

    def _img2img_pipe(self):
        if self._img2img is None:
            from diffusers import AutoPipelineForImage2Image

            self._img2img = AutoPipelineForImage2Image.from_pipe(self._text2img)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    def generate(self, info: PipelineInfo, params: ImageParams, on_step: Callable[[int, int, int], None],
                 on_image: Callable[[int, bytes, int], None], cancelled: Callable[[], bool] = lambda: False) -> None:
        """Draw ``params.n`` images with ``info``'s pipeline (loading it first if needed).

        Calls ``on_step(index, step, total_steps)`` after each denoising step (step 1-based) and
        ``on_image(index, png, seed)`` for each image as it is done, on this thread.

        Raises:
            ValueError: a parameter out of range, an ``init_image`` that is no picture, a
                size the pipeline cannot draw, a pipeline diffusers cannot load.
            Cancelled: ``cancelled()`` became true between two steps.
        """
        import torch

        params.check()
        if params.width % info.vae_scale or params.height % info.vae_scale:
            raise ValueError(f"size must be a multiple of {info.vae_scale} pixels for this model, got "
                             f"{params.width}x{params.height}")
        init = decode_image(params.init_image, params.width, params.height) if params.init_image is not None else None
        self.load(info)
        if self.threads and self.device == "cpu":
            torch.set_num_threads(self.threads)
        pipe = self._img2img_pipe() if init is not None else self._text2img
        for index in range(params.n):
            seed = params.seed + index

            def step_end(p, i, t, kwargs, index=index):
                on_step(index, i + 1, p.num_timesteps)
                if cancelled():
                    raise Cancelled()
                return kwargs

            kwargs = dict(prompt=params.prompt, negative_prompt=params.negative_prompt or None,
                          num_inference_steps=params.steps, guidance_scale=params.guidance_scale,
                          generator=torch.Generator("cpu").manual_seed(seed), output_type="pil",
                          callback_on_step_end=step_end)
            if init is not None:
                kwargs.update(image=init, strength=params.strength)
            else:
                kwargs.update(width=params.width, height=params.height)
            with torch.inference_mode():
                image = pipe(**kwargs).images[0]
            on_image(index, png_bytes(image), seed)
