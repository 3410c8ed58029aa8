"""Risk scores in Redis: the current score per admission, a ranking, and a bounded history.

Layout (hash tags keep one admission's keys on one Redis Cluster slot):
  m3t:score:{HADM}          hash: los_remaining_days, expected_discharge, mortality_prob, model,
                            feature_time, scored_at, ward (the current careunit, "" unknown),
                            discharged (1 once the admission's discharge was scored); with
                            explanations on (``stream.explanations``) also reasons (JSON; null
                            until ``stream.reasoner`` writes them), freshness (JSON),
                            previous_mortality_prob and reason_values (JSON: what the next
                            score's reasons compare with)
  m3t:score-history:{HADM}  stream of past scores, capped at ``history_len``
  m3t:risk:inpatients       sorted set of current inpatients by mortality probability
A score older than the stored one (by feature time) is skipped, so replays are harmless.
A discharge is kept in the score's hash, so no later score (a late result, a restarted
worker) puts the patient back on the ranking, unless the writer says the admission is open
again (the feature state's status: a cancelled discharge reopens it). The hash and history
expire with the admission's features (``features.online``'s TTLs); ranking entries whose
hash expired are pruned (``prune_ranking``).
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
from m3t.clients import LuaScript, is_cluster, round_trip, run_scripts

SCORE_KEY = "m3t:score:{{{hadm_id}}}"
HISTORY_KEY = "m3t:score-history:{{{hadm_id}}}"
RANKING_KEY = "m3t:risk:inpatients"
SECONDS_PER_DAY = 86400.0

# Compare-and-set by feature time, all in one round trip: a stale or repeated score is a no-op.
# KEYS: score hash, history, ranking (none on a Redis Cluster, where the ranking lives in
# another slot: the caller updates it from the reply). ARGV: remaining LoS, expected
# discharge, risk, model, feature time, scored at, discharged now ('1'; '0': not known;
# 'open': open again, as the feature state says), history length, ranking member, TTL open,
# TTL discharged, ward, how many of the extra fields also go to the history, then the extra
# fields as name, value pairs. Reply: {1 if fresh + 2 if gone + 4 if reopened, the stored
# risk where the caller ranks (a cluster), else ''}.
_WRITE_SCORE = LuaScript("""
local current = redis.call('HGET', KEYS[1], 'feature_time')
local reopened = ARGV[7] == 'open' and redis.call('HGET', KEYS[1], 'discharged') == '1'
if reopened then redis.call('HDEL', KEYS[1], 'discharged') end
local gone = ARGV[7] == '1' or redis.call('HGET', KEYS[1], 'discharged') == '1'
local fresh = not (current and tonumber(current) > tonumber(ARGV[5]))
if fresh then
  local fields = {'los_remaining_days', ARGV[1], 'expected_discharge', ARGV[2],
                  'mortality_prob', ARGV[3], 'model', ARGV[4], 'feature_time', ARGV[5],
                  'ward', ARGV[12]}
  local history = {unpack(fields)}
  local shared = 14 + 2 * tonumber(ARGV[13])
  for i = 14, #ARGV, 2 do
    table.insert(fields, ARGV[i])
    table.insert(fields, ARGV[i + 1])
    if i < shared then
      table.insert(history, ARGV[i])
      table.insert(history, ARGV[i + 1])
    end
  end
  table.insert(fields, 'scored_at')
  table.insert(fields, ARGV[6])
  redis.call('HSET', KEYS[1], unpack(fields))
  if current ~= ARGV[5] then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', unpack(history))
  end
end
if gone then
  redis.call('HSET', KEYS[1], 'discharged', '1')
  if KEYS[3] then redis.call('ZREM', KEYS[3], ARGV[9]) end
elseif (fresh or reopened) and KEYS[3] then
  redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'mortality_prob'), ARGV[9])
end
local ttl = gone and ARGV[11] or ARGV[10]
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
local flags = (fresh and 1 or 0) + (gone and 2 or 0) + (reopened and 4 or 0)
local risk = ''
if not KEYS[3] then risk = redis.call('HGET', KEYS[1], 'mortality_prob') or '' end
return {flags, risk}
""")


# A score's new reasons, where it is still the admission's current score (by feature time):
# into its hash, and into its history entry, the newest (re-added with them, as stream
# entries cannot change). KEYS: score hash, history. ARGV: feature time, reasons (JSON),
# history length. Reply: 1 if written, 0 if a newer score came first.
_WRITE_REASONS = LuaScript("""
if redis.call('HGET', KEYS[1], 'feature_time') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'reasons', ARGV[2])
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if last then
  local fields, same, placed = last[2], false, false
  for i = 1, #fields, 2 do
    if fields[i] == 'feature_time' and fields[i + 1] == ARGV[1] then same = true end
    if fields[i] == 'reasons' then fields[i + 1] = ARGV[2]; placed = true end
  end
  if same then
    if not placed then
      table.insert(fields, 'reasons')
      table.insert(fields, ARGV[2])
    end
    redis.call('XDEL', KEYS[2], last[1])
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
  end
end
return 1
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
    # Fields later writers add (explanations, freshness, the ward); None in older scores.
    ward: Annotated[
        str | None, Field(description="The admission's current careunit, when known")
    ] = None
    reasons: Annotated[
        list[dict] | None,
        Field(
            description="What moved the mortality risk, largest first (at most 5): feature, "
            "modality, value, previous (its value at the previous score), contribution (to "
            "the probability). Null while they are computed, just after the score is "
            "written; absent when explanations are off"
        ),
    ] = None
    freshness: Annotated[
        dict | None,
        Field(
            description="Age in hours at feature time of the newest lab, vital, note and "
            "X-ray (lab_age_h, vital_age_h, note_age_h, cxr_age_h) and the absent ones"
        ),
    ] = None
    previous_mortality_prob: Annotated[
        float | None, Field(description="The mortality risk of the admission's previous score")
    ] = None

    @classmethod
    def predicted(
        cls,
        hadm_id: int,
        los_remaining_days: float,
        mortality_prob: float,
        model: str,
        feature_time: float,
        scored_at: float,
        ward: str | None = None,
        explanation: dict | None = None,
    ) -> RiskScore:
        """A score from the model's outputs; the expected discharge follows from them.
        ``explanation``: its reasons, freshness and previous_mortality_prob, if explained."""
        discharge = feature_time + los_remaining_days * SECONDS_PER_DAY
        explained = (
            (
                explanation["reasons"],
                explanation["freshness"],
                explanation["previous_mortality_prob"],
            )
            if explanation
            else ()
        )
        return cls(
            hadm_id,
            los_remaining_days,
            mortality_prob,
            model,
            feature_time,
            scored_at,
            discharge,
            ward,
            *explained,
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
                "ward": self.ward,
                "reasons": self.reasons,
                "freshness": self.freshness,
                "previous_mortality_prob": self.previous_mortality_prob,
            }
        )

    def explained_fields(self) -> list[str]:
        """The explanation as hash and history fields (name, value, ...); none if unexplained
        (reasons pending are ``null``, replacing the previous score's)."""
        if self.freshness is None:
            return []
        previous = self.previous_mortality_prob
        return [
            "reasons",
            json.dumps(self.reasons),
            "freshness",
            json.dumps(self.freshness),
            "previous_mortality_prob",
            "" if previous is None else repr(previous),
        ]


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

    def write_batch(
        self,
        scores: list[RiskScore],
        discharged: Collection[int] = (),
        reopened: Collection[int] = (),
        hash_only: list[dict[str, str]] | None = None,
    ) -> int:
        """Write scores in one round trip; return how many were newer than the stored ones.
        ``discharged``: admissions whose discharge these scores include; ``reopened``:
        admissions the feature state says are open (a cancelled discharge puts them back);
        ``hash_only``: per score, more fields for its hash alone (not its history)."""
        cluster = is_cluster(self.client)
        ranking = [] if cluster else [RANKING_KEY]

        def write(pipe):
            for i, s in enumerate(scores):
                explained = s.explained_fields()
                extra = [x for kv in (hash_only[i] if hash_only else {}).items() for x in kv]
                _WRITE_SCORE(
                    pipe,
                    [
                        SCORE_KEY.format(hadm_id=s.hadm_id),
                        HISTORY_KEY.format(hadm_id=s.hadm_id),
                        *ranking,
                    ],
                    [
                        repr(s.los_remaining_days),
                        repr(s.expected_discharge),
                        repr(s.mortality_prob),
                        s.model,
                        repr(s.feature_time),
                        repr(s.scored_at),
                        "1"
                        if s.hadm_id in discharged
                        else "open"
                        if s.hadm_id in reopened
                        else "0",
                        self.history_len,
                        s.hadm_id,
                        self.open_ttl_s,
                        self.discharged_ttl_s,
                        s.ward or "",
                        len(explained) // 2,
                        *explained,
                        *extra,
                    ],
                )

        replies = [
            (int(flags), risk) for flags, risk in run_scripts(self.client, write, _WRITE_SCORE)
        ]
        if cluster:
            self._rank(scores, replies)
        return sum(flags & 1 for flags, _ in replies)

    def _rank(self, scores: list[RiskScore], replies: list[int]) -> None:
        """The ranking's side of ``write_batch`` on a Redis Cluster, in a second round trip:
        the same outcome, as one worker owns an admission's partition at a time."""
        gone = [s.hadm_id for s, (flags, _) in zip(scores, replies) if flags & 2]
        ranked = {
            s.hadm_id: float(risk)
            for s, (flags, risk) in zip(scores, replies)
            if flags & 5 and not flags & 2 and risk
        }
        with self.client.pipeline(transaction=False) as pipe:
            if ranked:
                pipe.zadd(RANKING_KEY, ranked)
            if gone:
                pipe.zrem(RANKING_KEY, *gone)
            pipe.execute()

    def feature_times(self, hadm_ids: list[int]) -> list[float | None]:
        """Each admission's current score's feature time (None: no score), in one round trip."""

        def queue(commands):
            for h in hadm_ids:
                commands.hget(SCORE_KEY.format(hadm_id=h), "feature_time")

        return [float(t) if t is not None else None for t in round_trip(self.client, queue)]

    def write_reasons(self, scores: list[RiskScore]) -> list[bool]:
        """Give written scores their reasons (``scores``' own), in one round trip; per score,
        whether it was still the admission's current one (otherwise nothing is written)."""

        def write(commands):
            for s in scores:
                _WRITE_REASONS(
                    commands,
                    [SCORE_KEY.format(hadm_id=s.hadm_id), HISTORY_KEY.format(hadm_id=s.hadm_id)],
                    [repr(s.feature_time), json.dumps(s.reasons), self.history_len],
                )

        return [bool(r) for r in run_scripts(self.client, write, _WRITE_REASONS)]

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
        scores = (_from_fields(hadm_id, fields) for hadm_id, fields in self.top_fields(n))
        return [s for s in scores if s is not None]

    def top_fields(self, n: int) -> list[tuple[int, dict[bytes, bytes]]]:
        """The top ``n`` of the ranking, highest risk first, each with its score hash as
        stored (empty where it expired), in one round trip after the ranking's."""
        ids = [int(m) for m in self.client.zrevrange(RANKING_KEY, 0, n - 1)]
        with self.client.pipeline(transaction=False) as pipe:
            for hadm_id in ids:
                pipe.hgetall(SCORE_KEY.format(hadm_id=hadm_id))
            return list(zip(ids, pipe.execute()))

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
        f.get("ward"),
        json.loads(f["reasons"]) if "reasons" in f else None,
        json.loads(f["freshness"]) if "freshness" in f else None,
        float(f["previous_mortality_prob"]) if f.get("previous_mortality_prob") else None,
    )
