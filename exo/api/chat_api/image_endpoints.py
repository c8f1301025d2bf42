"""Image generation: OpenAI's ``POST /v1/images/generations`` and ``POST /v1/images/edits``,
drawn by Stable Diffusion models on the cluster (``Node.generate_image``).

Request (``image_protocol``): ``model`` (an image model: catalogue id, pipeline directory or hub
repo), ``prompt``, ``n`` (1-10), ``size`` ("WxH", multiples of 8 from 16 to 2048, or "auto": the
model's own), ``response_format`` ("url", the default as in OpenAI's API, or "b64_json"),
``stream``; exo's extensions ``seed`` (equal seeds, equal bytes; image ``k`` uses ``seed + k``),
``num_inference_steps``, ``guidance_scale``, ``negative_prompt``. Edits (image-to-image) add
``image`` (a multipart file as OpenAI's clients send it, or base64 / a data URL in JSON) and
``strength`` (0-1, default 0.8).

Response: ``{"created", "data": [{"url" | "b64_json", "revised_prompt": null, "seed"}], "size",
"output_format": "png"}``. A ``url`` is ``/images/{id}.png`` on the answering node, served for an
hour (``image_store``). With ``"stream": true`` the answer is Server-Sent Events: one
``image_generation.progress`` (edits: ``image_edit.progress``) event per denoising step,
``{"type", "index", "step", "total_steps"}``, and one ``image_generation.completed``
(``image_edit.completed``) per image, ``{"type", "index", "b64_json" | "url", "seed", "size",
"output_format", "created_at"}``; a failure after the stream began is an ``error`` event.

Errors (OpenAI's format): 400 naming the parameter (a text model named here, a bad size, ``n``
out of range, an empty prompt, a picture Pillow cannot read, a pipeline directory that is not
one), 404 an unknown model, 503 no node can hold the model, 500/504 a failing or silent holder.
The text endpoints refuse image models in their own dialect (``serving.pipeline.prepare``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from typing import Any

from aiohttp import web

from exo.api.chat_api.image_protocol import (
    ImageRequest, decode_image_field, form_fields, parse_image_request, to_params,
)
from exo.api.chat_api.image_store import ImageStore
from exo.api.chat_api.json_body import read_json
from exo.api.chat_api.state import STATE_KEY
from exo.api.chat_api.utils import APIError, new_id, unix_time
from exo.api.serving.resolve import api_error_from, resolve_model
from exo.models.sources import ModelCard
from exo.orchestration.errors import InvalidModelError

logger = logging.getLogger(__name__)

IMAGE_STORE_KEY: web.AppKey[ImageStore] = web.AppKey("exo_image_store", ImageStore)
#: Parameters a holder's ValueError may start with, and the request parameter each is.
_PARAMS = {"size": "size", "width": "size", "height": "size", "image": "image", "strength": "strength",
           "n": "n", "prompt": "prompt", "num_inference_steps": "num_inference_steps", "seed": "seed",
           "guidance_scale": "guidance_scale"}


def _image_error(e: BaseException) -> APIError:
    """The client-facing error of a failed image request."""
    if isinstance(e, InvalidModelError):
        return APIError(400, f"The model cannot draw images: {e}", param="model", code="invalid_model")
    if isinstance(e, ValueError) and not isinstance(e, APIError):
        param = _PARAMS.get(str(e).split(" ", 1)[0])
        return APIError(400, f"Invalid value for '{param}': {e}" if param else str(e), param=param, code="invalid_value")
    return api_error_from(e)


async def _read_request(request: web.Request, edit: bool) -> tuple[ImageRequest, bytes | None]:
    """The body (multipart for an edit as OpenAI sends it, else JSON) and the edit's picture.

    Raises:
        APIError: 400 naming the parameter (see ``image_protocol``); an edit without ``image``.
    """
    image: bytes | None = None
    if edit and request.content_type == "multipart/form-data":
        fields: dict[str, str] = {}
        for name, value in (await request.post()).items():
            if isinstance(value, web.FileField):
                if name not in ("image", "image[]", "mask"):
                    raise APIError(400, f"Unrecognized file field: {name}", param=name, code="unknown_parameter")
                if name == "mask":
                    fields["mask"] = "file"
                elif image is not None:
                    raise APIError(400, "Invalid value for 'image': exo edits one picture at a time", param="image",
                                   code="invalid_value")
                else:
                    image = value.file.read()
            else:
                fields[name] = value
        req = parse_image_request(form_fields(fields), edit=True)
    else:
        req = parse_image_request(await read_json(request), edit)
        image = decode_image_field(req.image) if req.image is not None else None
    if edit and not image:
        raise APIError(400, "Missing required parameter: 'image'", param="image", code="missing_required_parameter")
    return req, image


async def _image_card(request: web.Request, req: ImageRequest) -> ModelCard:
    """The image model ``req`` names.

    Raises:
        APIError: 400 naming ``model`` when none is given or it is a text model; as
            ``resolve_model`` (404 unknown, 400 not a model exo can run).
    """
    if not req.model:
        raise APIError(400, "Missing required parameter: 'model' (an image model, e.g. sd-turbo or a diffusers "
                            "pipeline directory)", param="model", code="missing_required_parameter")
    card = await resolve_model(request.app[STATE_KEY], req.model)
    if card.kind != "image":
        raise APIError(400, f"Invalid value for 'model': `{req.model}` is a text model; the image endpoints need an image "
                            f"model (a Stable Diffusion pipeline, e.g. sd-turbo)", param="model", code="invalid_model")
    return card


async def _pipeline_size(card: ModelCard) -> int | None:
    """The image side ``card``'s pipeline was trained for, when its directory is here."""
    if card.path is None:
        return None
    from exo.inference.diffusion.pipeline_dir import PipelineError, read_pipeline

    try:
        return (await asyncio.to_thread(read_pipeline, card.path)).default_size
    except PipelineError as e:
        raise APIError(400, f"The model `{card.model_id}` cannot draw images: {e}", param="model",
                       code="invalid_model") from None


async def _check_picture(image: bytes) -> None:
    """Raises APIError 400 naming ``image`` when Pillow cannot read it."""
    def check() -> None:
        from PIL import Image, UnidentifiedImageError
        import io

        try:
            with Image.open(io.BytesIO(image)) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise APIError(400, f"Invalid value for 'image': not a picture (PNG, JPEG, WebP): {e}", param="image",
                           code="invalid_value") from None

    await asyncio.to_thread(check)


def _item(request: web.Request, png: bytes, seed: int, response_format: str) -> dict[str, Any]:
    if response_format == "url":
        image_id = request.app[IMAGE_STORE_KEY].add(png)
        return {"url": f"{request.scheme}://{request.host}/images/{image_id}.png", "revised_prompt": None, "seed": seed}
    return {"b64_json": base64.b64encode(png).decode("ascii"), "revised_prompt": None, "seed": seed}


async def _images(request: web.Request, edit: bool) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    req, picture = await _read_request(request, edit)
    card = await _image_card(request, req)
    if picture is not None:
        await _check_picture(picture)
    params = to_params(req, card.model_id, await _pipeline_size(card), picture)
    fmt = req.response_format or "url"
    size = f"{params.width}x{params.height}"
    request_id = new_id("img")
    kind = "image_edit" if edit else "image_generation"
    state.active_requests.add(request_id)
    resp: web.StreamResponse | None = None
    try:
        async with contextlib.aclosing(state.node.generate_image(card, params, request_id)) as events:
            if not req.stream:
                data: list[dict[str, Any]] = [{} for _ in range(params.n)]
                try:
                    async for ev in events:
                        if ev.kind == "image":
                            data[ev.index] = _item(request, ev.png, ev.seed, fmt)
                except Exception as e:
                    raise _image_error(e) from None
                return web.json_response({"created": unix_time(), "data": data, "size": size, "output_format": "png"})
            first = await _first_event(events)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            ev = first
            while ev is not None:
                if ev.kind == "progress":
                    await _sse(resp, f"{kind}.progress", {"type": f"{kind}.progress", "index": ev.index,
                                                         "step": ev.step, "total_steps": ev.total_steps})
                elif ev.kind == "image":
                    await _sse(resp, f"{kind}.completed", {"type": f"{kind}.completed", "index": ev.index,
                                                          **_item(request, ev.png, ev.seed, fmt), "size": size,
                                                          "output_format": "png", "created_at": unix_time()})
                try:
                    ev = await anext(events, None)
                except Exception as e:
                    err = _image_error(e)
                    await _sse(resp, "error", {"type": "error", "error": err.body()["error"]})
                    break
            await resp.write_eof()
            return resp
    finally:
        state.active_requests.discard(request_id)


async def _first_event(events):
    """The first event (before any header is sent, so that a refusal is a plain 4xx/5xx)."""
    try:
        return await anext(events, None)
    except Exception as e:
        raise _image_error(e) from None


async def _sse(resp: web.StreamResponse, event: str, data: dict[str, Any]) -> None:
    await resp.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())


async def image_generations(request: web.Request) -> web.StreamResponse:
    """``POST /v1/images/generations`` (see the module docstring)."""
    return await _images(request, edit=False)


async def image_edits(request: web.Request) -> web.StreamResponse:
    """``POST /v1/images/edits``: image-to-image (see the module docstring)."""
    return await _images(request, edit=True)


async def image_variations(request: web.Request) -> web.Response:
    """``POST /v1/images/variations``: refused (a variation needs an image-conditioned model).

    Raises:
        APIError: always, 400 "unsupported".
    """
    raise APIError(400, "Image variations are not supported: use /v1/images/edits with a prompt", code="unsupported")


async def get_image(request: web.Request) -> web.Response:
    """``GET /images/{id}.png``: a picture answered as a ``url``, while it is kept.

    Raises:
        APIError: 404 once expired (or never drawn here).
    """
    png = request.app[IMAGE_STORE_KEY].get(request.match_info["image_id"])
    if png is None:
        raise APIError(404, "No such image: image URLs answer for an hour, on the node that drew them",
                       code="image_not_found")
    return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def setup_routes(app: web.Application) -> None:
    """Register the image routes (before the web UI's catch-all) and the store of image URLs."""
    app[IMAGE_STORE_KEY] = ImageStore()
    app.router.add_post("/v1/images/generations", image_generations)
    app.router.add_post("/v1/images/edits", image_edits)
    app.router.add_post("/v1/images/variations", image_variations)
    app.router.add_get(r"/images/{image_id:[0-9a-f]{32}}.png", get_image)
