"""Where the envoy captures live: ``<repo>/../shared/fixtures/sep2-envoy`` (read-only in CI)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import pytest

REPO_ROOT: Final = Path(__file__).resolve().parents[3]
FIXTURE_DIR: Final = (REPO_ROOT / ".." / "shared" / "fixtures" / "sep2-envoy").resolve()

# The one capture that is not XML on purpose: the truncated body envoy rejected with 400.
MALFORMED: Final = frozenset({"req-rejected-edev-malformed.xml"})


def fixture_names() -> list[str]:
    """Every ``*.xml`` capture, root folder first, as paths relative to FIXTURE_DIR."""
    if not FIXTURE_DIR.is_dir():
        return []
    root = sorted(p.name for p in FIXTURE_DIR.glob("*.xml"))
    v13 = sorted(f"v1.3/{p.name}" for p in (FIXTURE_DIR / "v1.3").glob("*.xml"))
    return root + v13


def well_formed_names() -> list[str]:
    return [n for n in fixture_names() if Path(n).name not in MALFORMED]


def load(name: str) -> bytes:
    """The bytes of one capture; fails in CI (env ``CI`` set) and skips elsewhere if absent."""
    path = FIXTURE_DIR / name
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"envoy fixture missing in CI: {path}")
        pytest.skip(f"envoy fixtures not available at {FIXTURE_DIR}")
    return path.read_bytes()
