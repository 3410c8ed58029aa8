"""Issue 4: the windowed lab/vital aggregates against a brute-force recomputation.

The fold keeps per item a ring of time buckets; here the same features are computed
straight from the measurements (exact datetime arithmetic, no buckets kept), for random
histories with late events, several scoring times and, on the real Redis, shuffled and
redelivered events.
"""

from __future__ import annotations

import math
import random
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from features import definitions as fd
from features import transform
from features.fitted import FittedFeatures
from features.online import OnlineStore
from features.state import AdmissionState, hours
from features.vocab import Vocabulary
from ingest import events as ev
from ingest.itemids import ITEMS

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BUCKET = timedelta(hours=fd.BUCKET_HOURS)
FITTED = FittedFeatures.unnormalised(Vocabulary.fit(["unused"]))
WINDOWED = [
    f"{item.name}.{stat}_{w:g}h"
    for w in fd.WINDOW_HOURS
    for item in fd.MEASURED
    for stat in fd.WINDOW_STATS
]


def _bucket(t: datetime) -> int:
    return (t.replace(tzinfo=t.tzinfo or UTC) - EPOCH) // BUCKET


def recompute_windows(observations, as_of: float, windows=fd.WINDOW_BUCKETS) -> dict[str, float]:
    """Each window's aggregates from the measurements themselves: those charted in the
    window's buckets, the W / BUCKET_HOURS buckets ending with the one holding ``as_of``."""
    current = math.floor(as_of / fd.BUCKET_HOURS)
    out = {}
    for n in windows:
        w = n * fd.BUCKET_HOURS
        for item in fd.MEASURED:
            values = [
                o.value
                for o in observations
                if o.itemid == item.itemid and current - n < _bucket(o.charttime) <= current
            ]
            stats = {
                "count": float(len(values)),
                "mean": np.mean(values) if values else np.nan,
                "min": min(values, default=np.nan),
                "max": max(values, default=np.nan),
            }
            out.update({f"{item.name}.{s}_{w:g}h": stats[s] for s in fd.WINDOW_STATS})
    return out


def history(seed: int, n: int = 120):
    """An admission with measurements of a few items over five days, charted up to three
    hours before they arrive, some exactly on bucket boundaries, some at equal times."""
    rng = random.Random(seed)
    admit = datetime(2150, 3, 1, 7, 13, tzinfo=UTC) + timedelta(minutes=rng.randint(0, 5000))
    source = f"windows/{seed}"
    events = [
        ev.AdmissionEvent(
            event_id=ev.event_id(source, "admit"),
            hadm_id=seed,
            subject_id=1,
            event_time=admit,
            source=source,
            payload=ev.AdmissionPayload(
                admittime=admit, admission_type="URGENT", gender="F", age=60.0
            ),
        )
    ]
    items = rng.sample(list(ITEMS.values()), 4)
    boundary = EPOCH + (_bucket(admit) + 1) * BUCKET
    for i in range(n):
        item = rng.choice(items)
        if i % 10 == 0:  # on a bucket boundary, or a second before one
            charttime = (
                boundary + rng.randint(0, 25) * BUCKET - timedelta(seconds=rng.choice((0, 1)))
            )
        elif i % 10 == 1 and i > 1:  # the same charttime as an earlier measurement
            charttime = events[-1].payload.charttime
        else:
            charttime = admit + timedelta(seconds=rng.randint(-6 * 3600, 110 * 3600))
        arrival = max(charttime + timedelta(seconds=rng.randint(0, 3 * 3600)), admit)
        events.append(
            ev.ObservationEvent(
                event_id=ev.event_id(source, ("obs", i)),
                hadm_id=seed,
                subject_id=1,
                event_time=arrival,
                source=source,
                payload=ev.ObservationPayload(
                    itemid=item.itemid,
                    value=round(rng.uniform(item.low, item.low + 150), 2),
                    charttime=charttime,
                    kind=item.kind,
                ),
            )
        )
    return events


def scoring_times(events, rng: random.Random) -> list[datetime]:
    """Random times within the stay, bucket boundaries, and long after the last event."""
    first, last = min(e.event_time for e in events), max(e.event_time for e in events)
    span = int((last - first).total_seconds())
    times = [first + timedelta(seconds=rng.randint(0, span)) for _ in range(6)]
    times += [EPOCH + (_bucket(first) + k) * BUCKET for k in (3, 9, 17)]
    return times + [last, last + timedelta(hours=fd.BUCKET_HOURS * 2.5), last + timedelta(days=3)]


def windowed_features(blobs, as_of) -> list[dict[str, float]]:
    raw = FITTED.assemble(blobs, as_of)["numeric_raw"]
    columns = [fd.NUMERIC_FEATURES.index(name) for name in WINDOWED]
    return [dict(zip(WINDOWED, row[columns])) for row in raw]


def assert_same(got: dict, want: dict, context: str):
    for name in WINDOWED:
        assert np.isclose(got[name], want[name], rtol=1e-6, atol=1e-6, equal_nan=True), (
            context,
            name,
        )


def test_window_columns_are_declared():
    assert fd.N_NUMERIC == len(set(fd.NUMERIC_FEATURES))
    assert set(WINDOWED) <= set(fd.NUMERIC_FEATURES)
    assert fd.NUMERIC_FEATURES[-len(WINDOWED) :] == tuple(
        WINDOWED
    )  # computed at read time: after N_STATIC
    assert fd.N_BUCKETS * fd.BUCKET_HOURS == max(fd.WINDOW_HOURS)


def test_the_window_layout_is_part_of_the_feature_set_tag():
    assert fd.LAYOUT in FITTED.tag  # Redis keys and datasets of another layout never mix
    saved = FITTED.to_dict()
    assert FittedFeatures.from_dict(saved).tag == FITTED.tag
    with pytest.raises(ValueError, match="layout"):
        FittedFeatures.from_dict({**saved, "layout": "00000000"})


@pytest.mark.parametrize("seed", range(8))
def test_windows_equal_brute_force_at_every_scoring_time_in_any_arrival_order(seed):
    rng = random.Random(seed)
    events = history(seed)
    for as_of in scoring_times(events, rng):
        visible = [e for e in events if e.event_time <= as_of]  # what an offline snapshot folds
        observations = [e.payload for e in visible if e.type == "observation"]
        want = recompute_windows(observations, hours(as_of))
        for order in range(3):
            state = AdmissionState()
            for event in rng.sample(visible, len(visible)):
                state.apply(event, FITTED.vocab)
            got = windowed_features([state.to_blob()], hours(as_of))[0]
            assert_same(got, want, f"{as_of} order {order}")


def test_every_window_up_to_the_widest_equals_brute_force():
    """The configured windows are one choice: any window of 1..N_BUCKETS buckets, several
    at once, reads from the same state."""
    rng = random.Random(3)
    windows = tuple(range(1, fd.N_BUCKETS + 1))
    names = [
        f"{item.name}.{stat}_{n * fd.BUCKET_HOURS:g}h"
        for n in windows
        for item in fd.MEASURED
        for stat in fd.WINDOW_STATS
    ]
    for seed in range(20, 24):
        events = history(seed)
        for as_of in scoring_times(events, rng):
            visible = [e for e in events if e.event_time <= as_of]
            state = AdmissionState()
            for event in rng.sample(visible, len(visible)):
                state.apply(event, FITTED.vocab)
            records = transform.decode_blobs([state.to_blob()])[1]
            got = dict(
                zip(names, transform.windowed(records, np.array([hours(as_of)]), windows)[0])
            )
            want = recompute_windows(
                [e.payload for e in visible if e.type == "observation"], hours(as_of), windows
            )
            assert got.keys() == want.keys()
            for name in names:
                assert np.isclose(got[name], want[name], rtol=1e-6, atol=1e-6, equal_nan=True), (
                    as_of,
                    name,
                )


def test_a_measurement_older_than_the_ring_arriving_last_changes_no_window():
    events = history(99)
    newest = max(e.payload.charttime for e in events if e.type == "observation")
    late = events[5].model_copy(
        update={
            "event_id": "late",
            "payload": events[5].payload.model_copy(
                update={
                    "charttime": newest - timedelta(hours=max(fd.WINDOW_HOURS) + fd.BUCKET_HOURS),
                    "value": 1e4,
                }
            ),
        }
    )
    as_of = hours(max(e.event_time for e in events))
    blobs = []
    for evs in (events, events + [late]):
        state = AdmissionState()
        for event in evs:
            state.apply(event, FITTED.vocab)
        blobs.append(state.to_blob())
    before, after = windowed_features(blobs, as_of)
    assert_same(after, before, "late")
    assert_same(
        after,
        recompute_windows([e.payload for e in events + [late] if e.type == "observation"], as_of),
        "brute force",
    )


def test_an_empty_window_is_missing_but_its_count_is_zero():
    events = history(5)
    state = AdmissionState()
    for event in events:
        state.apply(event, FITTED.vocab)
    much_later = hours(max(e.event_time for e in events)) + max(fd.WINDOW_HOURS) + fd.BUCKET_HOURS
    batch = FITTED.assemble([state.to_blob(), None], much_later)
    for name in WINDOWED:
        column = fd.NUMERIC_FEATURES.index(name)
        observed = batch["numeric_mask"][0, column]
        assert observed == (1.0 if name.split(".")[1].startswith("count") else 0.0), name
        assert batch["numeric_raw"][0, column] == 0.0 or np.isnan(batch["numeric_raw"][0, column])
        assert batch["numeric_mask"][1, column] == 0.0  # an unknown admission: all missing


@pytest.mark.services
def test_online_windows_with_shuffled_and_redelivered_events_equal_brute_force(redis_client):
    store = OnlineStore(redis_client, FITTED, scratch=f"test-{uuid.uuid4().hex[:8]}")
    rng = random.Random(7)
    admissions = {seed: history(seed) for seed in range(100, 106)}
    streamed, done = [], set()
    try:
        for as_of in sorted(
            {t for evs in admissions.values() for t in scoring_times(evs, rng)[:9]}
        ):
            # Stream what is new up to this scoring time, shuffled, with some of it and some
            # of what was streamed before delivered again.
            due = [
                e
                for evs in admissions.values()
                for e in evs
                if e.event_time <= as_of and e.event_id not in done
            ]
            due = rng.sample(due, len(due))
            for i in range(0, len(due), 40):
                store.write_batch(
                    due[i : i + 40]
                    + due[max(0, i - 10) : i]
                    + rng.sample(streamed, min(10, len(streamed)))
                )
            streamed += due
            done.update(e.event_id for e in due)
            got = windowed_features(store.read_blobs(list(admissions)), hours(as_of))
            for (hadm_id, evs), row in zip(admissions.items(), got):
                seen = [e.payload for e in evs if e.type == "observation" and e.event_time <= as_of]
                if any(e.event_time <= as_of for e in evs):
                    assert_same(row, recompute_windows(seen, hours(as_of)), f"{hadm_id} {as_of}")
        # The rest streamed: the default scoring time is each admission's latest event.
        store.write_batch(
            [e for evs in admissions.values() for e in evs if e.event_id not in done]
            + streamed[:30]
        )
        latest = store.read_inputs(list(admissions))
        for (hadm_id, evs), as_of, row in zip(
            admissions.items(),
            latest["as_of"],
            windowed_features(store.read_blobs(list(admissions)), None),
        ):
            assert as_of == hours(max(e.event_time for e in evs))
            assert_same(
                row,
                recompute_windows([e.payload for e in evs if e.type == "observation"], as_of),
                hadm_id,
            )
    finally:
        store.drop()
