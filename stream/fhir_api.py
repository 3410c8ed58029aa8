"""``POST /fhir`` and ``POST /fhir/subscription``: FHIR R4 Bundles into the events topic.

A transaction or collection Bundle (``application/fhir+json``) is mapped by ``ingest.fhir``
and its events produced to the events topic keyed by ``hadm_id``, as the MLLP listener
produces them; the answer, a ``transaction-response`` (or ``batch-response``) Bundle with
each entry's status, comes only once Kafka acknowledged every event. A Bundle is taken whole
or not at all: what cannot be taken is answered 4xx with an OperationOutcome (an issue per
refusal: its code and the entry and field, never a value) once each refusal's dead letter
is on Kafka. Kafka not acknowledging within ``ingest.fhir_kafka_timeout_s``
is a 503 and the sender resends; event ids are content-addressed, so a resent Bundle is
applied once.

Subscription rest-hook notifications (R4 Backport or R4B: a ``history`` or
``subscription-notification`` Bundle whose first entry is the notification's status, the
changed resources after it) are taken the same way; a handshake or heartbeat says nothing.

Both need a token of the ``ingest`` role (a feed writes and reads nothing; a reader cannot
write); a Subscription's token goes in its ``channel.header``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ingest import fhir
from ingest.accounting import DeadLetter
from ingest.events import encode, key
from ingest.mllp import DeliveringProducer, KafkaUnavailable
from m3t.settings import Settings
from stream.api_tokens import ApiToken

FHIR_JSON = "application/fhir+json"
MEDIA_TYPES = frozenset({FHIR_JSON, "application/json"})
OUTCOME_SCHEMA = {"type": "object", "description": "A FHIR OperationOutcome"}
BUNDLE_SCHEMA = {"type": "object", "description": "A FHIR Bundle"}


def _outcome(description: str) -> dict:
    return {"description": description, "content": {FHIR_JSON: {"schema": OUTCOME_SCHEMA}}}


RESPONSES = {
    200: {
        "description": "Taken: a transaction-response or batch-response Bundle",
        "content": {FHIR_JSON: {"schema": BUNDLE_SCHEMA}},
    },
    400: _outcome("Not JSON, not a Bundle, or a resource fhir.resources refuses"),
    413: _outcome("The Bundle is over ingest.fhir_max_bundle_bytes"),
    415: _outcome("Not application/fhir+json"),
    422: _outcome("An entry cannot be taken (unknown code, unit, reference, ...)"),
    503: _outcome("Kafka did not acknowledge the events in time: resend"),
}


def _request_body(types: frozenset[str]) -> dict:
    """A Bundle of ``types``, as far as JSON Schema can say (its entries are FHIR's)."""
    schema = {
        "type": "object",
        "description": "A FHIR R4 Bundle",
        "required": ["resourceType", "type"],
        "properties": {
            "resourceType": {"const": "Bundle"},
            "type": {"enum": sorted(types)},
            "entry": {"type": "array", "items": {"type": "object"}},
        },
    }
    return {"requestBody": {"required": True, "content": {FHIR_JSON: {"schema": schema}}}}


class FhirDoor:
    """Maps, dead-letters and delivers Bundles; the producer is made at the first Bundle."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.roots = settings.image_roots
        self.directory = fhir.Directory()
        self._producer: DeliveringProducer | None = None
        self._lock = threading.Lock()

    def producer(self) -> DeliveringProducer:
        with self._lock:
            if self._producer is None:
                self._producer = DeliveringProducer(
                    self.settings,
                    client_id="m3t-fhir",
                    timeout_s=self.settings.ingest.fhir_kafka_timeout_s,
                )
            return self._producer

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()

    async def take(self, request: Request, token: ApiToken, *, notification: bool):
        source = "fhir/subscription" if notification else "fhir/api"
        limit = self.settings.ingest.fhir_max_bundle_bytes
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in MEDIA_TYPES:
            return _outcome_response(415, [("error", "not-supported", "Content-Type")])
        body = await _read(request, limit)
        try:
            if body is None:
                raise fhir.Refused([fhir.Issue("oversized_bundle", None, f"over {limit} bytes")])
            mapped = await asyncio.to_thread(
                fhir.to_events,
                body,
                roots=self.roots,
                directory=self.directory,
                max_bytes=limit,
                notification=notification,
            )
        except fhir.Refused as refused:
            try:
                await self._dead_letters(refused, source, token)
            except KafkaUnavailable:  # the sender resends, so the refusal is not lost
                return _outcome_response(503, [("error", "transient", "Kafka: not acknowledged")])
            issues = [("error", i.code, i.diagnostics) for i in refused.issues]
            return _outcome_response(refused.status, issues)
        topic = self.settings.kafka.topic_events
        try:
            await self.producer().deliver([(topic, key(e), encode(e)) for e in mapped.events])
        except KafkaUnavailable:
            return _outcome_response(503, [("error", "transient", "Kafka: not acknowledged")])
        self.directory.learn(mapped)
        return JSONResponse(_response_bundle(mapped), media_type=FHIR_JSON)

    async def _dead_letters(self, refused: fhir.Refused, source: str, token: ApiToken) -> None:
        where = f"token {token.name}"
        records = []
        for issue in refused.issues:
            place = "bundle" if issue.entry is None else f"entry {issue.entry}"
            letter = DeadLetter(issue.reason, source, f"{place} from {where}", issue.where)
            records.append(
                (self.settings.kafka.topic_dead_letter, source.encode(), letter.to_json())
            )
        await self.producer().deliver(records)


async def _read(request: Request, limit: int) -> bytes | None:
    """The body, or None once it passes ``limit`` bytes (not read further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _outcome_response(status: int, issues: list[tuple[str, str, str]]) -> JSONResponse:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": severity, "code": code, "diagnostics": text}
            for severity, code, text in issues
        ],
    }
    return JSONResponse(outcome, status_code=status, media_type=FHIR_JSON)


def _response_bundle(mapped: fhir.Mapped) -> dict:
    kind = "transaction-response" if mapped.bundle_type == "transaction" else "batch-response"
    return {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {"response": {"status": "201 Created" if entry.events else "200 OK"}}
            for entry in mapped.entries
        ],
    }


def routes(settings: Settings, caller: Callable) -> tuple[APIRouter, Callable[[], None]]:
    """The FHIR endpoints, authorised by ``caller("ingest")``, and what closes them."""
    door = FhirDoor(settings)
    router = APIRouter()
    auth = Depends(caller("ingest"))

    @router.post("/fhir", responses=RESPONSES, openapi_extra=_request_body(fhir.BUNDLE_TYPES))
    async def post_bundle(request: Request, token: ApiToken = auth):
        """A transaction or collection Bundle: its events, once Kafka has them."""
        return await door.take(request, token, notification=False)

    notifications = _request_body(fhir.NOTIFICATION_TYPES)

    @router.post("/fhir/subscription", responses=RESPONSES, openapi_extra=notifications)
    async def subscription_notification(request: Request, token: ApiToken = auth):
        """A Subscription rest-hook notification: the changed resources' events."""
        return await door.take(request, token, notification=True)

    return router, door.close
