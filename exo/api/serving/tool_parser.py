"""Reading tool calls back from a model's answer, streaming (``ToolCallParser``).

The syntax of each family is ``tools.ToolSyntax``; the grammar keeps the calls well formed, and
this parser finds where each call's arguments end by tracking JSON nesting, so it reads a call
whatever spacing the model chose, piece by piece as the tokens arrive.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Literal

from exo.api.serving.request import ToolCall
from exo.api.serving.token_handler import stop_prefix_overlap
from exo.api.serving.tools import ToolSyntax, new_call_id

@dataclass
class ToolCallDelta:
    """A streamed piece of a call: its first piece has ``id`` and ``name``, later ones only
    ``arguments`` text (OpenAI's ``delta.tool_calls`` pieces).

    Attributes:
        index: the call's index within the answer.
        id, name: on the first piece only.
        arguments: more of its arguments' JSON text.
    """

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


@dataclass
class ToolCallParser:
    """Reads a model's answer text, streaming: what is text and what are calls.

    ``feed(text)`` returns ``(content, deltas)``: the text that is ordinary content (a possible
    beginning of a trigger is held back until it is decided) and the call pieces completed by
    this text. ``finish()`` releases what is held. The arguments' end is found by tracking JSON
    nesting (strings and escapes included), so a call is read whatever spacing the model uses.

    Attributes:
        calls: the calls read so far, complete or not.
    """

    syntax: ToolSyntax
    calls: list[ToolCall] = field(default_factory=list)
    _buf: str = ""
    _state: Literal["text", "header", "args", "after"] = "text"
    _depth: int = 0
    _in_string: bool = False
    _escape: bool = False

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Take more answer text; see the class docstring."""
        self._buf += text
        content, deltas = "", []
        while True:
            if self._state == "text":
                at = self._buf.find(self.syntax.trigger)
                if at == -1:
                    keep = stop_prefix_overlap(self._buf, [self.syntax.trigger])
                    if self.calls and not self._buf[: len(self._buf) - keep].strip():
                        keep = len(self._buf)  # blank text between calls is held: it is no content
                    content += self._buf[: len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep:]
                    return content, deltas
                if self.calls and not self._buf[:at].strip():
                    self._buf = self._buf[at:]
                    at = 0
                content += self._buf[:at]
                # llama3's trigger is the call's own beginning: keep it for the header
                self._buf = self._buf[at:] if self.syntax.family == "llama3" else self._buf[at + len(self.syntax.trigger):]
                self._state = "header"
            elif self._state == "header":
                buf = self._buf.lstrip()
                if self.syntax.family == "mistral" and buf.startswith("["):
                    buf = buf[1:]
                m = _HEADER.match(buf)
                if m is None:
                    return content, deltas
                name = json.loads(f'"{m.group(1)}"')
                call = ToolCall(new_call_id(), name, "")
                self.calls.append(call)
                deltas.append(ToolCallDelta(len(self.calls) - 1, call.id, name, ""))
                self._buf = buf[m.end():]
                self._state, self._depth, self._in_string, self._escape = "args", 0, False, False
            elif self._state == "args":
                piece, done = self._scan_arguments()
                if piece:
                    index = len(self.calls) - 1
                    c = self.calls[index]
                    self.calls[index] = ToolCall(c.id, c.name, c.arguments + piece)
                    deltas.append(ToolCallDelta(index, arguments=piece))
                if not done:
                    return content, deltas
                self._state = "after"
            else:  # after a call's arguments: its closing text, then another call or text
                nxt = self._after_call()
                if nxt is None:
                    return content, deltas
                self._state = nxt

    def _scan_arguments(self) -> tuple[str, bool]:
        """Consume arguments text from the buffer up to the end of the JSON value."""
        i = 0
        buf = self._buf
        if self._depth == 0 and not self._in_string:
            stripped = buf.lstrip()
            if not stripped:
                self._buf = ""
                return "", False
            buf = stripped
        while i < len(buf):
            ch = buf[i]
            i += 1
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    self._buf = buf[i:]
                    return buf[:i], True
        self._buf = ""
        return buf, False

    def _after_call(self) -> Literal["text", "header"] | None:
        """Skip a finished call's closing text; the next state, or None to wait for text."""
        buf = self._buf
        fam = self.syntax.family
        if fam == "hermes":
            end = buf.find("</tool_call>")
            if end == -1:
                return None
            self._buf = buf[end + len("</tool_call>"):]
            return "text"
        stripped = buf.lstrip()
        if not stripped:
            return None
        if stripped.startswith("}"):
            stripped = stripped[1:].lstrip()
            if not stripped:
                self._buf = ""
                return None
        if fam == "mistral":
            if stripped.startswith(","):
                self._buf = stripped[1:]
                return "header"
            if stripped.startswith("]"):
                self._buf = stripped[1:]
                return "text"
            self._buf = stripped
            return "text"
        if stripped.startswith(";"):
            self._buf = stripped[1:]
            return "text"
        self._buf = stripped
        return "text"

    def finish(self) -> str:
        """No more text: what is held as a possible trigger is content after all."""
        if self._state == "text":
            out, self._buf = self._buf, ""
            return "" if self.calls and not out.strip() else out
        if self._state == "header" and not self.calls:
            out, self._buf = self.syntax.trigger + self._buf, ""
            self._state = "text"
            return out
        self._buf = ""
        return ""


