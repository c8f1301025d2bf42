"""Request bodies validated against pydantic models, with a 400 that names the parameter.

Every dialect's protocol module parses its body with ``parse_request``; a cross-field check
inside a model raises ``RequestParamError`` naming its parameter. The error's format is the
dialect's (``dialects``); its ``param`` and message are the same everywhere.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from exo.api.chat_api.utils import APIError

#: The configuration of the OpenAI and Anthropic request models: unknown fields and wrong types
#: are errors, as those APIs answer them.
STRICT = ConfigDict(extra="forbid", strict=True)
MAX_STOP_STRINGS = 16  # stop strings a request may give, in every dialect


class RequestParamError(ValueError):
    """A cross-field check failed (raised inside validators; ``parse_request`` turns it into a 400).

    Args:
        param: the parameter at fault (relative to the model validated).
        message: what is wrong.
        code: OpenAI-style error code, "invalid_value" or "unsupported_parameter".
    """

    def __init__(self, param: str, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


def unsupported(param: str, message: str) -> RequestParamError:
    """A ``RequestParamError`` for a value exo does not support (code "unsupported_parameter")."""
    return RequestParamError(param, message, code="unsupported_parameter")


RequestT = TypeVar("RequestT", bound=BaseModel)

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "null"}


def _param_from_loc(loc: tuple[int | str, ...]) -> str | None:
    """``("messages", 0, "content", "str")`` -> ``"messages[0].content"`` (union tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part or "-" in part or (part and part[0].isupper()):
            continue
        else:
            out += f".{part}" if out else part
    return out or None


def parse_request(model: type[RequestT], data: Any) -> RequestT:
    """Validate a decoded JSON body against ``model``.

    Raises:
        APIError: 400 naming the first offending parameter in ``param`` and in the message;
            code "unsupported_parameter" for supported-by-OpenAI-but-not-by-exo values.
    """
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_request_body")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        for err in errors:  # our own cross-field checks carry their parameter
            exc = (err.get("ctx") or {}).get("error")
            if isinstance(exc, RequestParamError):
                prefix = _param_from_loc(tuple(err["loc"]))
                param = f"{prefix}.{exc.param}" if prefix else exc.param
                raise APIError(400, f"Invalid value for '{param}': {exc}", param=param, code=exc.code) from None
        # for unions pydantic reports one error per member: the deepest is the most telling
        err = max(errors, key=lambda x: len(x["loc"]))
        param = _param_from_loc(tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter") from None
        if err["type"] == "missing":
            raise APIError(400, f"Missing required parameter: '{param}'", param=param,
                           code="missing_required_parameter") from None
        code = "invalid_type" if err["type"].endswith("_type") else "invalid_value"
        raise APIError(400, f"Invalid value for '{param}': {err['msg']}", param=param, code=code) from None
