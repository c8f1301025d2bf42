"""Tool calling: how a model family writes a call, the grammar that keeps calls valid, and
the parser that reads them back, streaming.

Three families of call syntax, as the models were trained (the per-family parsers of MLX Omni's
chat module and vLLM's tool parsers do the same job):

* ``hermes`` (Hermes, Qwen 2.5 / 3, and the default): ``<tool_call>\\n{"name": N, "arguments":
  {...}}\\n</tool_call>``, one block per call.
* ``llama3`` (Llama 3.1+ JSON tool calling): ``{"name": N, "parameters": {...}}``, optionally
  after ``<|python_tag|>``.
* ``mistral``: ``[TOOL_CALLS][{"name": N, "arguments": {...}}, ...]``.

The family is read from the model's chat template (the markers it writes). A template that
renders ``tools`` gets them as they are; one that does not gets them described in a system
message, in the Hermes syntax, and earlier calls and results written into the turns.

The parser that reads calls back from the answer is in ``tool_parser``. Whatever the model, a
call's arguments are valid JSON for the function's schema: the request's
grammar (llguidance Lark with embedded ``%json`` schemas, see ``exo.inference.grammar``)
allows, with ``required`` or a named function, nothing but calls from the first token, and
with ``auto`` free text in which a call, once its trigger is written, is constrained to the
end ("lazy" trigger lexemes, llguidance's docs/syntax.md, "Tool calling").
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from exo.api.serving.request import ToolCall, ToolChoice, ToolSpec, Turn
from exo.inference.grammar import lark_grammar, schema_with_defaults
from exo.api.chat_api.utils import APIError
from exo.inference.tokenizers import Tokenizer

Family = Literal["hermes", "llama3", "mistral"]

TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class ToolSyntax:
    """How one family writes calls.

    Attributes:
        family: hermes, llama3 or mistral.
        trigger: the text that opens a call (or the calls' list).
        arguments_key: "arguments" or "parameters".
        template_renders_tools: the chat template takes ``tools`` itself.
        special_trigger: the trigger's token id when it is one special token of the
            vocabulary (Qwen's ``<tool_call>``), else None.
    """

    family: Family
    trigger: str
    arguments_key: str
    template_renders_tools: bool
    special_trigger: int | None = None

    def call_text(self, name: str, arguments: str) -> str:
        """One call as the model writes it (the list brackets of mistral excluded)."""
        body = f'{{"name": {json.dumps(name)}, "{self.arguments_key}": {arguments}}}'
        return f"{self.trigger}\n{body}\n</tool_call>" if self.family == "hermes" else body

    def calls_text(self, calls: Sequence[ToolCall]) -> str:
        """An assistant turn's calls as the model writes them."""
        if self.family == "mistral":
            return self.trigger + "[" + ", ".join(self.call_text(c.name, c.arguments) for c in calls) + "]"
        sep = "\n" if self.family == "hermes" else "; "
        return sep.join(self.call_text(c.name, c.arguments) for c in calls)


def tool_syntax(tokenizer: Tokenizer) -> ToolSyntax:
    """The call syntax of ``tokenizer``'s model, from its chat template's markers (Hermes when
    it has none)."""
    sources = [tokenizer.chat_templates.get("tool_use") or "", tokenizer.chat_template or ""]
    source = "\n".join(sources)
    renders = "tools" in source
    if "[TOOL_CALLS]" in source:
        family, trigger, key = "mistral", "[TOOL_CALLS]", "arguments"
    elif "<|python_tag|>" in source or ("ipython" in source and "parameters" in source):
        family, trigger, key = "llama3", '{"name": ', "parameters"
    else:
        family, trigger, key = "hermes", "<tool_call>", "arguments"
    special = None
    if family in ("hermes", "mistral"):
        ids = tokenizer.backend.encode(trigger, add_special_tokens=False).ids
        if len(ids) == 1 and ids[0] in tokenizer.special_token_ids | _added_ids(tokenizer):
            special = ids[0]
    return ToolSyntax(family, trigger, key, renders, special)  # type: ignore[arg-type]


def _added_ids(tokenizer: Tokenizer) -> frozenset[int]:
    return frozenset(t for t in tokenizer.backend.get_added_tokens_decoder())


def new_call_id() -> str:
    """A fresh call id in OpenAI's style, ``call_`` and 24 hex digits."""
    return f"call_{uuid.uuid4().hex[:24]}"


# ---------------------------------------------------------------------------- the prompt


def tools_system_text(tools: Sequence[ToolSpec], syntax: ToolSyntax) -> str:
    """The system text describing ``tools`` to a model whose template does not render them:
    one compact JSON signature a line, then the call syntax."""
    lines = "\n".join(json.dumps(t.as_openai()["function"], ensure_ascii=False, separators=(",", ":")) for t in tools)
    example = syntax.call_text("<name>", "<arguments as a JSON object>")
    return f"You can call these functions:\n{lines}\nTo call one, answer with:\n{example}"


def template_turns(turns: Sequence[Turn], tools: Sequence[ToolSpec], syntax: ToolSyntax | None) -> list[dict[str, Any]]:
    """The conversation as chat templates take it (``{"role", "content", ...}`` dicts).

    Calls and tool results go in the ``tool_calls`` / ``tool`` forms ``transformers`` defines
    when the template renders tools; otherwise (or without a syntax) they are written into the
    text: calls in the model's syntax, results in ``<tool_response>`` blocks of a user turn.
    The tools' description leads a system turn when the template does not render them.
    """
    native = syntax is not None and syntax.template_renders_tools
    out: list[dict[str, Any]] = []
    for t in turns:
        if t.role == "assistant" and t.tool_calls:
            if native:
                out.append({"role": "assistant", "content": t.content, "reasoning_content": t.reasoning, "tool_calls": [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments_value(c.arguments)}}
                    for c in t.tool_calls]})
                continue
            text = (syntax or ToolSyntax("hermes", "<tool_call>", "arguments", False)).calls_text(t.tool_calls)
            out.append({"role": "assistant", "content": (t.content + "\n" if t.content else "") + text,
                        "reasoning_content": t.reasoning})
        elif t.role == "tool":
            if native:
                out.append({"role": "tool", "content": t.content, "tool_call_id": t.tool_call_id, "name": t.name})
                continue
            block = f"<tool_response>\n{t.content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_results": True})
        else:
            out.append({"role": t.role, "content": t.content, "reasoning_content": t.reasoning})
    for d in out:
        d.pop("_results", None)
    if tools and syntax is not None and not syntax.template_renders_tools:
        text = tools_system_text(tools, syntax)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _arguments_value(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


# ---------------------------------------------------------------------------- the grammar


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _arguments(tool: ToolSpec) -> str:
    """``%json {schema}``: the tool's arguments, with the JSON whitespace bounded."""
    return "%json " + json.dumps(schema_with_defaults(tool.parameters or {"type": "object"}), ensure_ascii=False)


def tool_grammar_source(tools: Sequence[ToolSpec], choice: ToolChoice, parallel: bool, syntax: ToolSyntax) -> str:
    """The Lark source (llguidance's dialect) of what a model may write with these tools.

    ``required`` / a named function: calls only (one, or several when ``parallel``), from the
    first token; ``auto``: free text, in which a call is constrained from its trigger on (a
    lazy lexeme ends at the trigger's first occurrence; a special-token trigger ends the text
    lexeme by itself, since text never matches a special token).
    """
    allowed = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    key = syntax.arguments_key
    lines = ["%llguidance {}", "body: " + " | ".join(f"body_{i}" for i in range(len(allowed)))]
    lines += [f'body_{i}: {_lit("{" + json.dumps("name") + ": " + json.dumps(t.name) + ", " + json.dumps(key) + ": ")} '
              f'{_arguments(t)} "}}"' for i, t in enumerate(allowed)]
    trigger = f"<[{syntax.special_trigger}]>" if syntax.special_trigger is not None else _lit(syntax.trigger)
    if syntax.family == "hermes":
        lines.append(f'call: {trigger} "\\n" body "\\n</tool_call>"')
        lines.append('calls: call ("\\n" call)*' if parallel else "calls: call")
    elif syntax.family == "mistral":
        lines.append(f'calls: {trigger} "[" body (", " body)* "]"' if parallel else f'calls: {trigger} "[" body "]"')
    else:  # llama3: the body itself opens with the trigger
        lines.append('calls: body ("; " body)*' if parallel else "calls: body")
    if choice.mode in ("required", "function"):
        lines.append("start: calls")
    elif syntax.special_trigger is not None:
        lines += ["start: TEXT | TEXT calls TEXT", r"TEXT: /(.|\n)*/"]
    else:
        lines += ["start: TEXT | open rest TEXT", f"open[lazy]: TEXT {trigger}", r"TEXT: /(.|\n)*/"]
        if syntax.family == "hermes":  # the trigger consumed, the rest of the calls
            lines.append('rest: "\\n" body "\\n</tool_call>"' + (' ("\\n" call)*' if parallel else ""))
        elif syntax.family == "mistral":
            lines.append('rest: "[" body (", " body)* "]"' if parallel else 'rest: "[" body "]"')
        else:  # llama3: the trigger is the beginning of a body; the rest of one, then more
            lines.append("rest: llama_rest" + (' ("; " body)*' if parallel else ""))
            lines.append("llama_rest: " + " | ".join(
                f'{_lit(json.dumps(t.name) + ", " + json.dumps(key) + ": ")} {_arguments(t)} "}}"' for t in allowed))
    return "\n".join(lines)


def tool_grammar(tools: Sequence[ToolSpec], choice: ToolChoice, parallel: bool, syntax: ToolSyntax) -> str:
    """``tool_grammar_source`` compiled to an llguidance grammar.

    Raises:
        ValueError: a schema llguidance cannot use (the message says which).
    """
    return lark_grammar(tool_grammar_source(tools, choice, parallel, syntax))


def check_tools(tools: Sequence[ToolSpec], choice: ToolChoice, turns: Sequence[Turn] | None,
                choice_param: str = "tool_choice") -> None:
    """Refuse tools and histories the serving layer cannot honour.

    Args:
        choice_param: the parameter holding the tool choice.

    Raises:
        APIError: 400 naming the parameter: a bad or duplicate name, a choice of a function not
            given (or of calls without tools), a tool result without its call.
    """
    seen: set[str] = set()
    for t in tools:
        param = t.param
        if not TOOL_NAME.match(t.name):
            raise _invalid(f"{param}.name", f"the tool name {t.name!r} must be 1-64 letters, digits, '_', '.' or '-'")
        if t.name in seen:
            raise _invalid(f"{param}.name", f"the tool name {t.name!r} is given twice")
        seen.add(t.name)
        if not isinstance(t.parameters, dict):
            raise _invalid(param, "the tool's parameters must be a JSON Schema object")
    if choice.mode in ("required", "function") and not tools:
        raise _invalid(choice_param, f"tool_choice {choice.mode!r} needs tools")
    if choice.mode == "function" and choice.name not in seen:
        raise _invalid(choice_param, f"tool_choice names the function {choice.name!r}, which is not among the tools")
    pending: dict[str, str] = {}  # call id -> name, of calls not answered yet
    for i, t in enumerate(turns or []):
        if t.role == "assistant":
            pending = {c.id: c.name for c in t.tool_calls}
        elif t.role == "tool":
            param = t.param or f"messages[{i}]"
            if t.tool_call_id is not None:
                if t.tool_call_id not in pending:
                    raise _invalid(param, f"this tool result answers the call {t.tool_call_id!r}, which no "
                                            "earlier assistant message made")
                del pending[t.tool_call_id]
            else:
                match = next((cid for cid, name in pending.items() if t.name in (None, name)), None)
                if match is None:
                    raise _invalid(param, "this tool result answers no call of the assistant message before it")
                del pending[match]


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, f"Invalid value for '{param}': {message}", param=param, code="invalid_value")
