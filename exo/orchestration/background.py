"""The node's background tasks: one set that every part spawns into, refused once the node is
stopping, cancelled and awaited by ``Node.stop``.

A bare ``asyncio.create_task`` may be garbage-collected mid-flight and its error lost; every
task here is referenced until it ends, and a failure is logged with the task's name.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Coroutine

logger = logging.getLogger(__name__)


class Background:
    """Background tasks of node ``node_id``.

    Attributes:
        stopping: set when the node starts stopping: no task starts after it, and the parts
            refuse new work (ring messages, connections, pulls).
        tasks: the tasks running now.
    """

    def __init__(self, node_id: str):
        self.node_id = node_id
        self.stopping = False
        self.tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine, name: str) -> asyncio.Task | None:
        """Run ``coro`` as a task that ``cancel`` cancels and waits for; once stopping, none is
        started (``cancel`` would neither cancel nor wait for it) and ``coro`` is closed."""
        if self.stopping:
            logger.debug("node %s is stopping: not starting %s", self.node_id, name)
            coro.close()
            return None
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def cancel(self, *others: asyncio.Task | None) -> None:
        """Cancel every task running now and ``others`` (tasks the parts keep themselves), and
        wait for them all to end."""
        tasks = [t for t in [*others, *self.tasks] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
