"""Shared fixtures: a real MQTT broker per test session.

With ``CI`` set, broker tests run against mosquitto and fail (never skip) if it is missing. Without
``CI`` they use mosquitto when installed and fall back to the embedded broker otherwise.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from simulators.broker import BrokerEndpoint, EmbeddedBroker, MosquittoBroker


@pytest.fixture(scope="session")
def broker_endpoint() -> Iterator[BrokerEndpoint]:
    in_ci = bool(os.environ.get("CI"))
    forced = os.environ.get("DERMS_TEST_BROKER")  # "embedded" to exercise the fallback here
    if forced == "embedded" and not in_ci:
        broker = EmbeddedBroker()
    elif MosquittoBroker.available():
        broker: MosquittoBroker | EmbeddedBroker = MosquittoBroker()
    elif in_ci:
        pytest.fail("CI is set but mosquitto is not installed: .ci/run must install it")
    else:
        broker = EmbeddedBroker()
    loop = asyncio.new_event_loop()
    if isinstance(broker, EmbeddedBroker):
        # The embedded broker lives on an event loop: give it its own thread.
        ready = threading.Event()
        result: dict[str, BrokerEndpoint] = {}

        def serve() -> None:
            asyncio.set_event_loop(loop)
            result["ep"] = loop.run_until_complete(broker.start())
            ready.set()
            loop.run_forever()

        thread = threading.Thread(target=serve, name="embedded-broker", daemon=True)
        thread.start()
        ready.wait(15)
        yield result["ep"]
        asyncio.run_coroutine_threadsafe(broker.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    else:
        endpoint = loop.run_until_complete(broker.start())
        try:
            yield endpoint
        finally:
            loop.run_until_complete(broker.stop())
            loop.close()


@pytest.fixture
async def mosquitto() -> AsyncIterator[MosquittoBroker]:
    """A private mosquitto for tests that stop and restart the broker."""
    if not MosquittoBroker.available():
        if os.environ.get("CI"):
            pytest.fail("CI is set but mosquitto is not installed")
        pytest.skip("mosquitto not installed")
    broker = MosquittoBroker()
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()
