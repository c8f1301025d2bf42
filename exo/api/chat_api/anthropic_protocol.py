"""The Anthropic Messages API's request bodies (https://docs.anthropic.com/en/api/messages),
validated strictly as Anthropic does, and their translation into the serving layer's
``GenerateRequest``. The handlers and the answers' framing are in ``anthropic_endpoints``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from exo.api.chat_api.parsing import MAX_STOP_STRINGS, STRICT, RequestParamError
from exo.api.serving.request import GenerateRequest, ResponseFormat, Sampling, ToolCall, ToolChoice, ToolSpec, Turn
from exo.inference.generation import SEED_MAX, SEED_MIN



class TextBlockParam(BaseModel):
    """``{"type": "text", "text": ...}`` (``cache_control`` and ``citations`` accepted, unused)."""

    model_config = STRICT
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None
    citations: list[Any] | None = None


class ToolUseBlockParam(BaseModel):
    """An assistant's earlier call: ``{"type": "tool_use", "id", "name", "input"}``."""

    model_config = STRICT
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlockParam(BaseModel):
    """A user's answer to a call: ``{"type": "tool_result", "tool_use_id", "content"}``."""

    model_config = STRICT
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlockParam] = ""
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None

    def text(self) -> str:
        """The result's text (text blocks concatenated)."""
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class ThinkingBlockParam(BaseModel):
    """An assistant's earlier reasoning (``signature`` accepted, not checked)."""

    model_config = STRICT
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


Block = TextBlockParam | ToolUseBlockParam | ToolResultBlockParam | ThinkingBlockParam


class MessageParam(BaseModel):
    """One turn: ``user`` or ``assistant``, with text, tool and thinking blocks."""

    model_config = STRICT
    role: Literal["user", "assistant"]
    content: str | list[Block]

    def text(self) -> str:
        """The message's text (its text blocks concatenated; tool and thinking blocks left out)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(b.text for b in self.content if isinstance(b, TextBlockParam))

    def to_turns(self, index: int) -> list[Turn]:
        """The turns of this message: tool results become ``tool`` turns, in order."""
        param = f"messages[{index}]"
        if isinstance(self.content, str):
            return [Turn(self.role, self.content, param=param)]
        if self.role == "assistant":
            calls = [ToolCall(b.id, b.name, json.dumps(b.input, ensure_ascii=False))
                     for b in self.content if isinstance(b, ToolUseBlockParam)]
            reasoning = "".join(b.thinking for b in self.content if isinstance(b, ThinkingBlockParam)) or None
            return [Turn("assistant", self.text(), calls, reasoning=reasoning, param=param)]
        turns = [Turn("tool", b.text(), tool_call_id=b.tool_use_id, param=f"{param}.content[{j}]")
                 for j, b in enumerate(self.content) if isinstance(b, ToolResultBlockParam)]
        text = self.text()
        if text or not turns:
            turns.append(Turn("user", text, param=param))
        return turns


class ToolParam(BaseModel):
    """A client tool: ``name``, ``description``, ``input_schema`` (server tools are refused)."""

    model_config = STRICT
    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None


class ToolChoiceParam(BaseModel):
    """``{"type": "auto" | "any" | "tool" | "none", "name", "disable_parallel_tool_use"}``."""

    model_config = STRICT
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _name(self) -> "ToolChoiceParam":
        if self.type == "tool" and not self.name:
            raise RequestParamError("name", "tool_choice of type 'tool' needs the tool's name")
        return self


class ThinkingParam(BaseModel):
    """``{"type": "enabled", "budget_tokens"}`` or ``{"type": "disabled"}``."""

    model_config = STRICT
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)


class _MessagesBase(BaseModel):
    model_config = STRICT
    model: str = Field(min_length=1)
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlockParam] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: ThinkingParam | None = None

    @model_validator(mode="after")
    def _check_base(self) -> "_MessagesBase":
        last = self.messages[-1]
        if last.role == "assistant" and last.text() != last.text().rstrip():
            raise RequestParamError("messages", "final assistant content cannot end with trailing whitespace")
        return self

    def system_text(self) -> str | None:
        """The system prompt's text, or None."""
        if self.system is None:
            return None
        return self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)

    def to_generate_request(self) -> GenerateRequest:
        """The request for the serving layer: system first, a last assistant message as the
        prefill the answer continues."""
        turns: list[Turn] = [Turn("system", self.system_text() or "", param="system")] if self.system_text() else []
        for i, m in enumerate(self.messages):
            turns.extend(m.to_turns(i))
        prefill = ""
        if turns[-1].role == "assistant" and not turns[-1].tool_calls:
            prefill = turns.pop().content
        choice = self.tool_choice
        mode = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}[choice.type] if choice else "auto"
        thinking = None if self.thinking is None else self.thinking.type != "disabled"
        return GenerateRequest(
            model=self.model, turns=turns, prefill=prefill,
            tools=[ToolSpec(t.name, t.description or "", t.input_schema, f"tools[{i}]") for i, t in enumerate(self.tools or [])],
            tool_choice=ToolChoice(mode, choice.name if choice else None),  # type: ignore[arg-type]
            parallel_tool_calls=not (choice and choice.disable_parallel_tool_use),
            thinking=thinking if thinking is not None else False,
        )


class MessagesRequest(_MessagesBase):
    """``POST /v1/messages`` body."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)  # exo's extension, as in the OpenAI dialect
    stream: bool | None = None
    output_config: dict[str, Any] | None = None
    container: Any = None
    # accepted and ignored: they cannot change the answer of a local cluster
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    cache_control: dict[str, Any] | None = None
    diagnostics: dict[str, Any] | None = None
    inference_geo: str | None = None
    speed: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None

    @model_validator(mode="after")
    def _check_stops(self) -> "MessagesRequest":
        for s in self.stop_sequences or []:
            if s == "":
                raise RequestParamError("stop_sequences", "stop sequences must not be empty")
        fmt = (self.output_config or {}).get("format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "json_schema"
                                or not isinstance(fmt.get("schema"), dict)):
            raise RequestParamError("output_config.format", 'must be {"type": "json_schema", "schema": {...}}')
        if self.container is not None:
            raise RequestParamError("container", "containers (code execution) are not supported by exo",
                                    code="unsupported_parameter")
        return self


    def to_generate_request(self) -> GenerateRequest:
        """The request for the serving layer, with the sampling and the output format."""
        gen = super().to_generate_request()
        gen.max_tokens = self.max_tokens
        gen.stop = list(self.stop_sequences or [])
        gen.sampling = Sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed)
        fmt = (self.output_config or {}).get("format")
        if fmt is not None:
            gen.response_format = ResponseFormat("json_schema", fmt["schema"])
        return gen


class CountTokensRequest(_MessagesBase):
    """``POST /v1/messages/count_tokens`` body."""


