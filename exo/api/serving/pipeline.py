"""The one generation pipeline of every dialect.

``prepare`` takes a ``GenerateRequest`` to a ``Job``: the model resolved (fallback included),
the prompt rendered with the model's chat template (tools, tool history, thinking switch) and
tokenized off the event loop, the token budget, and each choice's ``GenerationOptions``
(sampling, ``logit_bias`` and the grammar of a response format or of tool calls).
``generate`` runs a job on the node and yields ``Update`` values: per choice, new content,
reasoning, tool-call pieces and log-probabilities, and how it finished. Every path out of it
(finish, stop string, error, the consumer closing it on a client disconnect) closes the
``TokenQueue``, which ends the request on every node of the ring.

A dialect translates its request into a ``GenerateRequest``, calls these two, and frames the
updates (SSE, NDJSON or one JSON object); errors are ``APIError`` values it answers in its own
format.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from exo.api.chat_api.state import APIState
from exo.api.chat_api.utils import APIError, new_id, unix_time
from exo.api.serving.reasoning import ReasoningSplitter, prompt_opens_thinking
from exo.api.serving.request import GenerateRequest, ToolCall
from exo.api.serving.resolve import (
    api_error_from, check_token_ids, encode_prompt, get_tokenizer, model_defaults, require_text_model, resolve_max_tokens,
    resolve_model,
)
from exo.api.serving.token_handler import ChoiceTextStream, TokenLogprob
from exo.api.serving.token_queue import ChoiceEvent, TokenQueue
from exo.api.serving.tool_parser import ToolCallDelta, ToolCallParser
from exo.api.serving.tools import ToolSyntax, check_tools, template_turns, tool_grammar, tool_syntax
from exo.inference.generation import SEED_MIN, GenerationOptions
from exo.inference.tokenizers import Tokenizer
from exo.models.sources import ModelCard
from exo.orchestration.errors import GenerationError

logger = logging.getLogger(__name__)


@dataclass
class Update:
    """What one step adds to one choice.

    Attributes:
        index: the choice's index.
        content: new answer text.
        reasoning: new reasoning text.
        tool_calls: new pieces of calls.
        logprobs: log-probabilities of the tokens released with this step.
        finish_reason: None while generating; "stop" (EOS or a stop string), "length" (the
            token budget) or "tool_calls" (the answer ended after calls) on its last update.
        stop_string: the stop string that ended the choice, or None.
    """

    index: int
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_string: str | None = None

    @property
    def is_empty(self) -> bool:
        """Nothing new and not the last update (a stream sends no chunk for it)."""
        return not (self.content or self.reasoning or self.tool_calls or self.logprobs or self.finish_reason)


@dataclass
class Choice:
    """One generation of a job and what it has produced so far.

    Attributes:
        index: the choice's index (prompt index x n + i).
        prompt_ids: its prompt's token ids.
        options: its generation options.
        prefix: text its answer starts with (a completion's echoed prompt).
        content, reasoning: the answer's text and reasoning so far.
        logprobs: the log-probabilities released so far.
        finish_reason, stop_string: how it ended (see ``Update``).
    """

    index: int
    prompt_ids: list[int]
    options: GenerationOptions
    text: ChoiceTextStream
    splitter: ReasoningSplitter | None = None
    parser: ToolCallParser | None = None
    prefix: str = ""
    content: str = ""
    reasoning: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_string: str | None = None

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls read from the answer so far (complete ones, and the last maybe not)."""
        return list(self.parser.calls) if self.parser is not None else []

    @property
    def completion_tokens(self) -> int:
        """Tokens generated for this choice (the EOS token not counted)."""
        return self.text.completion_tokens

    def step(self, text: str, logprobs: list[TokenLogprob], finish: str | None) -> Update:
        """Pass released answer text through reasoning and tool-call parsing; ``finish`` ends it."""
        u = Update(self.index, logprobs=logprobs)
        reasoning, content = self.splitter.feed(text) if self.splitter is not None else ("", text)
        if finish is not None and self.splitter is not None:
            r, c = self.splitter.finish()
            reasoning, content = reasoning + r, content + c
        if self.parser is not None:
            content, u.tool_calls = self.parser.feed(content)
            if finish is not None:
                content += self.parser.finish()
        u.content, u.reasoning = content, reasoning
        if finish == "stop" and self.parser is not None and self.parser.calls:
            finish = "tool_calls"
        u.finish_reason, u.stop_string = finish, self.text.stop_string if finish is not None else None
        self.content += content
        self.reasoning += reasoning
        self.logprobs.extend(logprobs)
        self.finish_reason, self.stop_string = finish, u.stop_string
        return u


@dataclass
class Job:
    """A prepared request: everything ``generate`` needs and what it has produced.

    Attributes:
        id: the response id.
        created: Unix seconds.
        card: the model that serves it (a fallback's when one does).
        tokenizer: its tokenizer.
        choices: one per generation.
        prompt_tokens: tokens of all prompts (each counted once).
        cached_tokens: of those, the most that one choice took from the prompt cache instead
            of prefilling them.
        received, started, first_token, finished: ``time.perf_counter`` seconds of the
            request's arrival, of asking the node, of the first token and of the end.
    """

    id: str
    created: int
    card: ModelCard
    tokenizer: Tokenizer
    choices: list[Choice]
    prompt_tokens: int
    received: float
    cached_tokens: int = 0
    started: float = 0.0
    first_token: float | None = None
    finished: float | None = None

    @property
    def completion_tokens(self) -> int:
        """Tokens generated over all choices (usage)."""
        return sum(c.completion_tokens for c in self.choices)


async def prepare(state: APIState, req: GenerateRequest, id_prefix: str, received: float | None = None,
                  card: ModelCard | None = None) -> Job:
    """Resolve, render, tokenize and plan ``req``.

    Args:
        card: the model, when the dialect resolved ``req.model`` itself (Ollama's tagged names);
            otherwise ``resolve_model`` resolves it here, fallback included.

    Raises:
        APIError: 404 unknown model; 400 a bad parameter (named: a tool, the tool choice, a
            tool result without its call, a schema the grammar library rejects, a token id
            outside the vocabulary, an empty prompt, an option out of range); 413 a prompt
            longer than the model's context; 503 no node can serve the model.
    """
    received = time.perf_counter() if received is None else received
    card = card or await resolve_model(state, req.model)
    require_text_model(card)
    tokenizer = await get_tokenizer(state, card.model_id)
    check_tools(req.tools, req.tool_choice, req.turns)
    calls_wanted = bool(req.tools) and req.tool_choice.mode != "none"
    if calls_wanted and req.response_format.kind != "text":
        raise APIError(400, "Invalid value for 'response_format': a JSON response format cannot be combined with "
                            "tool calls (use tool_choice 'none', or no tools)", param="response_format",
                       code="unsupported_parameter")
    syntax = tool_syntax(tokenizer) if req.turns is not None and (
        req.tools or any(t.role == "tool" or t.tool_calls for t in req.turns)) else None
    grammar = await _grammar(req, tokenizer, syntax if calls_wanted else None)
    # constrained from the first token (a JSON answer, forced calls): no free text, no reasoning
    constrained = grammar is not None and not (calls_wanted and req.tool_choice.mode == "auto")
    check_token_ids(tokenizer, req.prefix_ids, "context")
    prompts: list[tuple[list[int], str, str]] = []  # (token ids, echoed prefix, parameter)
    opens_thinking = False
    if req.turns is not None:
        kwargs = {}
        if req.thinking is not None:
            kwargs["enable_thinking"] = req.thinking
        elif constrained:
            kwargs["enable_thinking"] = False  # the grammar allows no reasoning before the answer
        turns = template_turns(req.turns, req.tools, syntax)
        tools = [t.as_openai() for t in req.tools] if syntax is not None and syntax.template_renders_tools and req.tools else None
        rendered: list[str] = []

        def render() -> str:
            text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tools=tools, **kwargs)
            rendered.append(text)
            return text + req.prefill

        ids = list(req.prefix_ids) + await encode_prompt(tokenizer, render, card.context_length, req.param)
        opens_thinking = prompt_opens_thinking(rendered[0])
        prompts.append((ids, "", req.param))
    else:
        for i, p in enumerate(req.prompts or []):
            param = req.param if len(req.prompts or []) == 1 else f"{req.param}[{i}]"
            if isinstance(p, str):
                ids = await encode_prompt(tokenizer, functools.partial(str, p), card.context_length, param)
                text = p
            else:
                check_token_ids(tokenizer, p, param)
                ids, text = list(p), tokenizer.decode(p)
            ids = (list(req.prefix_ids) if i == 0 else []) + ids
            if not ids:
                raise APIError(400, f"Invalid value for '{param}': the prompt is empty", param=param, code="invalid_value")
            prompts.append((ids, text if req.echo else "", param))
    check_token_ids(tokenizer, req.sampling.logit_bias, "logit_bias")  # the biases' range: GenerationOptions
    default = req.default_max_tokens if req.default_max_tokens is not None else state.defaults.max_tokens
    # a call's trigger that is one special token must reach the parser as text
    shown = [syntax.special_trigger] if calls_wanted and syntax is not None and syntax.special_trigger is not None else []
    choices: list[Choice] = []
    for p_index, (ids, prefix, param) in enumerate(prompts):
        max_tokens = resolve_max_tokens(req.max_tokens, default, len(ids), card.context_length, param)
        for i in range(req.n):
            index = p_index * req.n + i
            choices.append(Choice(
                index, ids, _options(state, req, tokenizer, max_tokens, i, grammar),
                ChoiceTextStream(tokenizer, req.stop, req.sampling.logprobs, show_tokens=shown), prefix=prefix,
                splitter=ReasoningSplitter(inside=opens_thinking) if req.turns is not None and not constrained else None,
                parser=ToolCallParser(syntax) if calls_wanted and syntax is not None else None,
            ))
    return Job(new_id(id_prefix), unix_time(), card, tokenizer, choices, sum(len(p[0]) for p in prompts), received)


async def _grammar(req: GenerateRequest, tokenizer: Tokenizer, syntax: ToolSyntax | None) -> str | None:
    """The llguidance grammar of the answer (tool calls, or a JSON response format), checked
    against the tokenizer off the event loop; None when the answer is free.

    Raises:
        APIError: 400 naming ``tools`` or ``response_format`` when the grammar library
            rejects a schema.
    """
    if syntax is None and req.response_format.kind == "text":
        return None
    from exo.inference.grammar import json_schema_grammar, validate_grammar

    if syntax is not None:
        param = "tools"
        build = functools.partial(tool_grammar, req.tools, req.tool_choice, req.parallel_tool_calls, syntax)
    else:
        param = "response_format"
        schema = req.response_format.schema if req.response_format.kind == "json_schema" else None
        build = functools.partial(json_schema_grammar, schema)

    def run() -> str:
        grammar = build()
        validate_grammar(grammar, tokenizer)
        return grammar

    try:
        return await asyncio.to_thread(run)
    except ValueError as e:
        raise APIError(400, f"Invalid value for '{param}': {e}", param=param, code="invalid_value") from None


def _options(state: APIState, req: GenerateRequest, tokenizer: Tokenizer, max_tokens: int, index: int,
             grammar: str | None) -> GenerationOptions:
    """Choice ``index``'s options: request value > the model's defaults; seed + index."""
    d = model_defaults(state, tokenizer)
    s = req.sampling
    try:
        return GenerationOptions(
            max_tokens=max_tokens,
            temperature=s.temperature if s.temperature is not None else d.temperature,
            top_p=s.top_p if s.top_p is not None else d.top_p,
            top_k=max(s.top_k if s.top_k is not None else d.top_k, 0),
            seed=(s.seed + index - SEED_MIN) % 2**64 + SEED_MIN if s.seed is not None else None,
            stop_token_ids=tuple(tokenizer.eos_token_ids),
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            logprobs=s.logprobs,
            top_logprobs=s.top_logprobs if s.logprobs else 0,
            grammar=grammar,
            logit_bias=tuple(sorted(s.logit_bias.items())),
        )
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None


async def generate(state: APIState, job: Job) -> AsyncIterator[Update]:
    """Generate every choice of ``job`` on the node, yielding updates until each has finished.

    Closing the iterator early (a client disconnect) ends the request on the ring.

    Raises:
        APIError: 504 when no token comes within ``state.response_timeout`` seconds; the
            mapped error of a failed generation (404 unknown model, 503 no node, 500 ...).
    """
    node = state.node
    factories = [
        functools.partial(node.generate, job.card.model_id, c.prompt_ids, c.options, f"{job.id}-{c.index}")
        for c in job.choices
    ]
    state.active_requests.add(job.id)
    job.started = time.perf_counter()
    logger.debug("request %s: %d choice(s) of %s, %d prompt tokens", job.id, len(job.choices), job.card.model_id,
                 job.prompt_tokens)
    try:
        async with TokenQueue(factories, name=job.id) as queue:
            remaining = len(job.choices)
            while remaining:
                try:
                    ev = await queue.get(state.response_timeout)
                except asyncio.TimeoutError:
                    raise APIError(504, f"no token from the cluster within {state.response_timeout:g} s",
                                   code="timeout") from None
                try:
                    update = _advance(job, queue, ev)
                except Exception as e:
                    raise api_error_from(e) from None
                if update is None:
                    continue
                if update.finish_reason is not None:
                    remaining -= 1
                    if not remaining:
                        job.finished = time.perf_counter()
                yield update
    finally:
        state.active_requests.discard(job.id)


def _advance(job: Job, queue: TokenQueue, ev: ChoiceEvent) -> Update | None:
    """Advance the choice of ``ev``; its update, or None for a choice that already finished.

    Raises:
        the generator's exception, or GenerationError for a result carrying an error.
    """
    choice = job.choices[ev.index]
    if choice.finish_reason is not None:  # e.g. what a choice closed at a stop string still sent
        return None
    if ev.error is not None:
        raise ev.error
    result = ev.result
    if result is None:  # the generator ended without a finish reason
        delta, finish = choice.text.finish(), "stop"
    elif result.error is not None or result.finish_reason == "error":
        raise GenerationError(result.error or "generation failed")
    else:
        job.cached_tokens = min(max(job.cached_tokens, result.cached_tokens), job.prompt_tokens)
        if result.tokens and job.first_token is None:
            job.first_token = time.perf_counter()
        delta = choice.text.add_result(result)
        finish = None
        if delta.stopped:
            finish = "stop"
            queue.cancel_choice(ev.index)
        elif result.finish_reason is not None:
            tail = choice.text.finish()
            delta.text += tail.text
            delta.logprobs.extend(tail.logprobs)
            finish = "length" if result.finish_reason == "length" else "stop"
    return choice.step(delta.text, delta.logprobs, finish)


async def collect(updates: AsyncIterator[Update]) -> None:
    """Run ``updates`` to the end (a non-streamed answer); the job's choices hold the result."""
    async for _ in updates:
        pass
