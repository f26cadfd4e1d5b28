"""Plumbing shared by the benchmarks: processes, CPU sampling, percentiles, output.

Each benchmark is one module run three ways (orchestrator, worker, child); these helpers are the
parts that do not depend on what is measured. Every wait here is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import logging
import os
import platform
import pstats
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, Awaitable
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


# =============================================================================== output


def arg_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of ``python -m module``, with the module's docstring as its description."""
    return argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def setup_logging() -> None:
    """Warnings and worse on stderr, stamped with the time and the process id."""
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )


def child_env() -> dict[str, str]:
    """This environment with the repository first on ``PYTHONPATH``, for ``python -m bench.…``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def emit(obj: dict[str, Any]) -> None:
    """Write one JSON line on stdout (the child/worker protocol) and flush it."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def print_command(module: str) -> None:
    """Print how this run was started: ``command: python -m MODULE ARGS…``."""
    print(f"command: {shlex.join([Path(sys.executable).name, '-m', module])}", end="")
    print(" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")


def cpu_model(unknown: str = "unknown CPU") -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else the platform's, else ``unknown``."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or unknown


def machine_summary() -> str:
    """``CPU, nproc=N, load avg a b c; python=X (impl) OS arch``."""
    return (
        f"{cpu_model()}, nproc={os.cpu_count()}, load avg "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; python={platform.python_version()} "
        f"({platform.python_implementation()}) {platform.system()} {platform.machine()}"
    )


def fmt(value: object, spec: str = "") -> str:
    """``format(value, spec)``, or ``n/a`` for a missing figure."""
    if value is None:
        return "n/a"
    return format(value, spec)


def write_results(path: str, results: list[dict[str, Any]], *, cpu: bool, **extra: Any) -> None:
    """Write ``{"meta": …, "results": results, **extra}`` as JSON to ``path`` and say so."""
    meta: dict[str, Any] = {"argv": sys.argv, "nproc": os.cpu_count()}
    if cpu:
        meta["cpu"] = cpu_model()
    meta["python"] = platform.python_version()
    meta["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    Path(path).write_text(json.dumps({"meta": meta, "results": results, **extra}, indent=2))
    print(f"\nwrote {path}")


# =============================================================================== figures


def pct(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank, 0 < q < 1) of ``values``; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_s(proc: int | psutil.Process) -> float:
    """User + system CPU seconds of one process (a PID or a ``psutil.Process``)."""
    times = (proc if isinstance(proc, psutil.Process) else psutil.Process(proc)).cpu_times()
    return float(times.user + times.system)


def rss_bytes() -> int:
    """Resident set size of this process."""
    return int(psutil.Process().memory_info().rss)


def profile_report(profiler: cProfile.Profile, top: int) -> str:
    """The ``top`` entries of a profile by own time, then by cumulative time."""
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


# =============================================================================== processes


def run(coro: Awaitable[Any]) -> Any:
    """Run an awaitable to completion in a fresh event loop."""

    async def main() -> Any:
        return await coro

    return asyncio.run(main())


def stop_tree(proc: subprocess.Popen[str]) -> None:
    """Stop a worker that overran, and anything it started (by PID, children first)."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.terminate()
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def run_worker(cmd: list[str], bound_s: float, what: str) -> dict[str, Any]:
    """Run a worker process that prints its result as a last JSON line, within ``bound_s``.

    Returns that result with ``worker_wall_s`` added, or ``{"error": …}`` (``what`` names the
    worker in the message). The worker and its children are stopped if it overruns.
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=REPO, env=child_env(), text=True)
    try:
        out, _ = proc.communicate(timeout=bound_s)
    except subprocess.TimeoutExpired:
        stop_tree(proc)
        return {"error": f"{what} exceeded {bound_s:.0f} s"}
    except BaseException:
        stop_tree(proc)
        raise
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"{what} exit code {proc.returncode}"}
    result: dict[str, Any] = json.loads(lines[-1])
    result["worker_wall_s"] = round(time.monotonic() - t0, 1)
    print(f"    done in {result['worker_wall_s']} s", flush=True)
    return result


async def start_child(
    module: str,
    args: list[str],
    *,
    ready_timeout_s: float,
    stop_timeout_s: float,
    limit: int | None = None,
    name: str | None = None,
) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    """Start ``python -m module args…`` with piped stdin/stdout; wait for its JSON ready line.

    Returns the process and the ready line. If the line does not come within
    ``ready_timeout_s`` (or the child exits first), the child is stopped and the error raised;
    ``name`` (default: ``module``) names the child in that error. ``limit`` is the stdout
    reader's line limit.
    """
    kwargs: dict[str, Any] = {} if limit is None else {"limit": limit}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
        env=child_env(),
        **kwargs,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(ready_timeout_s):
            line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{name or module} child exited with {await proc.wait()}")
        ready: dict[str, Any] = json.loads(line)
    except BaseException:
        await stop_child(proc, stop_timeout_s)
        raise
    return proc, ready


async def stop_child(proc: asyncio.subprocess.Process, timeout_s: float) -> None:
    """Ask a child to quit (``{"op": "quit"}`` and EOF on stdin); terminate, then kill, if slow."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(OSError):
        assert proc.stdin is not None
        proc.stdin.write(b'{"op": "quit"}\n')
        await proc.stdin.drain()
        proc.stdin.close()
    try:
        async with asyncio.timeout(timeout_s):
            await proc.wait()
    except TimeoutError:
        proc.terminate()
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def read_commands(deadline: float) -> AsyncGenerator[dict[str, Any], None]:
    """In a child: the JSON commands on stdin until ``quit``, EOF or ``deadline`` (monotonic)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while time.monotonic() < deadline:
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                line = await reader.readline()
        except TimeoutError:
            return
        if not line:  # the parent went away
            return
        msg: dict[str, Any] = json.loads(line)
        if msg.get("op") == "quit":
            return
        yield msg
