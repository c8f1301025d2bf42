"""One image request's parameters and the events its generation reports.

``ImageParams`` travels from the API to the node that holds the pipeline (over the ring when
that is another node: ``exo.networking.grpc.image_codec``); ``ImageJob`` is the request as the holder receives it; ``ImageEvent`` travels back: one
"progress" event per denoising step of each image, one "image" event per image (its PNG),
then "done", or an "error" that ends the request.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Bounds of a request (checked by the API, and again by ``ImageParams.check`` where it runs).
MAX_IMAGES = 10
MIN_SIDE, MAX_SIDE = 16, 2048  # pixels
MAX_STEPS = 150
MAX_GUIDANCE = 50.0
MAX_SEED = 2**63 - 1

#: Kinds of ``ImageEvent``.
EVENT_KINDS = ("progress", "image", "done", "error")
#: Error codes an "error" event carries (the API maps each to its HTTP status).
ERROR_CODES = ("model_not_found", "invalid_model", "model_not_available", "invalid_value", "generation_error",
               "cancelled")


@dataclass(frozen=True)
class ImageParams:
    """What to generate.

    Attributes:
        prompt: the text to draw (non-empty).
        n: images, 1..MAX_IMAGES; image ``k`` is drawn with seed ``seed + k``.
        width, height: pixels, multiples of 8 in [MIN_SIDE, MAX_SIDE].
        steps: denoising steps asked for (image-to-image runs ``int(steps * strength)`` of them).
        guidance_scale: classifier-free guidance (<= 1: none, one UNet pass per step).
        seed: the seed of the first image's noise (a CPU ``torch.Generator``): equal seeds and
            parameters give equal images, byte for byte, on one machine and device.
        negative_prompt: what not to draw ("" for none).
        init_image: PNG/JPEG/WebP bytes of the image to start from (image-to-image), or None.
        strength: image-to-image: how much of ``init_image`` is replaced, in (0, 1].
    """

    prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    negative_prompt: str = ""
    init_image: bytes | None = None
    strength: float = 0.8

    def check(self) -> None:
        """Raises ValueError naming the first parameter out of range."""
        if not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        if not 1 <= self.n <= MAX_IMAGES:
            raise ValueError(f"n must be in [1, {MAX_IMAGES}], got {self.n}")
        for name, side in (("width", self.width), ("height", self.height)):
            if not MIN_SIDE <= side <= MAX_SIDE or side % 8:
                raise ValueError(f"{name} must be a multiple of 8 in [{MIN_SIDE}, {MAX_SIDE}], got {side}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"num_inference_steps must be in [1, {MAX_STEPS}], got {self.steps}")
        if not 0.0 <= self.guidance_scale <= MAX_GUIDANCE:
            raise ValueError(f"guidance_scale must be in [0, {MAX_GUIDANCE}], got {self.guidance_scale}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}], got {self.seed}")
        if self.init_image is not None and not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")


@dataclass(frozen=True)
class ImageEvent:
    """One event of a request's generation.

    Attributes:
        request_id: the request.
        kind: "progress" (``step`` of ``total_steps`` of image ``index`` done, 1-based),
            "image" (``png`` of image ``index``), "done" (every image sent), "error".
        index: which image (0-based).
        step, total_steps: denoising steps done and to do for that image.
        png: the image's PNG bytes ("image" only).
        error: what went wrong ("error" only); ``code`` is one of ERROR_CODES.
        seed: the seed image ``index`` was drawn with ("image" only).
    """

    request_id: str
    kind: str
    index: int = 0
    step: int = 0
    total_steps: int = 0
    png: bytes = b""
    error: str = ""
    code: str = ""
    seed: int = 0


@dataclass(frozen=True)
class ImageJob:
    """An image request sent to the node holding the model.

    Attributes:
        request_id: the request (its events carry it).
        origin_node_id, origin_address: where the events go ("host:port" of its gRPC server).
        model_id: the image model's canonical id.
        params: what to draw.
    """

    request_id: str
    origin_node_id: str
    origin_address: str
    model_id: str
    params: ImageParams
