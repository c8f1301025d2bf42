"""Shared state of the API application: what the handlers need, under a typed ``web.AppKey``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Protocol

from aiohttp import web

from exo.api.chat_api.models import GenerationDefaults
from exo.config import DEFAULT_RESPONSE_TIMEOUT

if TYPE_CHECKING:
    import numpy as np

    from exo.inference.diffusion.params import ImageEvent, ImageParams
    from exo.inference.generation import GenerationOptions
    from exo.inference.tokenizers import Tokenizer
    from exo.models.sources import ModelCard
    from exo.orchestration.request import TokenResult


class APINode(Protocol):
    """What the API needs of ``exo.orchestration.node.Node``."""

    id: str

    def generate(self, model_id: str, prompt_token_ids: list[int], options: "GenerationOptions",
                 request_id: str | None = None) -> AsyncIterator["TokenResult"]: ...

    async def embed(self, model_id: str, token_ids: list[int], pooling: str | None = None, normalize: bool = True,
                    request_id: str | None = None) -> "np.ndarray": ...

    async def get_tokenizer(self, model_id: str) -> "Tokenizer": ...

    def generate_image(self, card: "ModelCard", params: "ImageParams", request_id: str) -> AsyncIterator["ImageEvent"]: ...

    async def model_card(self, name: str) -> "ModelCard": ...

    def available_models(self) -> list["ModelCard"]: ...

    def model_state(self, model_id: str) -> str: ...

    def topology_dict(self) -> dict[str, Any]: ...

    async def pull(self, name: str) -> "ModelCard": ...

    async def delete_model(self, name: str) -> None: ...

    def downloads(self) -> dict[str, dict[str, Any]]: ...


@dataclass
class APIState:
    """Configuration and collaborators of one ChatAPI application.

    Attributes:
        node: the node generation requests go to.
        default_model: model id used when a request names none.
        response_timeout: seconds to wait for the next token (the first included) before
            failing the request (504 before streaming starts, an error event after).
        defaults: server defaults of generation options.
        tinychat_dir: directory of the web UI, or None to serve none.
        created: Unix seconds the API started (the ``created`` of model objects).
        active_requests: ids of requests being answered (for logs and tests).
        fallbacks: model id -> the models that answer its generation requests, in order, when
            the cluster cannot serve it (``fallback.serving_card``).
    """

    node: APINode
    default_model: str
    response_timeout: float = DEFAULT_RESPONSE_TIMEOUT
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    tinychat_dir: Path | None = None
    created: int = 0
    active_requests: set[str] = field(default_factory=set)
    fallbacks: dict[str, list[str]] = field(default_factory=dict)


STATE_KEY: web.AppKey[APIState] = web.AppKey("exo_api_state", APIState)
