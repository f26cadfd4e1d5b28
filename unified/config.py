"""The one base of every configuration section, and the error a configuration raises.

Each layer declares its own sections (the core its timing and stores, each adapter family its
endpoint) on this base; the composition root assembles them into the file the operator writes.
Errors name the exact place in the file (``devices[3].ratings.max_charge_kw``) and what is wrong,
because the person reading them is an integrator with a config file open, not a Python developer.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ConfigError", "Section", "describe_errors", "rebase"]


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists every issue found, one per line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"invalid configuration {source}:\n  " + "\n  ".join(problems))
        self.source = source
        self.problems = problems


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def rebase(base: Path, section: BaseModel, *fields: str) -> dict[str, Path]:
    """The relative file paths among ``fields`` of ``section``, made relative to ``base``."""
    out: dict[str, Path] = {}
    for name in fields:
        value = getattr(section, name)
        if isinstance(value, Path) and not value.is_absolute():
            out[name] = base / value
    return out


def describe_errors(exc: ValidationError) -> list[str]:
    problems = []
    errors = exc.errors(include_url=False)
    if len(errors) > 1:
        # pydantic adds "too short" for a list whose only items were invalid: noise, not news.
        errors = [e for e in errors if e["type"] != "too_short"] or errors
    for err in errors:
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        problems.append(f"{loc or '(top level)'}: {err['msg']}")
    return problems
