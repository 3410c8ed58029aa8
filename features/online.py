"""The online feature store on Redis.

Layout, per admission (``{hadm_id}`` is a Redis Cluster hash tag, so all of one
admission's keys share a slot and the commit script may touch them together)::

    m3t:<tag>:5:{12345}:m     string  the serving blob (features.layout): one MGET serves a batch
    m3t:<tag>:5:{12345}:s     hash    v = commit version, a = aggregates, n = note bookkeeping,
                                      t = transfers (features.state.Transfers)
    m3t:<tag>:5:{12345}:seen  hash    event id -> digest of the content applied under it
    m3t:<tag>:5:{12345}:adt   string  "<status>\n<ward>": open, discharged or cancelled, and
                                      the current careunit, read with the serving blobs
    m3t:<tag>:5:{12345}:o     string  the measurement log (features.state.LOG_RECORD), appended
                                      to; read only for an admission with result ids or
                                      corrections, whose aggregates are refolded from it
    m3t:<tag>:fitted          string  the FittedFeatures JSON this namespace was written with

``<tag>`` is the feature-set version, the layout fingerprint (``features.definitions.LAYOUT``:
the numeric columns and the bucket width of the windowed aggregates) and the vocabulary
fingerprint (``FittedFeatures.tag``); ``5`` is ``STORE_FORMAT``, the layout of these keys.

An event id names one content (``ingest.events.content_digest``): an event whose id was
applied with the same digest is a duplicate and changes nothing; one with another digest is
refused (``event_id_conflict``, for the caller to dead-letter), so an event sent under
another's id can neither pass as it nor silently make the real one a "duplicate". Two
contents under one id in one batch: the first claims it.

Writes (``write_batch``) take two round trips per batch, however many events: load the
touched admissions' state and the digests stored for the batch's event ids (three plain
commands per admission, all pipelined), fold the new
events in with ``AdmissionState.apply`` (the same function the offline builder folds
with), compute their serving blobs with ``assemble`` (the same transform the offline
builder uses), vectorised over the batch, then commit every admission with one
server-side Lua script that checks the version it loaded, adds the event ids and their
digests to the seen hash and stores the new state, atomically. A commit that lost a race
with another worker (the version moved) is reloaded and refolded. So redelivery and
concurrent workers are safe: an event id is in the seen hash if and only if the stored
state includes the content its digest names.

Reads: ``read_inputs`` at the default scoring time (each admission's latest event, what
the stream scores) is one MGET of serving blobs, decoded with numpy: the transform ran
when they were written. As of another time (parity checks, point-in-time reads) it is
one round trip for the serving blobs and the aggregates, rebuilt into blobs and
transformed with ``assemble``.
"""

from __future__ import annotations

import json
import re
import struct
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain

import numpy as np
import redis

from features import definitions as fd
from features import model_inputs as mi
from features.fitted import FittedFeatures
from features.layout import H_KEYED, serving_tail
from features.reasons import newest_times
from features.state import AdmissionState, Notes, hours
from features.transform import serving_blobs, serving_inputs
from ingest.events import content_digest, sort_key
from m3t.clients import LuaScript, mget, round_trip, run_scripts, unlink

DISCHARGED_TTL_S = 7 * 24 * 3600  # keep a discharged admission a week (late events, audits)
OPEN_TTL_S = 60 * 24 * 3600  # an admission that never sees its discharge still expires
CURRENT_KEY = "m3t:features:current"  # the tag the stream workers write under
# The layout of an admission's keys and of the blobs they hold (features.layout), in their
# names, so state written in another format is never half read (its events would count as
# seen). Bump it when either changes.
STORE_FORMAT = 5
# Why the store refuses an event whose id it has applied with other content.
EVENT_ID_CONFLICT = "event_id_conflict"

# commit version, aggregates, note bookkeeping, transfers
_STATE_FIELDS = ("v", "a", "n", "t")
_COMMIT = LuaScript("""
-- KEYS: serving blob, state hash, seen hash, status and ward, measurement log.
-- ARGV: expected version, serving blob, aggregates, notes ('' = unchanged), ttl,
--       status and ward, transfers, log records to append,
--       then event id, digest, event id, digest...
local version = redis.call('HGET', KEYS[2], 'v') or '0'
if version ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], 'v', tostring(tonumber(version) + 1), 'a', ARGV[3], 't', ARGV[7])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], 'n', ARGV[4]) end
redis.call('SET', KEYS[4], ARGV[6])
if ARGV[8] ~= '' then redis.call('APPEND', KEYS[5], ARGV[8]) end
for i = 9, #ARGV, 4000 do
  redis.call('HSET', KEYS[3], unpack(ARGV, i, math.min(i + 3999, #ARGV)))
end
for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ARGV[5]) end
return 1
""")


class ConcurrentUpdateError(RuntimeError):
    pass


@dataclass
class WriteStats:
    applied: int = 0  # events folded into state
    # events already applied with the same content, or twice in the batch (redelivery, replay)
    duplicates: int = 0
    admissions: int = 0  # admissions committed
    retries: int = 0  # commits that lost a race and were refolded
    # Events the admission cannot take, with the reason (``AdmissionState.refusal``, or
    # ``EVENT_ID_CONFLICT``): not applied, not marked seen, for the caller to dead-letter.
    refused: list = field(default_factory=list)


class OnlineStore:
    def __init__(
        self,
        client: redis.Redis,
        fitted: FittedFeatures,
        discharged_ttl_s: int = DISCHARGED_TTL_S,
        open_ttl_s: int = OPEN_TTL_S,
        max_retries: int = 8,
        scratch: str = "",
        max_stay_days: float = 400.0,
    ):
        self.client = client
        self.fitted = fitted
        # A scratch name keeps checks (parity, benchmarks) out of the serving namespace.
        self.prefix = f"m3t:{scratch}:{fitted.tag}" if scratch else f"m3t:{fitted.tag}"
        self.discharged_ttl_s = discharged_ttl_s
        self.open_ttl_s = open_ttl_s
        self.max_retries = max_retries
        self.max_stay_h = max_stay_days * 24.0
        self._key_formats = tuple(
            f"{self.prefix}:{STORE_FORMAT}:{{%d}}:{part}" for part in ("m", "s", "seen", "adt", "o")
        )
        # bytes %-formatting: the read path's keys
        self._serving_key, self._state_key = (key.encode() for key in self._key_formats[:2])
        self._adt_key = self._key_formats[3].encode()

    # --- keys -------------------------------------------------------------------------

    def keys(self, hadm_id: int) -> tuple[str, str, str]:
        """The serving blob, the state hash and the seen hash of an admission."""
        hadm_id = int(hadm_id)
        return tuple(key % hadm_id for key in self._key_formats[:3])

    def all_keys(self, hadm_id: int) -> tuple[str, ...]:
        """``keys``, then the status-and-ward string and the measurement log."""
        hadm_id = int(hadm_id)
        return tuple(key % hadm_id for key in self._key_formats)

    # --- namespace ----------------------------------------------------------------------

    def publish(self) -> None:
        """Store the fitted features and make this namespace the current one."""
        self.client.set(f"{self.prefix}:fitted", json.dumps(self.fitted.to_dict()))
        self.client.set(CURRENT_KEY, self.fitted.tag)

    def drop(self) -> int:
        """Delete every key of this namespace (for scratch stores); returns how many."""
        return unlink(self.client, self.client.scan_iter(match=f"{self.prefix}:*", count=1000))

    @classmethod
    def current(cls, client: redis.Redis, **kwargs) -> OnlineStore:
        """The store the stream workers publish to (see ``publish``)."""
        tag = client.get(CURRENT_KEY)
        if tag is None:
            raise LookupError("no feature set has been published to this Redis yet")
        raw = client.get(f"m3t:{tag.decode()}:fitted")
        if raw is None:
            raise LookupError(
                f"feature set {tag.decode()} is current but its fitted data is missing"
            )
        return cls(client, FittedFeatures.from_dict(json.loads(raw)), **kwargs)

    # --- writes -------------------------------------------------------------------------

    def write_batch(self, events: Iterable) -> WriteStats:
        """Apply a batch of events: each at most once, each by its event time."""
        # Per admission, event id -> (the batch's first event under it, its digest).
        pending: dict[int, dict[str, tuple[object, bytes]]] = defaultdict(dict)
        stats = WriteStats()
        for event in events:
            digest = content_digest(event)
            claimed = pending[event.hadm_id]
            first = claimed.get(event.event_id)
            if first is None:
                claimed[event.event_id] = (event, digest)
            elif first[1] == digest:
                stats.duplicates += 1
            else:
                stats.refused.append((event, EVENT_ID_CONFLICT))
        for attempt in range(self.max_retries + 1):
            if not pending:
                return stats
            if attempt:
                stats.retries += len(pending)
            pending = self._write_once(pending, stats)
        raise ConcurrentUpdateError(
            f"{len(pending)} admissions still contended after {self.max_retries} retries"
        )

    def _write_once(self, pending: dict[int, dict[str, tuple[object, bytes]]], stats: WriteStats):
        hadm_ids = list(pending)
        # The measurement log is read where a measurement may need a refold: the batch brings
        # a result id or a correction, or (found on loading) the admission already has one.
        logged = {h for h in hadm_ids if any(_keyed(e) for e, _ in pending[h].values())}

        def load(commands):
            # No script, which would cost Redis more per admission: the version comes
            # first, so a commit landing between these reads moves it and this
            # admission's own commit fails its check and is reloaded.
            for hadm_id in hadm_ids:
                serving_key, state_key, seen_key, _, log_key = self.all_keys(hadm_id)
                commands.hmget(state_key, _STATE_FIELDS)
                commands.get(serving_key)
                commands.hmget(seen_key, list(pending[hadm_id]))
                if hadm_id in logged:
                    commands.get(log_key)

        replies = iter(round_trip(self.client, load))
        loaded = {}
        for hadm_id in hadm_ids:
            row = (*next(replies), next(replies), next(replies))
            loaded[hadm_id] = (*row, (next(replies) or b"") if hadm_id in logged else None)
        late = [
            h
            for h, row in loaded.items()
            if row[6] is None and _stored_keyed(row[1]) and _measures(pending[h])
        ]
        if late:  # keyed admissions found on loading: a second round trip for their logs

            def load_logs(commands):
                for hadm_id in late:
                    commands.get(self.all_keys(hadm_id)[4])

            for hadm_id, log in zip(late, round_trip(self.client, load_logs)):
                loaded[hadm_id] = (*loaded[hadm_id][:6], log or b"")

        folded = []
        for hadm_id in hadm_ids:
            version, aggregates, notes, transfers, serving, applied, log = loaded[hadm_id]
            fresh, duplicates, refused = [], 0, []
            for (event, digest), stored in zip(pending[hadm_id].values(), applied):
                if stored is None:
                    fresh.append((event, digest))
                elif stored == digest:
                    duplicates += 1
                else:
                    refused.append((event, EVENT_ID_CONFLICT))
            if not fresh:
                stats.duplicates += duplicates
                stats.refused += refused
                continue
            tail = serving_tail(serving, self.fitted.note_tokens) if serving else None
            state = AdmissionState.from_stored(
                aggregates, notes, tail, self.fitted.note_tokens, transfers, log
            )
            taken = []
            for event, digest in sorted(fresh, key=lambda pair: sort_key(pair[0])):
                reason = state.refusal(event, self.max_stay_h)
                if reason is None:
                    state.apply(event, self.fitted.vocab)
                    taken.append((event.event_id, digest))
                else:
                    refused.append((event, reason))
            if not taken:
                stats.refused += refused
                stats.duplicates += duplicates
                continue
            folded.append((hadm_id, version, notes, duplicates, taken, refused, state))

        blobs = [state.to_blob() for *_, state in folded]
        served = serving_blobs(self.fitted.assemble(blobs)) if blobs else []
        commits = []
        for (hadm_id, version, notes, duplicates, taken, refused, state), serving in zip(
            folded, served
        ):
            changed_notes = state.to_notes() if state.notes_changed or not notes else b""
            ttl = self.discharged_ttl_s if state.discharged else self.open_ttl_s
            args = [version or b"0", serving, state.to_aggregates(), changed_notes, ttl]
            args += [
                f"{state.status}\n{state.ward}",
                state.transfers.encode(),
                bytes(state.new_records),
            ]
            commits.append((hadm_id, duplicates, taken, refused, args))

        def commit(pipe):
            for hadm_id, _, taken, _, args in commits:
                _COMMIT(pipe, self.all_keys(hadm_id), [*args, *chain.from_iterable(taken)])

        # Were a commit that ran sent again (run_scripts, after NOSCRIPT), its version check
        # would fail and its admission be reloaded: nothing is applied twice.
        results = run_scripts(self.client, commit, _COMMIT) if commits else []

        lost = {}
        for (hadm_id, duplicates, taken, refused, _), ok in zip(commits, results):
            if ok:
                stats.applied += len(taken)
                stats.duplicates += duplicates
                stats.admissions += 1
                stats.refused += refused
            else:
                lost[hadm_id] = pending[hadm_id]
        return lost

    # --- reads --------------------------------------------------------------------------

    def _serving_keys(self, hadm_ids: Sequence[int]) -> list[bytes]:
        return [self._serving_key % h for h in hadm_ids]

    def read_blobs(self, hadm_ids: Sequence[int]) -> list[bytes | None]:
        """Each admission's blob (None if unknown), rebuilt from its aggregates and its
        serving blob's tail, in one round trip: what ``assemble`` reads as of any time."""

        def queue(commands):
            commands.mget(self._serving_keys(hadm_ids))
            for h in hadm_ids:
                commands.hget(self._state_key % h, "a")

        if not hadm_ids:
            return []
        servings, *aggregates = round_trip(self.client, queue)
        tokens = self.fitted.note_tokens
        return [
            AdmissionState.from_stored(agg, None, serving_tail(serving, tokens), tokens).to_blob()
            if agg is not None and serving is not None
            else None
            for agg, serving in zip(aggregates, servings)
        ]

    def modality_times(self, hadm_ids: Sequence[int]) -> np.ndarray:
        """[B, 2] epoch hours of each admission's newest note (radiology report or previous
        discharge summary) and newest chest X-ray, NaN where it has none; one round trip."""
        out = np.full((len(hadm_ids), 2), np.nan)
        if not hadm_ids:
            return out

        def queue(commands):
            for h in hadm_ids:
                commands.hget(self._state_key % h, "n")

        tokens = self.fitted.note_tokens
        for row, raw in enumerate(round_trip(self.client, queue)):
            if raw:
                out[row] = newest_times(Notes.decode(raw, tokens))
        return out

    def read_status(self, hadm_ids: Sequence[int]) -> list[tuple[str, str]]:
        """Each admission's (status, ward): ``features.state``'s OPEN, DISCHARGED or
        CANCELLED and its current careunit ("" unknown); ("", "") for an unknown admission."""
        rows = mget(self.client, [self._adt_key % h for h in hadm_ids])
        return [_status(row) for row in rows]

    def read_inputs_and_status(
        self, hadm_ids: Sequence[int]
    ) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
        """``read_inputs`` at the default time and ``read_status``, in one MGET."""
        n = len(hadm_ids)
        rows = mget(
            self.client, self._serving_keys(hadm_ids) + [self._adt_key % h for h in hadm_ids]
        )
        inputs = serving_inputs(rows[:n], self.fitted.note_tokens)
        return inputs, [_status(row) for row in rows[n:]]

    def read_inputs(self, hadm_ids: Sequence[int], as_of=None) -> dict[str, np.ndarray]:
        """Model inputs for a batch, stacked; ``present`` marks the admissions found.

        ``as_of``: the scoring time (datetime, epoch hours, or one per admission). By
        default each admission is scored as of its latest applied event: one MGET of the
        serving blobs, without ``numeric_raw``. Any other time goes through ``assemble``.
        """
        if as_of is None:
            return serving_inputs(
                mget(self.client, self._serving_keys(hadm_ids)), self.fitted.note_tokens
            )
        return self.fitted.assemble(self.read_blobs(hadm_ids), _as_hours(as_of))

    def read_batch(self, hadm_ids: Sequence[int], as_of=None) -> list[dict[str, np.ndarray] | None]:
        """The full feature set per admission, aligned with ``hadm_ids``; None if unknown."""
        batch = self.read_inputs(hadm_ids, as_of)
        return [
            {name: values[i] for name, values in batch.items() if name != "present"}
            if found
            else None
            for i, found in enumerate(batch["present"])
        ]

    def describe(self, hadm_id: int, as_of=None) -> dict | None:
        """One admission's features by name, unnormalised, for people to read."""
        blob = self.read_blobs([hadm_id])[0]
        if blob is None:
            return None
        row = self.fitted.assemble([blob], _as_hours(as_of))
        aggregates, transfers = self.client.hmget(self.keys(hadm_id)[1], ["a", "t"])
        state = AdmissionState.from_stored(aggregates, None, None, transfers=transfers)
        raw = row["numeric_raw"][0]
        return {
            "hadm_id": int(hadm_id),
            "feature_set": self.fitted.tag,
            "as_of": datetime.fromtimestamp(float(row["as_of"][0]) * 3600, UTC).isoformat(),
            "discharged": state.discharged,
            "status": state.status,
            "ward": state.ward,
            "numeric": {
                name: (None if np.isnan(value) else round(float(value), 4))
                for name, value in zip(fd.NUMERIC_FEATURES, raw)
            },
            "radiology_tokens": int((row[mi.NOTES_RADIOLOGY][0] != fd.PAD).sum()),
            "discharge_tokens": int((row[mi.NOTES_DISCHARGE][0] != fd.PAD).sum()),
            "cxr_uri": row["cxr_uri"][0],
        }


# A serving namespace's keys (see the module docstring); scratch namespaces do not match.
_NAMESPACE_KEY = re.compile(r"(m3t:v\d+-[0-9a-f]+-[0-9a-f]+)(?::(\d+):\{\d+\}:[a-z]+|:fitted)")


def stale_namespaces(client: redis.Redis) -> dict[str, list[bytes]]:
    """Keys the stream no longer reads or writes, by namespace: those of every feature set
    but the published one, and those of the published one's other key layouts
    (``STORE_FORMAT``). They would otherwise stay until their TTL, up to OPEN_TTL_S.
    Scratch namespaces, scores and the published namespace's own keys are not listed."""
    current = client.get(CURRENT_KEY)
    if current is None:
        raise LookupError("no feature set has been published to this Redis yet")
    current_prefix = f"m3t:{current.decode()}"
    stale: dict[str, list[bytes]] = defaultdict(list)
    for key in client.scan_iter(match="m3t:v*", count=1000):
        match = _NAMESPACE_KEY.fullmatch(key.decode())
        if match is None:
            continue
        prefix, layout = match.groups()
        if prefix != current_prefix:
            stale[prefix].append(key)
        elif layout is not None and layout != str(STORE_FORMAT):
            stale[f"{prefix}:{layout}"].append(key)
    return dict(stale)


def _keyed(event) -> bool:
    """A measurement that makes its admission's aggregates refold from the log."""
    p = event.payload
    return (
        event.type == "observation"
        and p.itemid in fd.ITEM_INDEX
        and (p.result_id is not None or p.status != "final")
    )


def _measures(claimed: dict) -> bool:
    return any(
        e.type == "observation" and e.payload.itemid in fd.ITEM_INDEX for e, _ in claimed.values()
    )


def _stored_keyed(aggregates: bytes | None) -> bool:
    return bool(aggregates) and struct.unpack_from("<d", aggregates, H_KEYED * 8)[0] != 0.0


def _status(row: bytes | None) -> tuple[str, str]:
    if not row:
        return "", ""
    status, _, ward = row.decode().partition("\n")
    return status, ward


def _as_hours(as_of):
    if as_of is None:
        return None
    if isinstance(as_of, datetime):
        return hours(as_of)
    if isinstance(as_of, (list, tuple)) and as_of and isinstance(as_of[0], datetime):
        return np.array([hours(t) for t in as_of])
    return as_of
