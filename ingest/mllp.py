"""An asyncio MLLP listener: HL7 v2 messages in, events to Kafka, an ACK once Kafka has them.

Each connection is read frame by frame (start block 0x0B, message, end block 0x1C 0x0D)
and answered in order. A message is mapped by ``ingest.hl7``; its events are produced to
the events topic keyed by ``hadm_id`` (as replay produces them), and ``MSA|AA`` goes back
only once Kafka acknowledged every one. A message that cannot be taken gets ``AR`` or
``AE`` with its reason in MSA-3 and ERR, and a dead letter (reason and position: sender and
control id, never the content). When Kafka does not acknowledge within
``ingest.mllp_kafka_timeout_s`` no ACK is sent and the connection is closed, so the
sender resends; the resent message has the same event ids, applied once by the stream.

A frame over ``ingest.mllp_max_frame_bytes``, bytes outside a frame, or a frame
unfinished after ``ingest.mllp_idle_timeout_s`` gets a dead letter and its connection
closed; a connection silent that long is closed (with a dead letter when it never sent a
frame), and so is one whose peer leaves its ACKs unread that long. Each connection is its
own task, so a slow one never holds up another.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, deque
from datetime import UTC, datetime

from hl7.util import generate_message_control_id

from ingest import hl7 as hl7_map
from ingest.accounting import DeadLetter
from ingest.events import encode, key
from m3t import kafka
from m3t.settings import Settings

log = logging.getLogger(__name__)

START_BLOCK, END_BLOCK = b"\x0b", b"\x1c\x0d"
SOURCE = "hl7/mllp"
# HL7 table 0357, the error code ERR-3 gives for each refusal reason.
ERROR_CODES = {
    "invalid_utf8": "102",
    "malformed_message": "100",
    "malformed_segment": "100",
    "wrong_encoding_characters": "100",
    "unsupported_message": "200",
    "missing_field": "101",
    "invalid_field": "102",
    "unknown_loinc": "103",
    "unknown_unit": "103",
    "unsupported_result_status": "103",
    "invalid_event": "102",
}


class KafkaUnavailable(RuntimeError):
    """Kafka did not acknowledge a message's records in time (no ACK may be sent)."""


class DeliveringProducer:
    """The project's producer (role ``producer``) with a thread serving delivery reports,
    so a coroutine can await the moment Kafka acknowledged a group of records."""

    def __init__(
        self, settings: Settings, client_id: str = "m3t-mllp", timeout_s: float | None = None
    ):
        timeout_s = settings.ingest.mllp_kafka_timeout_s if timeout_s is None else timeout_s
        timeout_ms = int(timeout_s * 1000)
        self._producer = kafka.producer(
            settings,
            role="producer",
            client_id=client_id,
            # A record undelivered by then fails, rather than arriving after the sender
            # was left without an ACK (its resend would then be a second copy). A linger
            # of 1 ms batches what concurrent connections produce at once, at little
            # cost to each ACK.
            **{"message.timeout.ms": timeout_ms, "linger.ms": 1},
        )
        self.timeout_s = timeout_s
        # Groups whose last record was reported, settled one wake-up of their event loop
        # per poll rather than one per group.
        self._settled: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="mllp-kafka-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)
            by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
            while self._settled:
                loop, future = self._settled.popleft()
                by_loop.setdefault(loop, []).append(future)
            for loop, futures in by_loop.items():
                loop.call_soon_threadsafe(_settle, futures)

    async def deliver(self, records: list[tuple[str, bytes, bytes]]) -> None:
        """Produce ``(topic, key, value)`` records; return once Kafka acknowledged all of
        them, raise ``KafkaUnavailable`` if any failed or the time ran out."""
        if not records:
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        pending = [len(records)]
        failures: list[str] = []

        def delivered(error, _message) -> None:  # on the poll thread
            if error is not None:
                failures.append(error.name())
            pending[0] -= 1
            if pending[0] == 0:
                self._settled.append((loop, done))

        for topic, record_key, value in records:
            # librdkafka only queues the record, so the event loop need not be left; while
            # its queue is full, the poll thread makes room as reports come in.
            while True:
                try:
                    self._producer.produce(
                        topic, value=value, key=record_key, on_delivery=delivered
                    )
                    break
                except BufferError:
                    await asyncio.sleep(0.005)
        try:
            async with asyncio.timeout(self.timeout_s + 1):
                await done
        except TimeoutError:
            raise KafkaUnavailable("no delivery report in time") from None
        if failures:
            raise KafkaUnavailable(f"{len(failures)} record(s) not delivered: {failures[0]}")

    def close(self) -> None:
        self._stop.set()
        self._poller.join()
        self._producer.flush(self.timeout_s)


def _settle(futures: list[asyncio.Future]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


class MllpListener:
    """Serves MLLP connections until ``close``; ``counts`` says what happened, by outcome."""

    def __init__(self, settings: Settings, producer: DeliveringProducer | None = None):
        self.settings = settings
        self.producer = producer or DeliveringProducer(settings)
        self.counts: Counter[str] = Counter()
        self._server: asyncio.Server | None = None

    async def start(self, host: str | None = None, port: int | None = None) -> tuple[str, int]:
        cfg = self.settings.ingest
        self._server = await asyncio.start_server(
            self._serve,
            host or cfg.mllp_host,
            cfg.mllp_port if port is None else port,
            limit=cfg.mllp_max_frame_bytes + len(END_BLOCK),
        )
        return self._server.sockets[0].getsockname()[:2]

    async def serve_forever(self) -> None:
        assert self._server is not None, "start first"
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.to_thread(self.producer.close)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = "{}:{}".format(*writer.get_extra_info("peername")[:2])
        frames = 0
        try:
            while True:
                frame = await self._next_frame(reader, peer, frames + 1)
                if frame is None:
                    break
                frames += 1
                ack = await self._handle(frame, peer, frames)
                writer.write(START_BLOCK + ack + END_BLOCK)
                # A peer that stops reading its ACKs holds only its own connection, and
                # not for ever; what it was not told is resent, and changes nothing.
                try:
                    async with asyncio.timeout(self.settings.ingest.mllp_idle_timeout_s):
                        await writer.drain()
                except TimeoutError:
                    self.counts["ack_unread"] += 1
                    break
        except KafkaUnavailable as exc:
            self.counts["kafka_unavailable"] += 1
            log.warning("MLLP %s: no ACK, connection closed (%s)", peer, exc)
        except ConnectionError:
            self.counts["connection_lost"] += 1
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    async def _next_frame(self, reader: asyncio.StreamReader, peer: str, n: int) -> bytes | None:
        """The next frame's message, or None when the connection is to be closed."""
        timeout = self.settings.ingest.mllp_idle_timeout_s
        try:
            async with asyncio.timeout(timeout):
                while (first := await reader.read(1)) in b"\r\n ":
                    if not first:
                        return None  # closed by the sender between frames
        except TimeoutError:
            self.counts["idle_timeout"] += 1
            if n == 1:  # it never sent a frame: what opened it is worth a look
                return await self._refuse_frame("silent_connection", peer, n)
            return None
        if first != START_BLOCK:
            return await self._refuse_frame("missing_start_block", peer, n)
        try:
            async with asyncio.timeout(timeout):
                framed = await reader.readuntil(END_BLOCK)
        except asyncio.LimitOverrunError:
            return await self._refuse_frame("oversized_frame", peer, n)
        except asyncio.IncompleteReadError:
            return await self._refuse_frame("truncated_frame", peer, n)
        except TimeoutError:
            return await self._refuse_frame("unfinished_frame", peer, n)
        message = framed[: -len(END_BLOCK)]
        if len(message) > self.settings.ingest.mllp_max_frame_bytes:
            return await self._refuse_frame("oversized_frame", peer, n)
        return message

    async def _refuse_frame(self, reason: str, peer: str, n: int) -> None:
        self.counts[reason] += 1
        await self._dead_letter(DeadLetter(reason, SOURCE, f"frame {n} from {peer}"), None)
        return None

    async def _handle(self, frame: bytes, peer: str, n: int) -> bytes:
        try:
            mapped = hl7_map.to_events(frame, self.settings.image_roots)
        except hl7_map.Refused as refused:
            self.counts[refused.reason] += 1
            head = _header_if_any(frame)
            where = f"control id {head.control_id}" if head.control_id else f"frame {n}"
            letter = DeadLetter(refused.reason, SOURCE, f"{where} from {peer}", refused.detail)
            await self._dead_letter(letter, None)
            return acknowledgement(head, refused.ack_code, refused.reason, refused.detail)
        topic = self.settings.kafka.topic_events
        await self.producer.deliver([(topic, key(e), encode(e)) for e in mapped.events])
        self.counts["accepted"] += 1
        self.counts["events"] += len(mapped.events)
        return acknowledgement(mapped.header, "AA")

    async def _dead_letter(self, letter: DeadLetter, record_key: bytes | None) -> None:
        topic = self.settings.kafka.topic_dead_letter
        await self.producer.deliver([(topic, record_key or SOURCE.encode(), letter.to_json())])


def _header_if_any(frame: bytes) -> hl7_map.Header:
    """MSH's fields where the message parses at all, for the ACK; empty ones otherwise."""
    try:
        return hl7_map.header(hl7_map.parse(frame))
    except (hl7_map.Refused, KeyError, IndexError):
        return hl7_map.Header()


def acknowledgement(head: hl7_map.Header, code: str, reason: str = "", detail: str = "") -> bytes:
    """An original-mode ACK (MSH, MSA, and ERR for a refusal). The reason and detail are
    the refusal's own words (letters, digits, ``-``, ``:``), so nothing needs escaping."""
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    segments = [
        "|".join(
            [
                "MSH",
                "^~\\&",
                head.receiving_application or "M3T",
                head.receiving_facility,
                head.sending_application,
                head.sending_facility,
                now,
                "",
                f"ACK^{head.trigger}^ACK" if head.trigger else "ACK",
                generate_message_control_id(),
                head.processing_id,
                head.version,
            ]
        ),
        f"MSA|{code}|{head.control_id}|{reason}",
    ]
    if code != "AA":
        error = f"{ERROR_CODES.get(reason, '207')}^{reason}^HL70357"
        segments.append(f"ERR|||{error}|E||||{_plain(detail or reason)}")
    return ("\r".join(segments) + "\r").encode()


def _plain(text: str) -> str:
    return "".join(c if c.isalnum() or c in " -:._" else " " for c in text)


async def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """Run the listener until cancelled (``m3t ingest mllp``)."""
    listener = MllpListener(settings)
    address = await listener.start(host, port)
    log.info("MLLP listening on %s:%d", *address)
    try:
        await listener.serve_forever()
    finally:
        await listener.close()
