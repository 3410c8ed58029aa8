"""Risk scores in Redis: the current score per admission, a ranking, and a bounded history.

Layout (hash tags keep one admission's keys on one Redis Cluster slot):
  m3t:score:{HADM}          hash: los_days, mortality_prob, model, feature_time, scored_at
  m3t:score-history:{HADM}  stream of past scores, capped at ``history_len``
  m3t:risk:inpatients       sorted set of current inpatients by mortality probability
A score older than the stored one (by feature time) is skipped, so replays are harmless.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis

from m3t.clients import LuaScript, run_scripts

SCORE_KEY = "m3t:score:{{{hadm_id}}}"
HISTORY_KEY = "m3t:score-history:{{{hadm_id}}}"
RANKING_KEY = "m3t:risk:inpatients"

# Compare-and-set by feature time, all in one round trip: a stale or repeated score is a no-op.
_WRITE_SCORE = LuaScript("""
local current = redis.call('HGET', KEYS[1], 'feature_time')
if current and tonumber(current) > tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], 'los_days', ARGV[1], 'mortality_prob', ARGV[2], 'model', ARGV[3],
           'feature_time', ARGV[4], 'scored_at', ARGV[5])
if current ~= ARGV[4] then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'los_days', ARGV[1],
             'mortality_prob', ARGV[2], 'model', ARGV[3], 'feature_time', ARGV[4])
end
if ARGV[6] == '1' then redis.call('ZADD', KEYS[3], ARGV[2], ARGV[8]) end
return 1
""")


@dataclass(frozen=True)
class RiskScore:
    hadm_id: int
    los_days: float
    mortality_prob: float
    model: str  # "name:version"
    feature_time: float  # epoch seconds of the newest event the features include
    scored_at: float  # epoch seconds

    def as_json(self) -> str:
        # A dict by hand: dataclasses.asdict deep-copies, too slow for the hot path.
        return json.dumps(
            {
                "hadm_id": self.hadm_id,
                "los_days": self.los_days,
                "mortality_prob": self.mortality_prob,
                "model": self.model,
                "feature_time": self.feature_time,
                "scored_at": self.scored_at,
            }
        )


class ScoreStore:
    def __init__(self, client: redis.Redis, history_len: int = 100):
        self.client = client
        self.history_len = history_len

    def write_batch(self, scores: list[RiskScore], inpatient: dict[int, bool] | None = None) -> int:
        """Write scores in one pipeline; return how many were newer than the stored ones."""
        inpatient = inpatient or {}

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
                        repr(s.los_days),
                        repr(s.mortality_prob),
                        s.model,
                        repr(s.feature_time),
                        repr(s.scored_at),
                        "1" if inpatient.get(s.hadm_id, True) else "0",
                        self.history_len,
                        s.hadm_id,
                    ],
                )

        return sum(int(r) for r in run_scripts(self.client, write, _WRITE_SCORE))

    def discharge(self, hadm_ids: list[int]) -> None:
        """Discharged admissions leave the ranking; their last score stays readable."""
        if hadm_ids:
            self.client.zrem(RANKING_KEY, *hadm_ids)

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
    if not fields:
        return None
    f = {k.decode(): v.decode() for k, v in fields.items()}
    return RiskScore(
        hadm_id,
        float(f["los_days"]),
        float(f["mortality_prob"]),
        f["model"],
        float(f["feature_time"]),
        float(f["scored_at"]),
    )
