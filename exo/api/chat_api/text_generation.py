"""One generation as the Ollama and Anthropic dialects need it: text steps and how it ended.

The same internal request as the OpenAI handlers: ``Node.generate`` fed through a
``TokenQueue``, token ids turned into text by ``ChoiceTextStream`` (UTF-8 safe, stop strings
held back and cut), errors mapped by ``serving.api_error_from``. Only the framing of
the answer differs per dialect, so this module yields plain ``TextStep`` values.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from exo.api.chat_api.serving import api_error_from
from exo.api.chat_api.state import APIState
from exo.api.chat_api.token_handler import ChoiceTextStream, find_stop
from exo.api.chat_api.token_queue import TokenQueue
from exo.api.chat_api.utils import APIError
from exo.inference.generation import GenerationOptions
from exo.inference.tokenizers import Tokenizer
from exo.orchestration.errors import GenerationError

logger = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    """Counts and times (``time.perf_counter`` seconds) of one generation.

    Attributes:
        prompt_tokens: tokens of the prompt.
        completion_tokens: tokens generated (the EOS token is not counted).
        started: when the node was asked to generate.
        first_token: when the first token arrived, or None.
        finished: when the generation ended, or None.
        token_ids: the generated token ids.
    """

    prompt_tokens: int
    completion_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: float | None = None
    token_ids: list[int] = field(default_factory=list)


@dataclass
class TextStep:
    """What one step of a generation adds.

    Attributes:
        text: new text for the client (may be empty).
        finish_reason: None while generating; "stop" (EOS or a stop string) or "length"
            (the token limit) on the last step.
        stop_string: the stop string that ended the generation, or None.
    """

    text: str
    finish_reason: str | None = None
    stop_string: str | None = None


async def collect_text(first: TextStep, steps: AsyncIterator[TextStep]) -> tuple[str, TextStep]:
    """The whole text of a non-streamed generation: ``first`` and the rest of ``steps`` up to
    the step with a ``finish_reason``, which is returned with the text."""
    texts, step = [first.text], first
    while step.finish_reason is None:
        step = await steps.__anext__()
        texts.append(step.text)
    return "".join(texts), step


def matched_stop(tokenizer: Tokenizer, token_ids: Sequence[int], stops: Sequence[str]) -> str | None:
    """The stop string that ended a generation of ``token_ids`` (the earliest in the decoded
    text; the first listed on a tie, as ``ChoiceTextStream`` cuts), or None."""
    text = tokenizer.decode(list(token_ids))
    at = find_stop(text, stops)
    if at is None:
        return None
    return next(s for s in stops if s and text.startswith(s, at))


async def generate_text(state: APIState, model_id: str, tokenizer: Tokenizer, prompt_ids: list[int],
                        options: GenerationOptions, stops: Sequence[str], request_id: str,
                        stats: GenerationStats) -> AsyncIterator[TextStep]:
    """Generate on the node, yielding text steps until the one with a ``finish_reason``.

    Closing the iterator early (client disconnect) ends the request on the ring.

    Raises:
        APIError: 504 when no token comes within ``state.response_timeout`` seconds; the
            mapped error of a failed generation (404 unknown model, 503 no node, 500 ...).
    """
    factory = functools.partial(state.node.generate, model_id, prompt_ids, options, request_id)
    text = ChoiceTextStream(tokenizer, stops)
    state.active_requests.add(request_id)
    try:
        async with TokenQueue([factory], name=request_id) as queue:
            while True:
                try:
                    ev = await queue.get(state.response_timeout)
                except asyncio.TimeoutError:
                    raise APIError(504, f"no token from the cluster within {state.response_timeout:g} s",
                                   code="timeout") from None
                if ev.error is not None:
                    raise api_error_from(ev.error)
                result = ev.result
                if result is None:  # the generator ended without a finish reason
                    step = TextStep(text.finish().text, "stop")
                elif result.error is not None or result.finish_reason == "error":
                    raise api_error_from(GenerationError(result.error or "generation failed"))
                else:
                    if result.tokens and stats.first_token is None:
                        stats.first_token = time.perf_counter()
                    stats.token_ids.extend(result.tokens)
                    delta = text.add_result(result)
                    step = TextStep(delta.text)
                    if delta.stopped:
                        step.finish_reason = "stop"
                        step.stop_string = matched_stop(tokenizer, stats.token_ids, stops)
                        queue.cancel_choice(0)
                    elif result.finish_reason is not None:
                        step.text += text.finish().text
                        step.finish_reason = "length" if result.finish_reason == "length" else "stop"
                stats.completion_tokens = text.completion_tokens
                if step.finish_reason is not None:
                    stats.finished = time.perf_counter()
                yield step
                if step.finish_reason is not None:
                    return
    finally:
        state.active_requests.discard(request_id)
