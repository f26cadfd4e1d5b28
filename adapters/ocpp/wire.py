"""Glue for the ``ocpp`` package shared by the central system and the charger simulator."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar, cast

from ocpp.exceptions import OCPPError  # type: ignore[import-untyped]
from ocpp.routing import on  # type: ignore[import-untyped]

__all__ = ["WireLog", "on_action"]

_F = TypeVar("_F", bound=Callable[..., Any])


class WireLog(logging.LoggerAdapter[logging.Logger]):
    """The ``ocpp`` package's logger, tamed for a gateway with many chargers.

    The package logs every frame at INFO (here: DEBUG) and every CALLERROR it answers with a
    traceback at ERROR. A peer's malformed message is the peer's fault, not ours: it is logged
    as one WARNING line. Any other exception (a bug in our handlers) keeps its traceback.
    """

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if level == logging.INFO:
            level = logging.DEBUG
        elif level >= logging.ERROR and kwargs.get("exc_info"):
            error = sys.exc_info()[1]
            if isinstance(error, OCPPError):
                level, kwargs["exc_info"] = logging.WARNING, False
                args = (*args, error)
                msg = f"{msg}: %s"
        super().log(level, msg, *args, **kwargs)


def on_action(action: str) -> Callable[[_F], _F]:
    """The ocpp package's handler decorator, typed."""
    return cast("Callable[[_F], _F]", on(action))
