"""Request bodies as JSON, checked before any handler sees them (every dialect).

Python's ``json`` accepts what a handler must never meet: ``NaN`` and ``Infinity`` (not JSON,
RFC 8259 section 6), strings holding an unpaired UTF-16 surrogate (``"\\ud800"`` is valid JSON
escape syntax but no character: the tokenizer and every encoder fail on it), and nesting deep
enough to exhaust the interpreter's recursion limit. ``decode_json`` rejects each with a 400
naming where in the body it is, e.g. ``messages[0].content``; the dialect's error middleware
words it in the dialect's own format.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

from aiohttp import web

from exo.api.chat_api.utils import APIError

MAX_DEPTH = 64  # levels of nested arrays and objects in a request body
OFF_LOOP_BYTES = 1 << 20  # bodies at least this large are decoded in a worker thread

_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class _NotANumber(float):
    """What ``NaN``, ``Infinity`` and ``-Infinity`` decode to, so that the walk can name them."""

    literal: str

    def __new__(cls, literal: str) -> "_NotANumber":
        value = super().__new__(cls, float(literal.replace("Infinity", "inf")))
        value.literal = literal
        return value


def _path(parent: str, key: int | str) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def _check(value: Any, surrogates: bool) -> None:
    """Walk ``value`` (a decoded body) without recursion.

    Raises:
        APIError: 400 for nesting deeper than MAX_DEPTH, a non-finite number, or (when
            ``surrogates``) a string or key with an unpaired surrogate.
    """
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        v, where, depth = stack.pop()
        if isinstance(v, (dict, list)) and depth >= MAX_DEPTH:
            raise _too_deep(where)
        if isinstance(v, dict):
            for k, item in v.items():
                if surrogates and not k.isascii() and _SURROGATE.search(k):
                    raise _surrogate_error(_path(where, k))
                stack.append((item, _path(where, k), depth + 1))
        elif isinstance(v, list):
            stack.extend((item, _path(where, i), depth + 1) for i, item in enumerate(v))
        elif isinstance(v, float) and not math.isfinite(v):  # NaN, Infinity, or a literal like 1e999
            literal = getattr(v, "literal", repr(v))
            raise APIError(400, f"Invalid value for '{where}': {literal} is not a number JSON allows",
                           param=where or None, code="invalid_value")
        elif surrogates and isinstance(v, str) and not v.isascii() and _SURROGATE.search(v):
            raise _surrogate_error(where)


def _too_deep(where: str | None) -> APIError:
    at = f" at '{where or '$'}'" if where is not None else ""
    return APIError(400, f"The JSON body is nested more than {MAX_DEPTH} levels deep{at}", param=where or None,
                    code="invalid_json")


def _surrogate_error(where: str) -> APIError:
    return APIError(400, f"Invalid value for '{where}': the string holds an unpaired UTF-16 surrogate "
                         "(a \\ud800-\\udfff escape that is not half of a pair), which is not a character",
                    param=where or None, code="invalid_value")


def decode_json(body: bytes) -> Any:
    """The JSON value of ``body`` (UTF-8), checked as the module says.

    Raises:
        APIError: 400 "invalid_json" for a body that is not JSON or nests deeper than
            MAX_DEPTH; 400 "invalid_value" naming the place of a non-finite number or an
            unpaired surrogate.
    """
    try:
        value = json.loads(body, parse_constant=_NotANumber)
    except RecursionError:
        raise _too_deep(None) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json") from None
    # a surrogate can only arrive as an escape: UTF-8 cannot encode one (such bytes fail above)
    _check(value, surrogates=_SURROGATE_ESCAPE.search(body) is not None)
    return value


async def read_json(request: web.Request) -> Any:
    """The decoded and checked JSON body of ``request`` (``decode_json``); a body of
    OFF_LOOP_BYTES or more is decoded in a worker thread so that the event loop keeps serving.

    Raises:
        APIError: as ``decode_json`` (aiohttp raises 413 for a body over the application's
            ``client_max_size``).
    """
    body = await request.read()
    if len(body) >= OFF_LOOP_BYTES:
        return await asyncio.to_thread(decode_json, body)
    return decode_json(body)
