"""Reasoning: the ``<think>...</think>`` part of a thinking model's answer, kept apart.

Qwen 3 and the DeepSeek-R1 distills write their reasoning between ``<think>`` and
``</think>`` before the answer (an R1 template opens ``<think>`` in the generation prompt
itself). ``ReasoningSplitter`` separates the two, streaming, so each dialect can send the
reasoning where its clients look for it: OpenAI's ``reasoning_content`` (as vLLM, llama-server
and DeepSeek's API send it), Anthropic's ``thinking`` blocks, Ollama's ``message.thinking``.
"""

from __future__ import annotations

from dataclasses import dataclass

from exo.api.serving.token_handler import stop_prefix_overlap

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt ends inside an open ``<think>`` (the answer starts with reasoning)."""
    tail = prompt.rstrip()
    return tail.endswith(THINK_OPEN)


@dataclass
class ReasoningSplitter:
    """Splits answer text into (reasoning, content), streaming.

    The answer is reasoning when it opens with ``<think>`` (leading whitespace allowed), or
    from its start when the prompt opened it (``inside``), up to ``</think>``; everything after
    is content (its leading newlines dropped). A possible beginning of a tag is held back until
    the next text decides it.

    Attributes:
        inside: the answer is in its reasoning now.
    """

    inside: bool = False
    _started: bool = False  # the answer's first non-blank text was seen
    _after_close: bool = False  # content just after </think>: leading newlines are dropped
    _buf: str = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that ``text`` completes."""
        self._buf += text
        reasoning, content = "", ""
        while self._buf:
            if not self._started:
                stripped = self._buf.lstrip()
                if not stripped:
                    return reasoning, content
                if not self.inside:
                    if THINK_OPEN.startswith(stripped) and len(stripped) < len(THINK_OPEN):
                        return reasoning, content  # maybe "<think>" still coming
                    if stripped.startswith(THINK_OPEN):
                        self.inside = True
                        self._buf = stripped[len(THINK_OPEN):]
                self._started = True
                continue
            if self.inside:
                at = self._buf.find(THINK_CLOSE)
                if at == -1:
                    keep = stop_prefix_overlap(self._buf, [THINK_CLOSE])
                    reasoning += self._buf[: len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep:]
                    return reasoning, content
                reasoning += self._buf[:at]
                self._buf = self._buf[at + len(THINK_CLOSE):]
                self.inside, self._after_close = False, True
                continue
            if self._after_close:
                self._buf = self._buf.lstrip("\n")
                if not self._buf:
                    return reasoning, content
                self._after_close = False
            content += self._buf
            self._buf = ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """No more text: release what is held (an unclosed reasoning stays reasoning)."""
        out, self._buf = self._buf, ""
        if self.inside:
            return out, ""
        if not self._started:
            return "", out
        return "", out.lstrip("\n") if self._after_close else out
