"""Kafka down under the MLLP listener (#21): a broker of this test's own is killed while a
sender sends, then started again. The sender is python-hl7's MLLP client, resending each
message until it is ACKed AA, as an interface engine does.

What must hold: no ``AA`` for a message Kafka did not take (every ACKed message's events
are on the topic), nothing ACKed while the broker is down, and every message in the end
ACKed. A message whose records reached the broker but whose acknowledgement did not reach
the listener is sent again by the sender, so the topic may hold its events twice, under the
same event ids: the online store applies each event id once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid

import pytest
from hl7.client import MLLPClient

from benchmarks.bench_feeds import hl7_messages
from features.fitted import FittedFeatures
from features.online import OnlineStore
from features.vocab import Vocabulary
from ingest import events as ev
from ingest.cli import msa_code
from ingest.hl7 import to_events
from ingest.mllp import MllpListener
from m3t import services
from m3t.clients import redis_client
from m3t.kafka import own_topics
from m3t.services.process import wait_until
from m3t.settings import IngestSettings
from tests.conftest import consume, make_settings

pytestmark = [pytest.mark.services, pytest.mark.single_node]


@pytest.fixture
def own_services(tmp_path):
    """A Kafka broker and a Redis of this test's own (the session's are never stopped)."""
    settings = make_settings(tmp_path, ingest=IngestSettings(mllp_kafka_timeout_s=3))
    try:
        services.up(settings, ["kafka", "redis"])
        yield own_topics(settings)
    finally:
        services.down(settings, ["kafka", "redis"])


class Sender(threading.Thread):
    """Sends each message, reconnecting and resending until it is ACKed AA; logs every
    attempt as (monotonic time, control id, MSA code)."""

    def __init__(self, address, messages: list[bytes]):
        super().__init__(daemon=True)
        self.address, self.messages = address, messages
        self.attempts: list[tuple[float, str, str]] = []

    def run(self) -> None:
        client = None
        for message in self.messages:
            control = message.split(b"|", 10)[9].decode()
            while True:
                try:
                    client = client or self._connect()
                    code = msa_code(client.send_message(message))
                except OSError:
                    code = "none"
                self.attempts.append((time.monotonic(), control, code))
                if code == "AA":
                    break
                if client is not None:  # the listener closed it: resend on a new one
                    client.close()
                    client = None
                time.sleep(0.5)
            time.sleep(0.03)  # a steady feed, so the broker dies mid-stream
        client.close()

    def _connect(self) -> MLLPClient:
        client = MLLPClient(*self.address)
        client.socket.settimeout(30)
        return client

    def acked(self, after: float = 0.0, before: float = float("inf")) -> list[str]:
        return [c for t, c, code in self.attempts if code == "AA" and after <= t < before]


def test_kafka_down_no_ack_without_kafka_and_the_resend_is_applied_once(own_services):
    settings = own_services
    messages = hl7_messages(120, seed=5, tag=uuid.uuid4().hex[:8])
    events = {m.header.control_id: m.events for m in map(to_events, messages)}
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    listener = MllpListener(settings)
    address = asyncio.run_coroutine_threadsafe(listener.start("127.0.0.1", 0), loop).result(30)
    sender = Sender(address, messages)
    broker = services.SERVICES["kafka"](settings)
    try:
        sender.start()
        assert wait_until(lambda: len(sender.acked()) >= 15, 60), "the feed did not start"
        os.killpg(broker.pid(), signal.SIGKILL)
        assert wait_until(lambda: broker.pid() is None, 30)
        down = time.monotonic()
        # The listener's Kafka timeout (3 s) passes: the sender is refused ACKs meanwhile.
        assert wait_until(lambda: any(c == "none" for *_, c in sender.attempts), 30)
        time.sleep(5)
        restarting = time.monotonic()
        # ACKs still arriving just after the kill are for records the broker had taken.
        assert sender.acked(after=down + 1.0, before=restarting) == []
        services.up(settings, ["kafka"])
        sender.join(240)
        assert not sender.is_alive(), "the sender's resends were not all ACKed"
    finally:
        asyncio.run_coroutine_threadsafe(listener.close(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(10)

    assert sender.acked() == list(events)  # each message ACKed AA once, in order
    assert listener.counts["kafka_unavailable"] >= 1
    expected = {e.event_id for evs in events.values() for e in evs}
    records = consume(settings, settings.kafka.topic_events, 10**6, wait_ms=10_000)
    on_topic = [ev.decode(r.value) for r in records]
    # Every ACKed message's events were taken by Kafka; a resent one's may be there twice.
    assert {e.event_id for e in on_topic} == expected
    assert len(on_topic) >= len(expected)

    fitted = FittedFeatures.unnormalised(Vocabulary.fit([]))
    client = redis_client(settings, role="admin")
    store = OnlineStore(client, fitted, scratch=f"test-{uuid.uuid4().hex[:8]}")
    try:
        half = len(on_topic) // 2  # as a stream worker reads them: batch by batch
        first, second = store.write_batch(on_topic[:half]), store.write_batch(on_topic[half:])
        assert first.refused == second.refused == []
        assert first.applied + second.applied == len(expected)
        assert first.duplicates + second.duplicates == len(on_topic) - len(expected)
        again = store.write_batch(on_topic)  # the whole topic redelivered: nothing new
        assert again.applied == 0 and again.duplicates == len(on_topic)
    finally:
        store.drop()
        client.close()
