"""Risk scores in Redis: the current score per admission, a ranking, and a bounded history.

Layout (hash tags keep one admission's keys on one Redis Cluster slot):
  m3t:score:{HADM}          hash: los_remaining_days, expected_discharge, mortality_prob, model,
                            feature_time, scored_at, discharged (1 once the admission's
                            discharge was scored)
  m3t:score-history:{HADM}  stream of past scores, capped at ``history_len``
  m3t:risk:inpatients       sorted set of current inpatients by mortality probability
A score older than the stored one (by feature time) is skipped, so replays are harmless.
A discharge is kept in the score's hash, so no later score (a late result, a restarted
worker) puts the patient back on the ranking. The hash and history expire with the
admission's features (``features.online``'s TTLs); ranking entries whose hash expired are
pruned (``prune_ranking``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Annotated

import redis
from pydantic import Field

from features.online import DISCHARGED_TTL_S, OPEN_TTL_S
from m3t.clients import LuaScript, run_scripts

SCORE_KEY = "m3t:score:{{{hadm_id}}}"
HISTORY_KEY = "m3t:score-history:{{{hadm_id}}}"
RANKING_KEY = "m3t:risk:inpatients"
SECONDS_PER_DAY = 86400.0

# Compare-and-set by feature time, all in one round trip: a stale or repeated score is a no-op.
# KEYS: score hash, history, ranking. ARGV: remaining LoS, expected discharge, risk, model,
# feature time, scored at, discharged now ('1'/'0'), history length, ranking member, TTL open,
# TTL discharged.
_WRITE_SCORE = LuaScript("""
local current = redis.call('HGET', KEYS[1], 'feature_time')
local gone = ARGV[7] == '1' or redis.call('HGET', KEYS[1], 'discharged') == '1'
local fresh = not (current and tonumber(current) > tonumber(ARGV[5]))
if fresh then
  redis.call('HSET', KEYS[1], 'los_remaining_days', ARGV[1], 'expected_discharge', ARGV[2],
             'mortality_prob', ARGV[3], 'model', ARGV[4], 'feature_time', ARGV[5],
             'scored_at', ARGV[6])
  if current ~= ARGV[5] then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'los_remaining_days', ARGV[1],
               'expected_discharge', ARGV[2], 'mortality_prob', ARGV[3], 'model', ARGV[4],
               'feature_time', ARGV[5])
  end
end
if gone then
  redis.call('HSET', KEYS[1], 'discharged', '1')
  redis.call('ZREM', KEYS[3], ARGV[9])
elseif fresh then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[9])
end
local ttl = gone and ARGV[11] or ARGV[10]
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return fresh and 1 or 0
""")


def valid_score(los_remaining_days: float, mortality_prob: float) -> str | None:
    """Why a model output must not be stored (None if it may): non-finite or out of range."""
    if not (math.isfinite(los_remaining_days) and math.isfinite(mortality_prob)):
        return "non_finite_score"
    if not (0.0 <= mortality_prob <= 1.0) or not (0.0 <= los_remaining_days <= 3650.0):
        return "score_out_of_range"
    return None


@dataclass(frozen=True)
class RiskScore:
    # Field descriptions: the API's OpenAPI document shows them.
    hadm_id: Annotated[int, Field(description="The admission (MIMIC-IV hadm_id)")]
    los_remaining_days: Annotated[
        float,
        Field(description="Predicted length of stay still to come, in days from feature_time"),
    ]
    mortality_prob: Annotated[
        float, Field(description="Predicted probability of in-hospital death")
    ]
    model: Annotated[str, Field(description="The model that scored it, as name:version")]
    feature_time: Annotated[
        float, Field(description="Epoch seconds of the newest event the features include")
    ]
    scored_at: Annotated[float, Field(description="Epoch seconds when it was scored")]
    expected_discharge: Annotated[
        float, Field(description="Epoch seconds: feature_time plus the predicted remaining stay")
    ]

    @classmethod
    def predicted(
        cls,
        hadm_id: int,
        los_remaining_days: float,
        mortality_prob: float,
        model: str,
        feature_time: float,
        scored_at: float,
    ) -> RiskScore:
        """A score from the model's outputs; the expected discharge follows from them."""
        discharge = feature_time + los_remaining_days * SECONDS_PER_DAY
        return cls(
            hadm_id, los_remaining_days, mortality_prob, model, feature_time, scored_at, discharge
        )

    def as_json(self) -> str:
        # A dict by hand: dataclasses.asdict deep-copies, too slow for the hot path.
        return json.dumps(
            {
                "hadm_id": self.hadm_id,
                "los_remaining_days": self.los_remaining_days,
                "expected_discharge": self.expected_discharge,
                "mortality_prob": self.mortality_prob,
                "model": self.model,
                "feature_time": self.feature_time,
                "scored_at": self.scored_at,
            }
        )


class ScoreStore:
    """Scores, their history and the ranking, in Redis.

    Args:
        client: a Redis client (the writer's, or the read-only user's for queries).
        history_len: scores kept per admission's history (approximately: MAXLEN ~).
        open_ttl_s: how long an admission's score outlives its last write while open.
        discharged_ttl_s: the same once discharged.
    """

    def __init__(
        self,
        client: redis.Redis,
        history_len: int = 100,
        open_ttl_s: int = OPEN_TTL_S,
        discharged_ttl_s: int = DISCHARGED_TTL_S,
    ):
        self.client = client
        self.history_len = history_len
        self.open_ttl_s = open_ttl_s
        self.discharged_ttl_s = discharged_ttl_s

    def write_batch(self, scores: list[RiskScore], discharged: Collection[int] = ()) -> int:
        """Write scores in one round trip; return how many were newer than the stored ones.
        ``discharged``: admissions whose discharge these scores include."""

        def write(pipe):
            for s in scores:
                _WRITE_SCORE(
                    pipe,
                    [
                        SCORE_KEY.format(hadm_id=s.hadm_id),
                        HISTORY_KEY.format(hadm_id=s.hadm_id),
                        RANKING_KEY,
                    ],
                    [
                        repr(s.los_remaining_days),
                        repr(s.expected_discharge),
                        repr(s.mortality_prob),
                        s.model,
                        repr(s.feature_time),
                        repr(s.scored_at),
                        "1" if s.hadm_id in discharged else "0",
                        self.history_len,
                        s.hadm_id,
                        self.open_ttl_s,
                        self.discharged_ttl_s,
                    ],
                )

        return sum(int(r) for r in run_scripts(self.client, write, _WRITE_SCORE))

    def discharge(self, hadm_ids: Collection[int]) -> None:
        """Admissions discharged without a new score: off the ranking for good."""
        if not hadm_ids:
            return
        with self.client.pipeline(transaction=False) as pipe:
            for hadm_id in hadm_ids:
                key = SCORE_KEY.format(hadm_id=hadm_id)
                pipe.hset(key, "discharged", "1")
                pipe.expire(key, self.discharged_ttl_s)
                pipe.expire(HISTORY_KEY.format(hadm_id=hadm_id), self.discharged_ttl_s)
            pipe.zrem(RANKING_KEY, *hadm_ids)
            pipe.execute()

    def prune_ranking(self, chunk: int = 1000) -> int:
        """Remove ranking entries whose score has expired; how many went."""
        removed = 0
        members = [m for m, _ in self.client.zscan_iter(RANKING_KEY, count=chunk)]
        for start in range(0, len(members), chunk):
            part = members[start : start + chunk]
            with self.client.pipeline(transaction=False) as pipe:
                for member in part:
                    pipe.exists(SCORE_KEY.format(hadm_id=int(member)))
                alive = pipe.execute()
            gone = [m for m, ok in zip(part, alive) if not ok]
            if gone:
                removed += self.client.zrem(RANKING_KEY, *gone)
        return removed

    def get(self, hadm_id: int) -> RiskScore | None:
        return _from_fields(hadm_id, self.client.hgetall(SCORE_KEY.format(hadm_id=hadm_id)))

    def top(self, n: int = 20) -> list[RiskScore]:
        ids = [int(m) for m in self.client.zrevrange(RANKING_KEY, 0, n - 1)]
        with self.client.pipeline(transaction=False) as pipe:
            for hadm_id in ids:
                pipe.hgetall(SCORE_KEY.format(hadm_id=hadm_id))
            rows = pipe.execute()
        scores = (_from_fields(hadm_id, fields) for hadm_id, fields in zip(ids, rows))
        return [s for s in scores if s is not None]

    def history(self, hadm_id: int, count: int = 100) -> list[dict]:
        entries = self.client.xrevrange(HISTORY_KEY.format(hadm_id=hadm_id), count=count)
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def _from_fields(hadm_id: int, fields: dict[bytes, bytes]) -> RiskScore | None:
    f = {k.decode(): v.decode() for k, v in fields.items()}
    # No score: no hash, a discharge recorded before any score was written, or a score
    # from before the remaining-stay contract (its los_days was the total stay).
    if "los_remaining_days" not in f:
        return None
    return RiskScore(
        hadm_id,
        float(f["los_remaining_days"]),
        float(f["mortality_prob"]),
        f["model"],
        float(f["feature_time"]),
        float(f["scored_at"]),
        float(f["expected_discharge"]),
    )
