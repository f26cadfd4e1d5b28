"""What the fuzz tests share: bounded deterministic settings, hostile values, mutations of valid
documents, a tally that fails a test that ran no examples, and a bridge to the event loop.

Every fuzz test runs a fixed number of examples chosen from a fixed seed (``derandomize``, no
example database), so CI sees the same inputs every run and a failure reproduces locally. The
examples run against real components started on the test's event loop: hypothesis drives them
from a worker thread (:func:`drive`), each example submitted to the loop and awaited there.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

T = TypeVar("T")


def fuzz_settings(max_examples: int) -> settings:
    """Bounded and deterministic: the same examples every run, no deadline (CI is slow)."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
    )


class Tally:
    """Counts the examples a test ran and what became of them; :meth:`check` fails a test that
    ran fewer than it should (a strategy that silently generates nothing)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.outcomes: Counter[str] = Counter()
        self.examples = 0
        self._started = time.monotonic()

    def __call__(self, outcome: str) -> None:
        self.examples += 1
        self.outcomes[outcome] += 1

    def check(self, minimum: int) -> None:
        elapsed = time.monotonic() - self._started
        print(  # the per-path figures in the test log (pytest -s or -rP)
            f"fuzz[{self.name}]: {self.examples} examples in {elapsed:.1f} s: "
            + ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))
        )
        assert self.examples >= minimum, (self.name, self.examples, dict(self.outcomes))


class LoopBridge:
    """Runs coroutines on the test's event loop from hypothesis' worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)


async def drive(test: Callable[[], None]) -> None:
    """Run a hypothesis test (already decorated with ``@given``) in a worker thread, so its
    examples can use :class:`LoopBridge` against components running on this loop."""
    await asyncio.to_thread(test)


# --------------------------------------------------------------------------- hostile values

BAD_TIMES: tuple[str, ...] = (
    "9999-12-31T23:00:00-05:00",  # overflows converting to UTC
    "9999-12-31T23:59:59.999999+00:00",
    "0001-01-01T00:00:00+05:00",  # underflows converting to UTC
    "0001-01-01T00:00:00Z",
    "1969-12-31T23:59:59Z",
    "2200-01-01T00:00:00Z",
    "2026-07-01T16:00:00",  # naive
    "2026-02-30T16:00:00Z",
    "2026-07-01T25:00:00Z",
    "2026-07-01T16:00:00+24:00",
    "2026-07-01T16:00:00ZZ",
    "+275760-09-13T00:00:00Z",
    "",
    "now",
)

BAD_NUMBERS: tuple[object, ...] = (
    math.nan,
    math.inf,
    -math.inf,
    1e308,
    -1e308,
    10**400,
    -(10**400),
    2**63,
    -(2**63) - 1,
    5e-324,
    -0.0,
    0,
    -1,
    "1",
    "NaN",
    True,
    None,
)


def json_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """Any JSON value, with the hostile scalars mixed in."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(),
        st.text(max_size=24),
        st.sampled_from(BAD_NUMBERS),
        st.sampled_from(BAD_TIMES),
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def hostile_values() -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(BAD_NUMBERS), st.sampled_from(BAD_TIMES), json_values(4))


def dumps(value: Any) -> bytes:
    """JSON as a careless peer writes it: NaN and Infinity included."""
    return json.dumps(value, allow_nan=True).encode()


# --------------------------------------------------------------------------- mutations

Path = tuple[str | int, ...]


def _paths(value: Any, path: Path = ()) -> Iterator[Path]:
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*path, index))


def _get(doc: Any, path: Path) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def _set(doc: Any, path: Path, value: Any) -> Any:
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


def _delete(doc: Any, path: Path) -> Any:
    if not path:
        return {}
    parent = _get(doc, path[:-1])
    del parent[path[-1]]
    return doc


def nested(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for k in range(depth):
        value = [value] if k % 2 else {"n": value}
    return value


@st.composite
def mutated(draw: st.DrawFn, base: Any, values: st.SearchStrategy[Any] | None = None) -> Any:
    """``base`` (a JSON document, or any tree of dicts and lists) with one to three mutations:
    a value replaced by a hostile one (from ``values``), a key deleted, an unknown key added, a
    value wrapped in nesting, a value turned into its string, a list emptied or repeated."""
    values = hostile_values() if values is None else values
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(doc))))
        current = _get(doc, path)
        op = draw(
            st.sampled_from(("replace", "replace", "delete", "extra", "nest", "retype", "repeat"))
        )
        if op == "replace":
            doc = _set(doc, path, draw(values))
        elif op == "delete":
            doc = _delete(doc, path)
        elif op == "extra" and isinstance(current, dict):
            current[draw(st.text(max_size=12))] = draw(json_values(3))
        elif op == "nest":
            doc = _set(doc, path, nested(draw(st.integers(1, 40)), current))
        elif op == "retype":
            doc = _set(doc, path, str(current) if not isinstance(current, str) else [current])
        elif op == "repeat" and isinstance(current, list):
            doc = _set(doc, path, current * draw(st.integers(0, 3)))
    return doc


@st.composite
def corrupted(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with its bytes damaged: truncated, a byte flipped, bytes inserted or a slice
    repeated."""
    if not data:
        return draw(st.binary(max_size=16))
    at = draw(st.integers(0, len(data) - 1))
    op = draw(st.sampled_from(("truncate", "flip", "insert", "repeat")))
    if op == "truncate":
        return data[:at]
    if op == "flip":
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    if op == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    end = draw(st.integers(at, min(len(data), at + 32)))
    return data[:end] + data[at:end] * draw(st.integers(2, 20)) + data[end:]


def deep_json(max_depth: int) -> st.SearchStrategy[bytes]:
    """Nesting at the byte level, up to ``max_depth`` (past the parser's recursion limit)."""
    return st.builds(
        lambda depth, opener, inner: (opener * depth) + inner,
        st.integers(1, max_depth),
        st.sampled_from((b"[", b'{"a":', b'{"command_id":"c1","x":[')),
        st.sampled_from((b"", b"1", b"]", b"}")),
    )


def json_payloads(
    valid: Sequence[Any], *, max_depth: int = 100_000, max_raw: int = 256
) -> st.SearchStrategy[bytes]:
    """Payloads for a JSON decoder: the valid documents, structured mutations of them (twice
    as likely), byte-level damage, arbitrary JSON, raw bytes and deep nesting."""
    docs = st.sampled_from(list(valid))
    return st.one_of(
        docs.map(dumps),
        docs.flatmap(mutated).map(dumps),
        docs.flatmap(mutated).map(dumps),
        docs.map(dumps).flatmap(corrupted),
        json_values().map(dumps),
        st.binary(max_size=max_raw),
        deep_json(max_depth),
    )


# --------------------------------------------------------------------------- XML mutations


def well_formed_xml(body: bytes) -> bool:
    try:
        ET.fromstring(body)  # trusted input: our own captures and renderings
    except ET.ParseError:
        return False
    return True


def _rename(element: ET.Element, ns: str | None, local: str | None) -> None:
    if element.tag[:1] == "{":
        old_ns, _, old_local = element.tag[1:].partition("}")
    else:
        old_ns, old_local = "", element.tag
    ns = old_ns if ns is None else ns
    local = old_local if local is None else local
    element.tag = f"{{{ns}}}{local}" if ns else local


@st.composite
def xml_mutated(
    draw: st.DrawFn,
    body: bytes,
    *,
    texts: Sequence[str],
    names: Sequence[str],
    namespaces: Sequence[str],
    attributes: Sequence[str],
    nest_ns: str,
    typed: Mapping[str, Sequence[str]] | None = None,
) -> bytes:
    """``body`` (a well-formed XML document) with one to three element-level mutations: a
    hostile text or attribute, an element removed, repeated, renamed or moved to another
    namespace, or nesting added under one. ``typed`` gives texts by element name that its type
    still allows (a far-future ``date-time``), so many mutations pass a schema and reach the
    code behind it."""
    root = ET.fromstring(body)
    for _ in range(draw(st.integers(1, 3))):
        elements = list(root.iter())
        parents = [e for e in elements if len(e)]
        target = draw(st.sampled_from(elements))
        op = draw(
            st.sampled_from(
                ("text", "text", "text", "attr", "remove", "repeat", "rename", "ns", "nest")
            )
        )
        local = target.tag.rpartition("}")[2]
        if op == "text" and typed and local in typed and draw(st.integers(0, 3)):
            target.text = draw(st.sampled_from(typed[local]))
        elif op == "text":
            target.text = draw(st.sampled_from(texts) | st.text(max_size=12))
            for child in list(target):
                if draw(st.booleans()):
                    target.remove(child)
        elif op == "attr":
            target.set(draw(st.sampled_from(attributes)), draw(st.sampled_from(texts)))
        elif op in ("remove", "repeat") and parents:
            parent = draw(st.sampled_from(parents))
            child = draw(st.sampled_from(list(parent)))
            if op == "remove":
                parent.remove(child)
            else:
                for _ in range(draw(st.integers(1, 3))):
                    parent.append(copy.deepcopy(child))
        elif op == "rename":
            _rename(target, None, draw(st.sampled_from(names)))
        elif op == "ns":
            _rename(target, draw(st.sampled_from(namespaces)), None)
        elif op == "nest":
            inner = target
            for _ in range(draw(st.integers(1, 40))):
                inner = ET.SubElement(inner, f"{{{nest_ns}}}n")
    return ET.tostring(root, encoding="utf-8")
