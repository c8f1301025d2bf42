"""The dialect-neutral request every API dialect translates its own into.

OpenAI (``/v1/chat/completions``, ``/v1/completions``), Ollama (``/api/chat``,
``/api/generate``) and Anthropic (``/v1/messages``) requests each become one
``GenerateRequest``: a conversation of ``Turn`` values (roles, text, tool calls and tool
results) or raw prompts, the sampling options, tools and how they may be called, a response
format, and the reasoning switch. ``serving.pipeline`` runs it; the dialect only frames the
result. The layering of vLLM's ``entrypoints/openai`` (protocol models translated into one
engine request), without its size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call.

    Attributes:
        name: the function's name (``[A-Za-z0-9_.-]``, 1-64 characters, as OpenAI requires).
        description: what it does, for the model.
        parameters: the JSON Schema of its arguments (an object schema).
        param: where the tool is in the request (e.g. ``tools[0].function``), named in errors.
    """

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    param: str = "tools"

    def as_openai(self) -> dict[str, Any]:
        """``{"type": "function", "function": {...}}``, the form chat templates take tools in."""
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolCall:
    """A call the model made (or made in an earlier turn of the history).

    Attributes:
        id: the call's id (``call_...`` in OpenAI, ``toolu_...`` in Anthropic).
        name: the function called.
        arguments: its arguments as JSON text (an object).
    """

    id: str
    name: str
    arguments: str


@dataclass
class Turn:
    """One message of a conversation.

    Attributes:
        role: system, user, assistant or tool.
        content: its text.
        tool_calls: an assistant turn's calls.
        tool_call_id: a tool turn's answer to this call id (None where the dialect has no ids).
        name: a tool turn's function name.
        reasoning: an assistant turn's earlier reasoning, given back to templates that show it.
        param: where the turn is in the request (e.g. ``messages[3]``), named in errors.
    """

    role: Role
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None
    reasoning: str | None = None
    param: str | None = None


@dataclass(frozen=True)
class ToolChoice:
    """How the model may use the tools: "auto" (text or calls), "none" (text only),
    "required" (at least one call) or "function" (a call of ``name``)."""

    mode: Literal["auto", "none", "required", "function"] = "auto"
    name: str | None = None


@dataclass(frozen=True)
class ResponseFormat:
    """The shape of the answer: "text", "json_object" (any JSON object) or "json_schema"
    (JSON valid for ``schema``)."""

    kind: Literal["text", "json_object", "json_schema"] = "text"
    schema: dict[str, Any] | bool | None = None


@dataclass
class Sampling:
    """Sampling options a request gives (None: the model's or server's default).

    Attributes:
        temperature, top_p, top_k, seed, presence_penalty, frequency_penalty: as
            ``GenerationOptions``; choice ``i`` of ``n`` uses ``seed + i``.
        logit_bias: token id -> bias added to its logit, in [-100, 100] (OpenAI's).
        logprobs: return each chosen token's log-probability.
        top_logprobs: alternatives per token (0-20).
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class GenerateRequest:
    """One request to generate, whatever dialect it came in.

    Either ``turns`` (a conversation, rendered by the model's chat template) or ``prompts``
    (raw texts or token ids, each generated on its own) is given.

    Attributes:
        model: model id, or None for the server's default.
        turns: the conversation.
        prompts: raw prompts (completions, Ollama's raw generate); each gets ``n`` choices.
        prefix_ids: token ids before the (first) prompt (Ollama's ``context``).
        prefill: text the answer continues (Anthropic's last assistant message); appended
            after the generation prompt and not repeated in the answer.
        n: choices per prompt.
        max_tokens: tokens to generate at most, or None.
        default_max_tokens: the dialect's default of ``max_tokens`` (None: the server's).
        stop: strings that end a choice, never part of the answer.
        sampling: sampling options.
        tools: functions the model may call.
        tool_choice: how it may call them.
        parallel_tool_calls: whether one answer may hold several calls.
        response_format: the answer's shape.
        thinking: switch a thinking model's reasoning on (True) or off (False) where its
            template allows; None leaves the model's default.
        echo: answers start with their prompt (completions).
        param: the request parameter holding the prompt ("messages", "prompt"), named in errors.
    """

    model: str | None
    turns: list[Turn] | None = None
    prompts: list[str | list[int]] | None = None
    prefix_ids: list[int] = field(default_factory=list)
    prefill: str = ""
    n: int = 1
    max_tokens: int | None = None
    default_max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: ToolChoice = ToolChoice()
    parallel_tool_calls: bool = True
    response_format: ResponseFormat = ResponseFormat()
    thinking: bool | None = None
    echo: bool = False
    param: str = "messages"
