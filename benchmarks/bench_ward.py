"""The ward page (``/ward``): the time from a score written to Redis to its row updated in a
real browser.

The API serves the page in this process; a headless Chromium logs in and keeps it open. Each
update writes one admission's new score through ``ScoreStore.write_batch`` (the worker's
write) at a random moment, then waits for the page to record the row's update: the page
stamps each update with the browser's clock (``window.wardUpdates``), corrected by the
clocks' offset measured first, so the figure is write-to-DOM, not the test's polling.
It is bounded below by the page's poll of Redis (``api.ward_poll_s``).

The admissions are the benchmark's own (ids from ``FIRST_ID``, removed afterwards), with
made-up values in the optional fields of the score contract (ward, reasons, freshness), so
each row is drawn as a real one is. The docs' screenshots come from a real run instead
(``docs/screenshots.py``).
"""

from __future__ import annotations

import argparse
import json
import random
import time
import uuid
from pathlib import Path

from benchmarks import harness as h
from benchmarks.browser import chromium, log_in, serving, wait_for
from m3t import services
from m3t.clients import redis_client, unlink
from m3t.settings import Settings, get_settings
from stream.api_tokens import TokenStore
from stream.scores import HISTORY_KEY, RANKING_KEY, SCORE_KEY, RiskScore, ScoreStore

FIRST_ID = 990_000_000
PAGE_ROWS = 100  # the rows /ward shows (its events' default n)
WARDS = ("MICU", "SICU", "CCU", "Med 4 West")
# (feature, modality, typical value, unit change that moves the risk)
FEATURES = (
    ("creatinine.last", "labs_vitals", 1.1, 0.6),
    ("lactate.last", "labs_vitals", 1.4, 1.1),
    ("resp_rate.last", "labs_vitals", 18.0, 6.0),
    ("heart_rate.last", "labs_vitals", 84.0, 22.0),
    ("sbp.last", "labs_vitals", 122.0, -25.0),
    ("wbc.last", "labs_vitals", 8.0, 5.0),
    ("age", "demographics", 67.0, 0.0),
    ("radiology note", "notes", None, 0.0),
    ("chest X-ray", "cxr", None, 0.0),
)


def _reasons(rng: random.Random, risk: float) -> list[dict]:
    picked = rng.sample(FEATURES, 4)
    reasons = []
    for feature, modality, typical, step in picked:
        value = None if typical is None else round(typical + step * rng.uniform(0, 2), 2)
        moved = typical is not None and step != 0.0
        previous = round(typical + step * rng.uniform(0, 1), 2) if moved else None
        reasons.append(
            {
                "feature": feature,
                "modality": modality,
                "value": value,
                "previous": previous,
                "contribution": round(rng.uniform(-0.3, 1.0) * risk / 3, 4),
            }
        )
    return sorted(reasons, key=lambda r: -abs(r["contribution"]))


def _freshness(rng: random.Random) -> dict:
    absent = [m for m in ("note", "cxr") if rng.random() < 0.3]
    age = {
        "lab_age_h": round(rng.uniform(0.2, 10), 1),
        "vital_age_h": round(rng.uniform(0.1, 2), 1),
        "note_age_h": None if "note" in absent else round(rng.uniform(2, 30), 1),
        "cxr_age_h": None if "cxr" in absent else round(rng.uniform(4, 48), 1),
    }
    return {**age, "absent": absent}


class Ward:
    """The benchmark's admissions: written like the worker's scores, removed at the end."""

    def __init__(self, settings: Settings, admissions: int, history: int, seed: int = 7):
        self.writer = redis_client(settings, role="stream")
        self.admin = redis_client(settings, role="admin")
        self.store = ScoreStore(self.writer)
        self.rng = random.Random(seed)
        self.ids = [FIRST_ID + i for i in range(admissions)]
        self.admitted = time.time() - 3 * 86400
        # Above every real inpatient but the page's top rows less these, so that on a store
        # with a real ward (after `make demo`) every row of the benchmark is on the page.
        rank = PAGE_ROWS - admissions - 1
        above = self.admin.zrevrange(RANKING_KEY, rank, rank, withscores=True)
        self.floor = float(above[0][1]) if above else 0.05
        self.ceiling = (self.floor + 1) / 2
        self.risk = {h: self.rng.uniform(self.floor, self.ceiling) for h in self.ids}
        self.steps = dict.fromkeys(self.ids, 0)
        for _ in range(history):
            for hadm_id in self.ids:
                self.rescore(hadm_id)
        for hadm_id in self.ids:
            self.explain(hadm_id)

    def rescore(self, hadm_id: int) -> RiskScore:
        """A new score for ``hadm_id``, an hour of events later; written at once."""
        self.steps[hadm_id] += 1
        walked = self.risk[hadm_id] + self.rng.gauss(0, 0.03)
        risk = min(self.ceiling, max(self.floor + 1e-6, walked))
        self.risk[hadm_id] = risk
        feature_time = self.admitted + 3600 * self.steps[hadm_id]
        score = RiskScore.predicted(
            hadm_id, self.rng.uniform(0.5, 9), risk, "m3t_lm:bench", feature_time, time.time()
        )
        self.store.write_batch([score])
        return score

    def explain(self, hadm_id: int) -> None:
        """The fields later writers add (h-explain's reasons and freshness, the ward)."""
        fields = {
            "ward": WARDS[hadm_id % len(WARDS)],
            "reasons": json.dumps(_reasons(self.rng, self.risk[hadm_id])),
            "freshness": json.dumps(_freshness(self.rng)),
            "previous_mortality_prob": repr(max(0.01, self.risk[hadm_id] - 0.04)),
        }
        self.writer.hset(SCORE_KEY.format(hadm_id=hadm_id), mapping=fields)

    def close(self) -> None:
        keys = [k.format(hadm_id=h) for h in self.ids for k in (SCORE_KEY, HISTORY_KEY)]
        unlink(self.admin, keys)
        self.admin.zrem(RANKING_KEY, *self.ids)
        self.writer.close()
        self.admin.close()


def clock_offset_s(driver) -> float:
    """The browser's wall clock minus this process's, from the tightest of a few reads."""
    best = None
    for _ in range(5):
        before = time.time()
        browser = driver.execute_script("return performance.timeOrigin + performance.now();")
        after = time.time()
        if best is None or after - before < best[0]:
            best = (after - before, browser / 1000 - (before + after) / 2)
    return best[1]


def updated_at(driver, hadm_id: int, scored_at: float) -> float | None:
    """When the page drew ``hadm_id``'s score of ``scored_at`` (browser clock, seconds)."""
    at_ms = driver.execute_script(
        "const u = window.wardUpdates.find("
        "(x) => x.hadm_id === arguments[0] && x.scored_at === arguments[1]);"
        "return u ? u.at_ms : null;",
        hadm_id,
        scored_at,
    )
    return None if at_ms is None else at_ms / 1000


def run(
    settings: Settings,
    *,
    updates: int = 200,
    admissions: int = 20,
    history: int = 12,
    seed: int = 7,
) -> h.Result:
    """``updates`` rescored admissions, one at a time, among ``admissions`` with ``history``
    past scores each."""
    services.up(settings, ["redis"])
    result = h.Result(
        "ward",
        {
            "updates": updates,
            "admissions": admissions,
            "history": history,
            "poll_s": settings.api.ward_poll_s,
            "browser": "headless Chromium (Debian), Selenium",
        },
    )
    tokens = TokenStore(settings)
    name = f"bench-ward-{uuid.uuid4().hex[:8]}"
    token = tokens.add(name, "reader")
    ward = Ward(settings, admissions, history, seed)
    driver = chromium()
    started = time.monotonic()
    try:
        with serving(settings) as base:
            log_in(driver, base, token)
            wait_for(lambda: driver.execute_script("return window.wardUpdates.length") > 0)
            offset = clock_offset_s(driver)
            rng, latencies = random.Random(seed), []
            for i in range(updates):
                time.sleep(rng.uniform(0, settings.api.ward_poll_s))  # any phase of the poll
                hadm_id = ward.ids[i % admissions]
                written = time.time()
                score = ward.rescore(hadm_id)
                drawn = wait_for(lambda: updated_at(driver, hadm_id, score.scored_at))
                latencies.append(drawn - offset - written)
            result.rows.append(
                {
                    "case": "score written -> row updated in the browser",
                    "variant": f"SSE, Redis poll every {settings.api.ward_poll_s} s",
                    "batch": 1,
                    **h.latency_summary(latencies),
                }
            )
            result.params["clock_offset_ms"] = round(offset * 1000, 3)
    finally:
        driver.quit()
        ward.close()
        tokens.revoke(name)
    result.seconds = time.monotonic() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--out", type=Path, default=h.RESULTS_DIR)
    args = parser.parse_args(argv)
    result = run(get_settings(), updates=args.updates)
    paths = h.save(result, args.out)
    print(h.markdown(result))
    print(f"wrote {paths['json']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
