"""Headless Chromium driven over the DevTools protocol, and a PNG reader: no new dependency.

Chromium runs with a throw-away profile in its own process group, which is killed (and the
profile removed) however the test ends. Waits are on conditions evaluated in the page, never on
fixed sleeps. Tests that need it call :func:`require_chromium`: without Chromium they skip, or
fail when ``CI`` is set (as broker tests do without mosquitto).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import struct
import tempfile
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    found = chromium_path()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium is not installed: .ci/run must install it")
        pytest.skip("chromium not installed")
    return found


class Chromium:
    """One headless browser with one page, at a fixed viewport."""

    def __init__(self, *, width: int = 1280, height: int = 900, start_timeout_s: float = 30.0):
        self.width = width
        self.height = height
        self.start_timeout_s = start_timeout_s
        self._profile: str | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._ws: Any = None
        self._ids = itertools.count(1)

    async def __aenter__(self) -> Chromium:
        binary = require_chromium()
        self._profile = tempfile.mkdtemp(prefix="derms-chromium-")
        self._process = await asyncio.create_subprocess_exec(
            binary,
            "--headless=new",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
            f"--user-data-dir={self._profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--window-size={self.width},{self.height}",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # its own process group: all its helpers end with it
        )
        try:
            port = await self._debugging_port()
            self._ws = await websockets.connect(await self._page_socket(port), max_size=None)
            await self.call(
                "Emulation.setDeviceMetricsOverride",
                width=self.width,
                height=self.height,
                deviceScaleFactor=1,
                mobile=False,
            )
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def _debugging_port(self) -> int:
        assert self._profile is not None
        assert self._process is not None
        marker = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.returncode is not None:
                raise RuntimeError(f"chromium exited at start ({self._process.returncode})")
            with contextlib.suppress(OSError, ValueError, IndexError):
                return int(marker.read_text().split()[0])
            await asyncio.sleep(0.05)
        raise TimeoutError("chromium did not open its debugging port")

    async def _page_socket(self, port: int) -> str:
        def targets() -> list[dict[str, Any]]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                return json.loads(r.read())  # type: ignore[no-any-return]

        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            pages = [t for t in await asyncio.to_thread(targets) if t.get("type") == "page"]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
            await asyncio.sleep(0.05)
        raise TimeoutError("chromium has no page")

    async def _stop(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
            self._ws = None
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        if process is not None:
            # Helpers (renderer, GPU, zygote) are in the same group: none may outlive the test.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    # ------------------------------------------------------------------ protocol
    async def call(self, method: str, timeout_s: float = 15.0, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        ident = next(self._ids)
        await self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        async with asyncio.timeout(timeout_s):
            while True:
                message = json.loads(await self._ws.recv())
                if message.get("id") != ident:
                    continue  # an event: not asked for
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]  # type: ignore[no-any-return]

    async def navigate(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 15.0, what: str = "") -> Any:
        """Evaluate ``expression`` until it is truthy; its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(RuntimeError):  # the page may be between documents
                value = await self.evaluate(expression)
                if value:
                    return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout_s} s waiting for {what or expression}"
                )
            await asyncio.sleep(0.1)

    async def dom(self) -> str:
        return str(await self.evaluate("document.documentElement.outerHTML"))

    async def screenshot(self) -> bytes:
        import base64

        result = await self.call("Page.captureScreenshot", format="png")
        return base64.b64decode(result["data"])


# --------------------------------------------------------------------------- PNG


@dataclass(frozen=True)
class Png:
    width: int
    height: int
    pixels: np.ndarray
    """(height, width, 3) RGB, alpha dropped."""

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        r, g, b = (int(v) for v in self.pixels[y, x])
        return (r, g, b)

    def count(self, rgb: tuple[int, int, int]) -> int:
        return int(np.all(self.pixels == np.array(rgb, np.uint8), axis=2).sum())

    def distinct_colours(self) -> int:
        flat = self.pixels.reshape(-1, 3).astype(np.uint32)
        return len(np.unique((flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]))


def read_png(data: bytes) -> Png:
    """A non-interlaced 8-bit RGB or RGBA PNG (what Chromium writes), unfiltered."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or colour not in (2, 6) or interlace:
        raise ValueError(
            f"unsupported PNG: depth {depth}, colour type {colour}, interlace {interlace}"
        )
    channels = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    previous = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).copy()
        if kind == 1:  # sub: a running sum per channel
            line = np.cumsum(line.reshape(width, channels), axis=0, dtype=np.uint64) % 256
            line = line.astype(np.uint8).reshape(stride)
        elif kind == 2:  # up
            line = line + previous
        elif kind in (3, 4):  # average, Paeth: each byte needs the one before it
            out = bytearray(line.tobytes())
            up = previous.tobytes()
            for i in range(stride):
                left = out[i - channels] if i >= channels else 0
                if kind == 3:
                    out[i] = (out[i] + (left + up[i]) // 2) & 0xFF
                    continue
                corner = up[i - channels] if i >= channels else 0
                p = left + up[i] - corner
                pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else up[i] if pb <= pc else corner
                out[i] = (out[i] + pred) & 0xFF
            line = np.frombuffer(bytes(out), np.uint8)
        rows.append(line.tobytes())
        previous = line
    image = np.frombuffer(b"".join(rows), np.uint8).reshape(height, width, channels)
    return Png(width, height, image[:, :, :3])
