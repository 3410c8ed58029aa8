"""Online/offline parity: the features served equal the features trained on.

For a sample of admissions, the offline builder computes each cutoff's example; the same
events are then streamed into a scratch namespace of the online store, round by round up
to each cutoff (shuffled within a round, and with part of each round delivered twice, as
at-least-once delivery would), and read back as of the cutoff. Every model input must
match: token ids, masks and URIs exactly, numeric values within float rounding.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import redis

from features import definitions as fd
from features import offline
from features.online import OnlineStore
from features.state import hours

EXACT = tuple(s.name for s in fd.FEATURES if s.dtype != fd.F32)  # token ids, URIs
FLOAT_RTOL, FLOAT_ATOL = 1e-5, 1e-5


@dataclass
class ParityReport:
    admissions: int = 0
    cutoffs: int = 0  # (admission, cutoff) pairs compared
    mismatched_rows: dict[str, int] = field(default_factory=dict)  # per feature
    max_abs_diff: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.cutoffs > 0 and not any(self.mismatched_rows.values())


def compare(
    offline_rows: dict[str, np.ndarray], online_rows: dict[str, np.ndarray], report: ParityReport
):
    for spec in fd.FEATURES:
        a, b = offline_rows[spec.name], online_rows[spec.name]
        if spec.name in EXACT:
            same = (a == b).reshape(len(a), -1).all(axis=1)
        else:
            same = (
                np.isclose(a, b, rtol=FLOAT_RTOL, atol=FLOAT_ATOL).reshape(len(a), -1).all(axis=1)
            )
            diff = float(np.max(np.abs(a - b))) if a.size else 0.0
            report.max_abs_diff[spec.name] = max(report.max_abs_diff.get(spec.name, 0.0), diff)
        report.mismatched_rows[spec.name] = report.mismatched_rows.get(spec.name, 0) + int(
            (~same).sum()
        )


def check_parity(
    events: Iterable,
    client: redis.Redis,
    policy: offline.CutoffPolicy = offline.CutoffPolicy((6.0, 24.0, 48.0)),
    sample: int = 50,
    seed: int = 0,
    write_chunk: int = 500,
) -> ParityReport:
    """Compare online and offline features for ``sample`` admissions at each of their cutoffs."""
    grouped = offline.group_admissions(events)
    dataset = offline.build((evs for evs in grouped.values()), policy)
    arrays = dataset.arrays
    rng = random.Random(seed)
    chosen = sorted(set(arrays["hadm_id"].tolist()))
    chosen = rng.sample(chosen, min(sample, len(chosen)))
    row_of = {
        (h, c): i
        for i, (h, c) in enumerate(zip(arrays["hadm_id"].tolist(), arrays["cutoff"].tolist()))
    }
    cutoffs = {h: sorted(c for (hh, c) in row_of if hh == h) for h in chosen}

    store = OnlineStore(client, dataset.fitted, scratch=f"parity-{uuid.uuid4().hex[:8]}")
    report = ParityReport(admissions=len(chosen))
    try:
        streamed = {h: 0 for h in chosen}  # events of each admission already streamed
        for k in range(max(len(c) for c in cutoffs.values())):
            due = [h for h in chosen if len(cutoffs[h]) > k]
            batch = []
            for h in due:
                evs, start = grouped[h], streamed[h]
                end = start
                while end < len(evs) and hours(evs[end].event_time) <= cutoffs[h][k]:
                    end += 1
                batch += evs[start:end]
                streamed[h] = end
            rng.shuffle(batch)
            batch += rng.sample(batch, len(batch) // 5)  # redelivered duplicates
            for i in range(0, len(batch), write_chunk):
                store.write_batch(batch[i : i + write_chunk])

            as_of = np.array([cutoffs[h][k] for h in due])
            online_rows = store.read_inputs(due, as_of=as_of)
            rows = [row_of[(h, cutoffs[h][k])] for h in due]
            compare({name: values[rows] for name, values in arrays.items()}, online_rows, report)
            report.cutoffs += len(due)
    finally:
        store.drop()
    return report
