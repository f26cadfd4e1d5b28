"""asyncio helpers shared by the long-running loops."""

from __future__ import annotations

import asyncio


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
