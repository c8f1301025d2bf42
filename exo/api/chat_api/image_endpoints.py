"""Image generation endpoints.

exo's models generate text only, so ``POST /v1/images/generations`` (and edits/variations)
answer an OpenAI-format error rather than a confusing 404 for the route: 404
"model_not_found" when the request names a model, otherwise 400 "unsupported".
"""

from __future__ import annotations

import logging

from aiohttp import web

from exo.api.chat_api.json_body import read_json
from exo.api.chat_api.utils import APIError

logger = logging.getLogger(__name__)


async def image_generations(request: web.Request) -> web.Response:
    """``POST /v1/images/generations``, ``/v1/images/edits``, ``/v1/images/variations``.

    Raises:
        APIError: always; 404 "model_not_found" naming ``model`` when one is given (no image
            model exists here), else 400 "unsupported".
    """
    model = None
    if request.content_type == "application/json":
        try:
            body = await read_json(request)
            model = body.get("model") if isinstance(body, dict) else None
        except APIError:  # whatever the body, the answer is the same refusal
            pass
    if isinstance(model, str):
        raise APIError(404, f"The model `{model}` does not exist: this cluster serves text models only and cannot "
                            "generate images", param="model", code="model_not_found")
    raise APIError(400, "Image generation is not supported: this cluster serves text models only",
                   code="unsupported")


def setup_routes(app: web.Application) -> None:
    for path in ("/v1/images/generations", "/v1/images/edits", "/v1/images/variations"):
        app.router.add_post(path, image_generations)
