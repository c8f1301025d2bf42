"""The image endpoints' request bodies, validated, and their parameters resolved.

``POST /v1/images/generations`` takes JSON (``ImageRequest``); ``POST /v1/images/edits`` takes
OpenAI's ``multipart/form-data`` (``form_fields`` turns its text fields into the same body, its
``image`` file into bytes) or the same JSON with ``image`` as base64 or a ``data:`` URL.
``to_params`` resolves what a request leaves out from the model (its catalogue entry, else
its pipeline's own size and Stable Diffusion's usual 25 steps at guidance 7.5) and draws a
seed when none is given.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from exo.api.chat_api.parsing import STRICT, parse_request
from exo.api.chat_api.utils import APIError
from exo.inference.diffusion.params import (
    MAX_GUIDANCE, MAX_IMAGES, MAX_SEED, MAX_SIDE, MAX_STEPS, MIN_SIDE, ImageParams,
)
from exo.models.image_catalogue import IMAGE_CATALOGUE

RESPONSE_FORMATS = ("b64_json", "url")
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_STRENGTH = 25, 7.5, 0.8
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_LOOSE = ConfigDict(strict=False)  # a float parameter given as a JSON integer


class ImageRequest(BaseModel):
    """A generation's or an edit's body (OpenAI's fields, then exo's extensions). ``quality``,
    ``style`` and ``user`` are accepted and ignored; ``mask``, ``background`` and any output
    format but PNG are refused."""

    model_config = STRICT
    prompt: str
    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    size: str | None = None
    response_format: str | None = None
    output_format: str | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    stream: bool = False
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=MAX_GUIDANCE, strict=False)
    negative_prompt: str | None = None
    image: str | None = None  # edits sent as JSON: base64 or a data: URL
    strength: float | None = Field(default=None, gt=0.0, le=1.0, strict=False)
    mask: Any = None


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"Invalid value for '{param}': {message}", param=param, code=code)


def parse_size(size: str | None, default: int) -> tuple[int, int]:
    """``"WxH"`` (or None / "auto": ``default`` square) as (width, height) in pixels.

    Raises:
        APIError: 400 naming ``size``: not ``WxH``, or a side that is no multiple of 8 in
            [MIN_SIDE, MAX_SIDE].
    """
    if size is None or size == "auto":
        return default, default
    m = _SIZE.match(size)
    if m is None:
        raise _bad("size", f"must be 'auto' or WIDTHxHEIGHT in pixels such as '512x512', got {size!r}")
    w, h = int(m[1]), int(m[2])
    for side in (w, h):
        if not MIN_SIDE <= side <= MAX_SIDE or side % 8:
            raise _bad("size", f"each side must be a multiple of 8 from {MIN_SIDE} to {MAX_SIDE} pixels, got {size!r}")
    return w, h


def decode_image_field(value: str) -> bytes:
    """A JSON ``image``: base64, or a ``data:image/...;base64,`` URL.

    Raises:
        APIError: 400 naming ``image`` for anything else.
    """
    data = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("image", "must be a file upload, base64 or a data: URL of a picture") from None
    if not raw:
        raise _bad("image", "is empty")
    return raw


def parse_image_request(body: Any, edit: bool) -> ImageRequest:
    """``body`` validated (400 naming the parameter, as ``parse_request``), with the checks
    across fields: a non-empty ``prompt``, a known ``response_format``, PNG only, no ``mask``,
    and ``image`` / ``strength`` only on edits."""
    req = parse_request(ImageRequest, body)
    if not req.prompt.strip():
        raise _bad("prompt", "must not be empty")
    if req.response_format is not None and req.response_format not in RESPONSE_FORMATS:
        raise _bad("response_format", f"must be one of {list(RESPONSE_FORMATS)}, got {req.response_format!r}")
    if req.output_format not in (None, "png"):
        raise _bad("output_format", f"exo draws PNG only, got {req.output_format!r}", "unsupported_parameter")
    if req.mask is not None:
        raise _bad("mask", "inpainting with a mask is not supported (image-to-image of the whole picture is)",
                   "unsupported_parameter")
    if not edit:
        for name in ("image", "strength"):
            if getattr(req, name) is not None:
                raise APIError(400, f"Unrecognized request argument supplied: {name} (it belongs to /v1/images/edits)",
                               param=name, code="unknown_parameter")
    return req


_INT_FIELDS = {"n", "seed", "num_inference_steps"}
_FLOAT_FIELDS = {"guidance_scale", "strength"}
_BOOL_FIELDS = {"stream"}


def form_fields(fields: dict[str, str]) -> dict[str, Any]:
    """Multipart text fields as a JSON body: numbers and booleans converted.

    Raises:
        APIError: 400 naming a field whose text is not its type.
    """
    out: dict[str, Any] = {}
    for name, text in fields.items():
        try:
            if name in _INT_FIELDS:
                out[name] = int(text)
            elif name in _FLOAT_FIELDS:
                out[name] = float(text)
            elif name in _BOOL_FIELDS:
                if text.lower() not in ("true", "false"):
                    raise ValueError(text)
                out[name] = text.lower() == "true"
            else:
                out[name] = text
        except ValueError:
            raise _bad(name, f"{text!r} is not a valid value", "invalid_type") from None
    return out


def to_params(req: ImageRequest, model_id: str, pipeline_size: int | None, init_image: bytes | None) -> ImageParams:
    """The parameters of ``req`` for image model ``model_id``: what the request leaves out from
    the model's catalogue entry, else from its pipeline (``pipeline_size``: its trained image
    side, when read) and Stable Diffusion's usual defaults; a random seed when none is given.

    Raises:
        APIError: 400 naming ``size``.
    """
    entry = IMAGE_CATALOGUE.get(model_id)
    default_size = pipeline_size or (entry.default_size if entry else 512)
    width, height = parse_size(req.size, default_size)
    steps = req.num_inference_steps or (entry.default_steps if entry else DEFAULT_STEPS)
    guidance = req.guidance_scale if req.guidance_scale is not None else (
        entry.default_guidance if entry else DEFAULT_GUIDANCE)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    return ImageParams(prompt=req.prompt, n=req.n, width=width, height=height, steps=steps, guidance_scale=guidance,
                       seed=seed, negative_prompt=req.negative_prompt or "", init_image=init_image,
                       strength=req.strength if req.strength is not None else DEFAULT_STRENGTH)
