"""asyncio helpers shared by the long-running loops."""

from __future__ import annotations

import asyncio


async def wait_inside_task_group() -> None:
    """Park the body of an ``async with TaskGroup()`` whose tasks run until one fails.

    On Python 3.11 a task group whose body has already finished leaks one cancellation on its
    parent task when a child fails (the parent is cancelled after ``__aexit__`` did its uncancel
    bookkeeping), so the parent later looks "cancelling" forever. Waiting in the body instead
    keeps that bookkeeping right: the failure cancels the body, and ``__aexit__`` undoes it.
    """
    await asyncio.get_running_loop().create_future()


def raise_if_cancelling() -> None:
    """Re-raise a cancellation that a library swallowed.

    On Python 3.11, ``asyncio.wait_for`` (used inside aiomqtt and pymodbus) can swallow a
    ``CancelledError`` when the awaited operation completes at the same moment. The task still
    counts the pending cancellation, so loops check it after each such call; otherwise a shutdown
    could hang forever on the next wait.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
