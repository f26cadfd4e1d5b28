"""Every module of the project is imported before a fuzz test runs.

Hypothesis draws some values from the constants it finds in the local modules loaded so far, so
without this the examples of a fuzz test would depend on which other tests ran before it. The
same selection of tests is deterministic either way; with this, every selection is.
"""

from __future__ import annotations

import importlib
import pkgutil

for _package in (
    "unified",
    "protocols",
    "gateway",
    "adapters",
    "simulators",
    "edge_agent",
    "composition",
    "bench",
):
    _module = importlib.import_module(_package)
    for _info in pkgutil.walk_packages(_module.__path__, prefix=f"{_package}."):
        importlib.import_module(_info.name)
