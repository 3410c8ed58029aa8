"""Small, seeded event histories built directly with the ``ingest.events`` types.

For tests, the benchmark and smoke checks of the feature store; the cohort generator in
``ingest`` is the realistic source.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from ingest import events as ev
from ingest.itemids import ITEMS

T0 = datetime(2150, 3, 1, 8, 0, tzinfo=UTC)
WORDS = (
    "no acute cardiopulmonary process mild bibasilar atelectasis small left pleural effusion "
    "stable cardiomegaly right picc line tip in the svc patient discharged home on lisinopril "
    "follow up with cardiology in two weeks pneumonia improved on antibiotics"
).split()


def _envelope(hadm_id: int, subject_id: int, source: str, position, when: datetime) -> dict:
    return {
        "event_id": ev.event_id(source, position),
        "hadm_id": hadm_id,
        "subject_id": subject_id,
        "event_time": when,
        "source": source,
    }


def admission_events(
    hadm_id: int, seed: int = 0, n_observations: int = 40, hours_span: float = 72.0
):
    """One admission's events in event-time order: admit, labs/vitals, notes, a CXR, discharge."""
    rng = random.Random(hadm_id * 7919 + seed)
    subject_id = 10_000_000 + hadm_id % 1000
    admit = T0 + timedelta(hours=rng.uniform(0, 24 * 30))
    env = lambda position, when: _envelope(hadm_id, subject_id, f"sample/{hadm_id}", position, when)  # noqa: E731
    out = [
        ev.AdmissionEvent(
            **env("admit", admit),
            payload=ev.AdmissionPayload(
                admittime=admit,
                admission_type=rng.choice(["EW EMER.", "URGENT", "ELECTIVE", "NEW KIND"]),
                gender=rng.choice("MF"),
                age=rng.uniform(18, 95),
            ),
        ),
        ev.NoteEvent(
            **env("prior-discharge", admit),
            payload=ev.NotePayload(
                note_type="discharge",
                text=" ".join(rng.choices(WORDS, k=rng.randint(50, 300))),
                charttime=admit - timedelta(days=40),
                note_id=f"{hadm_id}-DS",
                from_hadm_id=hadm_id - 1,
            ),
        ),
    ]
    items = list(ITEMS.values())
    for i in range(n_observations):
        item = rng.choice(items)
        when = admit + timedelta(hours=rng.uniform(0, hours_span))
        value = round(rng.uniform(item.low, min(item.high, item.low + 200)), 2)
        out.append(
            ev.ObservationEvent(
                **env(("obs", i), when),
                payload=ev.ObservationPayload(
                    itemid=item.itemid, value=value, charttime=when, kind=item.kind
                ),
            )
        )
    for i in range(rng.randint(0, 3)):
        when = admit + timedelta(hours=rng.uniform(0, hours_span))
        out.append(
            ev.NoteEvent(
                **env(("rad", i), when),
                payload=ev.NotePayload(
                    note_type="radiology",
                    text=" ".join(rng.choices(WORDS, k=rng.randint(20, 90))),
                    charttime=when,
                    note_id=f"{hadm_id}-RR-{i}",
                    from_hadm_id=hadm_id,
                ),
            )
        )
    for i in range(rng.randint(0, 2)):
        when = admit + timedelta(hours=rng.uniform(0, hours_span))
        out.append(
            ev.CxrEvent(
                **env(("cxr", i), when),
                payload=ev.CxrPayload(
                    study_id=hadm_id * 10 + i,
                    dicom_id=f"d{hadm_id}-{i}",
                    uri=f"file:///cxr/{hadm_id}/{i}.png",
                    studytime=when,
                ),
            )
        )
    discharge = admit + timedelta(hours=hours_span + rng.uniform(1, 48))
    out.append(
        ev.DischargeEvent(
            **env("discharge", discharge),
            payload=ev.DischargePayload(
                dischtime=discharge,
                los_days=(discharge - admit).total_seconds() / 86400,
                hospital_expire_flag=rng.random() < 0.1,
            ),
        )
    )
    return sorted(out, key=ev.sort_key)


def cohort(n_admissions: int, seed: int = 0, first_hadm_id: int = 20_000_000, **kwargs):
    return {
        h: admission_events(h, seed, **kwargs)
        for h in range(first_hadm_id, first_hadm_id + n_admissions)
    }


CAREUNITS = ("Emergency Department", "Medicine", "Medical Intensive Care Unit (MICU)", "Surgery")


def with_feed_events(events: list, seed: int = 0) -> list:
    """One admission's events as a hospital feed would also send them: result ids on its
    observations, a preliminary result made final, corrected results (with and without a
    result id), transfers and a cancelled transfer, the admission re-sent (A08) with another
    age, a discharge entered in error and cancelled, and an admission cancelled then
    admitted again. In event-time order."""
    admit_event = next(e for e in events if e.type == "admission")
    discharge = next(e for e in events if e.type == "discharge")
    hadm_id, subject_id = admit_event.hadm_id, admit_event.subject_id
    rng = random.Random(hadm_id * 104729 + seed)
    admit = admit_event.payload.admittime
    stay = discharge.event_time - admit
    env = lambda position, when: _envelope(hadm_id, subject_id, f"feed/{hadm_id}", position, when)  # noqa: E731
    out = []
    keyed = rng.random() < 0.7  # else corrections name their result by item and charttime
    for i, e in enumerate(events):
        if e.type != "observation":
            out.append(e)
            continue
        p = e.payload
        result_id = f"{hadm_id}-r{i}" if keyed else None
        if keyed and rng.random() < 0.1:  # a preliminary value, then the final one
            early = e.model_copy(
                update={
                    "event_id": ev.event_id(f"feed/{hadm_id}", ("prelim", i)),
                    "payload": p.model_copy(
                        update={
                            "result_id": result_id,
                            "status": "preliminary",
                            "value": p.value + 1,
                        }
                    ),
                }
            )
            out.append(early)
            e = e.model_copy(update={"event_time": e.event_time + timedelta(minutes=30)})
        out.append(e.model_copy(update={"payload": p.model_copy(update={"result_id": result_id})}))
        if rng.random() < 0.15:
            item = ITEMS[p.itemid]
            value = round(rng.uniform(item.low, min(item.high, item.low + 200)), 2)
            when = e.event_time + timedelta(hours=rng.uniform(0.5, 12))
            out.append(
                ev.ObservationEvent(
                    **env(("corrected", i), when),
                    payload=p.model_copy(
                        update={"value": value, "result_id": result_id, "status": "corrected"}
                    ),
                )
            )
    units = rng.sample(CAREUNITS, 3)
    moves = [admit, admit + stay * 0.2, admit + stay * 0.5]
    for i, (unit, when) in enumerate(zip(units, moves)):
        out.append(
            ev.TransferEvent(
                **env(("transfer", i), when),
                payload=ev.TransferPayload(careunit=unit, intime=when),
            )
        )
    out.append(
        ev.CancelEvent(
            **env("cancel-transfer", moves[2] + timedelta(minutes=20)),
            payload=ev.CancelPayload(cancels="transfer"),
        )
    )
    older = admit_event.payload.model_copy(update={"age": min(120.0, admit_event.payload.age + 1)})
    out.append(ev.AdmissionEvent(**env("a08", admit + stay * 0.3), payload=older))
    cancelled = admit + stay * 0.1
    out.append(
        ev.CancelEvent(**env("a11", cancelled), payload=ev.CancelPayload(cancels="admission"))
    )
    out.append(
        ev.AdmissionEvent(
            **env("readmit", cancelled + timedelta(minutes=10)), payload=admit_event.payload
        )
    )
    early = admit + stay * 0.6
    out.append(
        ev.DischargeEvent(
            **env("early-discharge", early),
            payload=discharge.payload.model_copy(update={"dischtime": early}),
        )
    )
    out.append(
        ev.CancelEvent(
            **env("a13", early + timedelta(minutes=15)),
            payload=ev.CancelPayload(cancels="discharge"),
        )
    )
    return sorted(out, key=ev.sort_key)
