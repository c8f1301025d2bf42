"""Chat templates: Jinja rendered in a sandbox the way ``transformers``' ``apply_chat_template``
renders them, and a few named templates for models whose files carry none.

Templates come from model files, so they are untrusted code: they run in Jinja2's
``ImmutableSandboxedEnvironment`` and see only plain data (dicts, lists, strings, numbers).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: Chat templates selectable by name (``Tokenizer.with_chat_template("chatml")``), for base
#: models whose files carry none.
BUILTIN_CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    # Gemma knows two roles: a system message becomes a user turn
    "gemma": (
        "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
        "else 'user' %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "phi3": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
}


class ChatTemplateError(Exception):
    """Raised by a template's ``raise_exception(message)``."""


# what a template can raise on messages it does not accept (all reported as ValueError)
_TEMPLATE_ERRORS = (jinja2.TemplateError, ChatTemplateError, TypeError, ValueError, KeyError, IndexError,
                    AttributeError, ZeroDivisionError, OverflowError, RecursionError)


def render_chat_template(source: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                         tools: list[dict] | None = None, documents: list[dict] | None = None, **variables) -> str:
    """Render the chat template ``source`` over ``messages`` as ``transformers`` does: keys whose
    value is None are dropped from each message, a message's reasoning is also given as
    ``reasoning_content`` and ``thinking``; the template sees ``messages``,
    ``add_generation_prompt``, ``tools``, ``documents`` and ``variables`` (special tokens and
    extra keywords such as ``enable_thinking``), all as plain data.

    Raises:
        ValueError: the template does not compile, calls ``raise_exception``, breaks a sandbox
            rule, or fails on the messages.
    """
    template = compile_chat_template(source)
    try:
        return template.render(messages=_chat_messages(messages), add_generation_prompt=add_generation_prompt,
                               tools=_plain(tools), documents=_plain(documents), **_plain(variables))
    except _TEMPLATE_ERRORS as e:
        raise ValueError(f"chat template error: {e}") from e


class _GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` refusing attribute names that start with "_" (no reaching CPython internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 (Jinja's Namespace signature, so namespace(self=...) works)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


def _raise_exception(message):
    raise ChatTemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str):
    """The Jinja template of ``source`` in a sandbox set up as ``transformers`` sets it up:
    an ``ImmutableSandboxedEnvironment`` with ``trim_blocks``, ``lstrip_blocks`` and loop
    controls; ``raise_exception(msg)`` and ``strftime_now(fmt)``; a ``tojson`` filter taking
    ``ensure_ascii``, ``indent``, ``separators`` and ``sort_keys``; ``namespace`` refusing
    names that start with "_"; and a ``{% generation %}`` block that renders its body.

    Raises:
        ValueError: the source is not a valid template.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace,
                       dict=lambda *args, **kwargs: dict(*args, **kwargs))
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not compile: {e}") from e


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the template sees them: plain data, None values dropped, reasoning under
    the names templates read (``reasoning_content``, and ``thinking`` for gpt-oss)."""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise ValueError(f"a chat message must be a dict, not {type(message).__name__}")
        message = {k: v for k, v in _plain(message).items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _plain(value: Any) -> Any:
    """``value`` rebuilt from plain JSON types (dict, list, str, int, float, bool, None), so a
    template sees no object with methods of its own; anything else becomes ``"<TypeName>"``."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for kind in (bool, str, int, float):  # subclasses (enums, numpy floats) lose their extra methods
        if isinstance(value, kind):
            return kind(value)
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # numpy scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"
