"""The per-request queue between ``Node.generate`` and a handler.

``TokenQueue``: one request's queue fed by one task per choice iterating ``Node.generate``;
closing a choice (or the whole queue) closes its generator, which cancels the request on
every node of the ring.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from exo.orchestration.request import TokenResult

logger = logging.getLogger(__name__)


@dataclass
class ChoiceEvent:
    """An item of a TokenQueue: a result, an error, or the end of a choice's generator.

    Attributes:
        index: choice index.
        result: a TokenResult, or None.
        error: the exception the generator raised, or None.
        done: the generator ended.
    """

    index: int
    result: TokenResult | None = None
    error: BaseException | None = None
    done: bool = False


GeneratorFactory = Callable[[], Any]  # -> AsyncIterator[TokenResult] (or an awaitable of one)


class TokenQueue:
    """One request's queue of results, fed by one task per choice.

    Use as ``async with TokenQueue(factories) as q: ev = await q.get(timeout)``. Leaving the
    block (normally, on error or on cancellation, e.g. a client disconnect) cancels every
    feeding task, whose ``finally`` closes its generator: the node then ends the request on
    every node of the ring.

    Args:
        factories: one per choice; each returns the choice's ``Node.generate(...)`` iterator.
        name: prefix of the tasks' names (for logs).
    """

    def __init__(self, factories: Sequence[GeneratorFactory], name: str = "request"):
        self._factories = list(factories)
        self._queue: asyncio.Queue[ChoiceEvent] = asyncio.Queue()
        self._tasks: dict[int, asyncio.Task] = {}
        self._name = name

    async def __aenter__(self) -> "TokenQueue":
        for i, make in enumerate(self._factories):
            self._tasks[i] = asyncio.create_task(self._feed(i, make), name=f"{self._name}-choice-{i}")
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def _feed(self, index: int, make: GeneratorFactory) -> None:
        gen: AsyncIterator[TokenResult] | None = None
        try:
            gen = make()
            if inspect.isawaitable(gen):
                gen = await gen
            async for result in gen:  # type: ignore[union-attr]
                self._queue.put_nowait(ChoiceEvent(index, result=result))
            self._queue.put_nowait(ChoiceEvent(index, done=True))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # handed to the consumer, which answers the client
            self._queue.put_nowait(ChoiceEvent(index, error=e))
        finally:
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    logger.exception("closing the generator of %s choice %d failed", self._name, index)

    async def get(self, timeout: float | None) -> ChoiceEvent:
        """The next event of any choice.

        Raises:
            asyncio.TimeoutError: nothing arrived within ``timeout`` seconds (None: no limit).
            asyncio.CancelledError: the reader was cancelled, even in the loop turn an event
                arrived (Python 3.11's ``wait_for`` returned the event then, and a request
                whose client had gone ran on); the event stays queued.
        """
        async with asyncio.timeout(timeout):
            return await self._queue.get()

    def cancel_choice(self, index: int) -> None:
        """Stop choice ``index`` (e.g. at a stop string): its generator is closed in the
        background; ``aclose`` waits for it."""
        task = self._tasks.get(index)
        if task is not None and not task.done():
            task.cancel()

    async def aclose(self) -> None:
        """Cancel every feeding task and wait until all generators are closed."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        for t in tasks:
            if not t.cancelling():
                t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
