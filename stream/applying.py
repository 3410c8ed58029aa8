"""Applying a poll's events to the feature store, one bad event stopping nothing else.

Each record is decoded and checked at the door (``ingest.events.decode``, its size, how
far its time runs ahead of its Kafka timestamp, and an X-ray's URI against the image
roots); the valid events are applied in one
batch, waiting out outages. Whatever the store refuses, and any event whose application
fails on its own (``stream.isolation``), is a dead letter with its reason; the rest are
the changes to score.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import Message

from features.image_files import BadImage, ImageAccess, check_uri
from ingest import events as ev
from stream.dead_letters import DeadLetters
from stream.interfaces import FeatureSource
from stream.isolation import isolate
from stream.outages import is_outage

log = logging.getLogger(__name__)

Change = tuple[int, float, bool]  # admission, Kafka timestamp (s), is a discharge


class EventApplier:
    """Args:
    features: the feature store the events are applied to.
    dead_letters: where refused events go.
    retrying: runs a step until it succeeds, waiting out outages (the worker's).
    max_event_bytes: larger events are dead letters, unparsed.
    max_event_lead_s: an event dated further after its Kafka timestamp is a dead letter
        (None: no limit).
    images: where X-ray URIs may point; a ``cxr`` event naming what can never be read (outside
        the roots, not a regular file, too large) is a dead letter. None: not checked.
    """

    def __init__(
        self,
        features: FeatureSource,
        dead_letters: DeadLetters,
        retrying: Callable[[str, Callable[[], None]], None],
        *,
        max_event_bytes: int = 512 * 1024,
        max_event_lead_s: float | None = None,
        images: ImageAccess | None = None,
    ):
        self.features = features
        self.dead_letters = dead_letters
        self.retrying = retrying
        self.max_event_bytes = max_event_bytes
        self.max_event_lead_s = max_event_lead_s
        self.images = images

    def __call__(self, records: list[Message]) -> list[Change]:
        """Apply the records' events; the changes they made, in record order."""
        events, origin = [], {}
        for record in records:
            try:
                event = self.decode(record)
            except ev.InvalidEvent as exc:
                self.dead_letters.event(record, exc.reason, exc.detail)
                continue
            events.append(event)
            origin[id(event)] = record
        refused = set()
        for event, reason, detail in self._apply(events):
            refused.add(id(event))
            self.dead_letters.event(origin[id(event)], reason, detail, event)
        return [
            (e.hadm_id, origin[id(e)].timestamp()[1] / 1000, e.type == "discharge")
            for e in events
            if id(e) not in refused
        ]

    def decode(self, record: Message):
        event = ev.decode(record.value(), max_bytes=self.max_event_bytes)
        lead = self.max_event_lead_s
        if lead is not None and event.event_time.timestamp() - record.timestamp()[1] / 1000 > lead:
            raise ev.InvalidEvent("event_time_ahead", f"over {lead:g} s after its Kafka timestamp")
        if event.type == "cxr" and self.images is not None:
            try:  # a file not there yet passes: the scorer waits for it
                check_uri(event.payload.uri, None, self.images)
            except BadImage as exc:
                raise ev.InvalidEvent("image_refused", str(exc)) from None
        return event

    def _apply(self, events: list) -> list[tuple]:
        """(event, reason, detail) for each event refused by the store or failing alone."""
        refused = []

        def apply(group):
            result = []
            self.retrying("feature update", lambda: result.extend(self.features.apply(group) or ()))
            refused.extend((event, reason, "") for event, reason in result)

        for event, exc in isolate(events, apply, is_outage):
            log.warning("an event failed to apply (%s)", type(exc).__name__)
            refused.append((event, "apply_failed", type(exc).__name__))
        return refused
