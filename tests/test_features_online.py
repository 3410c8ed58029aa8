"""Issue 4 on the real Redis: the online store, idempotence, batched reads, parity."""

from __future__ import annotations

import random
import threading
import uuid
from datetime import timedelta

import numpy as np
import pytest
from typer.testing import CliRunner

from features import model_inputs as mi
from features import offline, parity, sample
from features.fitted import FittedFeatures
from features.layout import URI_INLINE
from features.online import (
    DISCHARGED_TTL_S,
    EVENT_ID_CONFLICT,
    OPEN_TTL_S,
    STORE_FORMAT,
    OnlineStore,
)
from features.state import AdmissionState
from features.vocab import Vocabulary
from ingest import events as ev
from ingest.events import sort_key
from m3t import services
from m3t.clients import is_cluster
from m3t.clients import redis_client as connect
from tests.conftest import command_calls, make_settings, settings_env

pytestmark = pytest.mark.services

COHORT = sample.cohort(40, seed=11)
EVENTS = [e for evs in COHORT.values() for e in evs]
FITTED = FittedFeatures.unnormalised(
    Vocabulary.fit(e.payload.text for e in EVENTS if e.type == "note")
)
runner = CliRunner()


@pytest.fixture
def store(redis_client):
    store = OnlineStore(redis_client, FITTED, scratch=f"test-{uuid.uuid4().hex[:8]}")
    yield store
    store.drop()


def offline_blob(events) -> bytes:
    state = AdmissionState()
    for event in events:
        state.apply(event, FITTED.vocab)
    return state.to_blob()


def test_streamed_state_equals_the_offline_fold(store):
    store.write_batch(EVENTS)
    hadm_ids = list(COHORT) + [1, 2]  # and two unknown admissions
    fitted = FittedFeatures(
        FITTED.vocab, np.linspace(-1, 1, len(FITTED.mean)), np.linspace(0.5, 2, len(FITTED.std))
    )
    normalised = OnlineStore(store.client, fitted, scratch=f"test-{uuid.uuid4().hex[:8]}")
    try:
        normalised.write_batch(EVENTS)
        for name, s in (("unnormalised", store), ("normalised", normalised)):
            # The serving read (what the stream scores) and the point-in-time read, both as of
            # each admission's latest event: the same bits as the offline fold's transform.
            want = s.fitted.assemble(
                [offline_blob(COHORT[h]) for h in hadm_ids[:-2]] + [None, None]
            )
            served, rebuilt = s.read_inputs(hadm_ids), s.read_inputs(hadm_ids, as_of=want["as_of"])
            assert set(served) == set(want) - {"numeric_raw"} and set(rebuilt) == set(want)
            for key in want:
                np.testing.assert_array_equal(rebuilt[key], want[key], err_msg=f"{name}: {key}")
                if key != "numeric_raw":
                    np.testing.assert_array_equal(served[key], want[key], err_msg=f"{name}: {key}")
            assert list(served["present"]) == [True] * len(COHORT) + [False, False]
    finally:
        normalised.drop()


def test_writes_load_their_scripts_once_and_again_after_the_cache_is_flushed(store, redis_client):
    # Pipelines send EVALSHA alone: no SCRIPT EXISTS before each; a NOSCRIPT answer (an
    # empty script cache, as after a restart) loads them and sends the pipeline again.
    from stream.scores import RiskScore, ScoreStore

    first, second = EVENTS[: len(EVENTS) // 2], EVENTS[len(EVENTS) // 2 :]
    redis_client.script_flush()
    redis_client.config_resetstat()
    store.write_batch(first)
    store.write_batch(second)
    scores = ScoreStore(redis_client)
    assert scores.write_batch([RiskScore.predicted(70_000_001, 3.0, 0.2, "m", 10.0, 11.0)]) == 1
    stats = redis_client.info("commandstats")
    assert "cmdstat_script|exists" not in stats
    assert stats["cmdstat_script|load"]["calls"] == 2  # the commit and score scripts, once each
    hadm_ids = list(COHORT)
    want = FITTED.assemble([offline_blob(COHORT[h]) for h in hadm_ids])
    np.testing.assert_array_equal(store.read_inputs(hadm_ids)[mi.NUMERIC], want[mi.NUMERIC])
    assert scores.get(70_000_001).los_remaining_days == 3.0
    redis_client.delete("m3t:score:{70000001}", "m3t:score-history:{70000001}")
    redis_client.zrem("m3t:risk:inpatients", 70_000_001)


@pytest.mark.single_node
def test_a_write_of_many_admissions_commits_in_one_transaction(store, redis_client):
    # A long pipeline reaches Redis over many event-loop passes, each synced to disk under
    # appendfsync always; one MULTI/EXEC is applied and synced once.
    store.write_batch(EVENTS[:1])  # its scripts are loaded
    rest = EVENTS[1:]
    redis_client.config_resetstat()
    store.write_batch(rest)
    stats = redis_client.info("commandstats")
    assert stats["cmdstat_exec"]["calls"] == 1
    assert stats["cmdstat_evalsha"]["calls"] == len({e.hadm_id for e in rest})
    hadm_ids = list(COHORT)
    want = FITTED.assemble([offline_blob(COHORT[h]) for h in hadm_ids])
    np.testing.assert_array_equal(store.read_inputs(hadm_ids)[mi.NUMERIC], want[mi.NUMERIC])


def test_duplicates_and_out_of_order_delivery_change_nothing(store):
    store.write_batch(EVENTS)
    stored = store.read_blobs(list(COHORT))

    replay = (
        random.Random(0).sample(EVENTS, len(EVENTS)) + EVENTS[:50]
    )  # shuffled, some twice in one batch
    stats = store.write_batch(replay)
    assert stats.applied == 0 and stats.duplicates == len(replay)
    assert store.read_blobs(list(COHORT)) == stored

    # A fresh store fed the same events shuffled, in small redelivered chunks, ends the same.
    other = OnlineStore(store.client, FITTED, scratch=f"test-{uuid.uuid4().hex[:8]}")
    try:
        shuffled = random.Random(1).sample(EVENTS, len(EVENTS))
        for i in range(0, len(shuffled), 37):
            other.write_batch(shuffled[i : i + 37] + shuffled[max(0, i - 10) : i])
        a, b = store.read_inputs(list(COHORT)), other.read_inputs(list(COHORT))
        np.testing.assert_allclose(a[mi.NUMERIC], b[mi.NUMERIC], rtol=1e-6, atol=1e-6)
        for name in (mi.NUMERIC_MASK, mi.NOTES_RADIOLOGY, mi.NOTES_DISCHARGE, "cxr_uri"):
            np.testing.assert_array_equal(a[name], b[name])
    finally:
        other.drop()


def kept(store, hadm_id) -> tuple:
    """Everything the store keeps of an admission: serving blob, state hash, seen hash."""
    serving, state, seen = store.keys(hadm_id)
    return store.client.get(serving), store.client.hgetall(state), store.client.hgetall(seen)


def with_value(event, delta: float):
    """``event`` (an observation) under the same id, its value moved by ``delta``."""
    payload = event.payload.model_copy(update={"value": event.payload.value + delta})
    return event.model_copy(update={"payload": payload})


def test_an_event_resent_with_the_same_content_is_a_duplicate(store):
    hadm_id = list(COHORT)[0]
    store.write_batch(COHORT[hadm_id])
    before = kept(store, hadm_id)
    for event in COHORT[hadm_id]:
        later = event.model_copy(update={"ingest_time": event.ingest_time + timedelta(hours=1)})
        resent = ev.decode(ev.encode(later))  # as the worker reads it back from Kafka
        stats = store.write_batch([resent])
        assert (stats.applied, stats.duplicates, stats.refused) == (0, 1, []), event.type
    assert kept(store, hadm_id) == before
    seen = before[2]
    assert seen == {e.event_id.encode(): ev.content_digest(e) for e in COHORT[hadm_id]}


def test_an_event_under_an_applied_id_with_other_content_is_refused(store):
    hadm_id = list(COHORT)[0]
    events = COHORT[hadm_id]
    store.write_batch(events[:-2])
    before = kept(store, hadm_id)
    obs = next(e for e in events if e.type == "observation")
    forged = with_value(obs, 1.0)
    stats = store.write_batch([forged])
    assert (stats.applied, stats.duplicates, stats.refused) == (0, 0, [(forged, EVENT_ID_CONFLICT)])
    assert stats.refused[0][0] is forged and kept(store, hadm_id) == before

    # Beside new events of its admission: they are applied, it is not.
    stats = store.write_batch([forged, *events[-2:]])
    assert (stats.applied, stats.duplicates, stats.refused) == (2, 0, [(forged, EVENT_ID_CONFLICT)])
    want = FITTED.assemble([offline_blob(events)])
    np.testing.assert_array_equal(store.read_inputs([hadm_id])[mi.NUMERIC], want[mi.NUMERIC])
    assert store.client.hget(store.keys(hadm_id)[2], obs.event_id) == ev.content_digest(obs)


def test_a_forged_event_that_came_first_makes_the_real_one_a_refusal_not_a_duplicate(store):
    # The store cannot tell which came from whom; the second content under an id is refused
    # where it could be seen (a dead letter), never counted as a duplicate.
    hadm_id = list(COHORT)[1]
    *events, discharge = COHORT[hadm_id]
    assert discharge.type == "discharge"
    store.write_batch(events)
    outcome = not discharge.payload.hospital_expire_flag
    payload = discharge.payload.model_copy(update={"hospital_expire_flag": outcome})
    forged = discharge.model_copy(update={"payload": payload})
    assert store.write_batch([forged]).applied == 1
    stats = store.write_batch([discharge])
    assert (stats.applied, stats.duplicates, stats.refused) == (
        0,
        0,
        [(discharge, EVENT_ID_CONFLICT)],
    )


def test_two_contents_under_one_id_in_one_batch_the_first_claims_it(store):
    hadm_id = list(COHORT)[2]
    events = COHORT[hadm_id]
    obs = next(e for e in events if e.type == "observation")
    same, other = ev.decode(ev.encode(obs)), with_value(obs, 2.0)
    stats = store.write_batch([*events, same, other])
    assert (stats.applied, stats.duplicates, stats.refused) == (
        len(events),
        1,
        [(other, EVENT_ID_CONFLICT)],
    )
    want = FITTED.assemble([offline_blob(events)])
    np.testing.assert_array_equal(store.read_inputs([hadm_id])[mi.NUMERIC], want[mi.NUMERIC])
    assert store.client.hget(store.keys(hadm_id)[2], obs.event_id) == ev.content_digest(obs)


def test_a_late_event_lands_by_its_charttime(store):
    hadm_id = list(COHORT)[0]
    events = COHORT[hadm_id]
    store.write_batch(events)
    obs = next(e for e in events if e.type == "observation")
    name = next(
        f
        for f in FITTED.to_dict()["numeric_features"]
        if f.endswith(".last") and f.split(".")[0] == _item_name(obs.payload.itemid)
    )
    before = store.describe(hadm_id)["numeric"][name]

    def late(offset_h, event_id):
        when = obs.payload.charttime + timedelta(hours=offset_h)
        payload = obs.payload.model_copy(update={"charttime": when, "value": obs.payload.value + 7})
        return obs.model_copy(update={"event_id": event_id, "payload": payload})

    store.write_batch([late(-1000, "older")])
    assert store.describe(hadm_id)["numeric"][name] == before
    store.write_batch([late(+1000, "newer")])
    assert store.describe(hadm_id)["numeric"][name] == round(obs.payload.value + 7, 4)


def _item_name(itemid):
    from ingest.itemids import ITEMS

    return ITEMS[itemid].name


def test_concurrent_workers_with_redelivery_apply_each_event_once(store, settings):
    chunks = [EVENTS[i : i + 60] for i in range(0, len(EVENTS), 60)]
    workers = [
        OnlineStore(connect(settings), FITTED, scratch=store.prefix.split(":")[1]) for _ in range(3)
    ]
    errors = []

    def work(worker, seed):
        try:
            for chunk in random.Random(seed).sample(
                chunks, len(chunks)
            ):  # every worker gets every event
                worker.write_batch(chunk)
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w, i)) for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    online = store.read_inputs(list(COHORT))
    want = FITTED.assemble([offline_blob(COHORT[h]) for h in COHORT])
    np.testing.assert_allclose(online[mi.NUMERIC], want[mi.NUMERIC], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(online[mi.NOTES_RADIOLOGY], want[mi.NOTES_RADIOLOGY])
    seen = sum(store.client.hlen(store.keys(h)[2]) for h in COHORT)
    assert seen == len({e.event_id for e in EVENTS})
    for w in workers:
        w.client.close()


def test_a_batch_read_is_one_round_trip(store, redis_client):
    store.write_batch(EVENTS)
    hadm_ids = list(COHORT) + [1, 2, 3]  # unknown admissions too

    before = command_calls(redis_client)
    rows = store.read_batch(hadm_ids)
    after = command_calls(redis_client)

    # The server ran one MGET for the whole batch, and nothing else; a Redis Cluster one per
    # slot, all sent (to every node) before any reply is read.
    mgets = 1
    if is_cluster(redis_client):
        mgets = len({redis_client.keyslot(key) for key in store._serving_keys(hadm_ids)})
    served = {k: after[k] - before.get(k, 0) for k in after}
    assert {k: v for k, v in served.items() if v and k != "cmdstat_info"} == {"cmdstat_mget": mgets}
    assert len(rows) == len(hadm_ids) and rows[-3:] == [None, None, None]
    assert all(row[mi.NUMERIC].shape == (FITTED.mean.shape[0],) for row in rows[:-3])


def test_long_uris_are_read_back_whole_by_both_reads(store):
    # The serving record holds URIs of up to URI_INLINE bytes; a longer one follows it, and
    # the admission's later events are folded from it (the write's load).
    hadm_ids = list(COHORT)[:4]
    long_uri = "s3://archive/" + "é" * URI_INLINE
    events = []
    for i, h in enumerate(hadm_ids[:2]):
        template = next(e for e in EVENTS if e.type == "cxr")
        events.append(
            template.model_copy(
                update={
                    "event_id": f"long-uri-{h}",
                    "hadm_id": h,
                    "event_time": COHORT[h][-1].event_time,
                    "payload": template.payload.model_copy(
                        update={"uri": long_uri + str(i), "studytime": COHORT[h][-1].event_time}
                    ),
                }
            )
        )
    history = {h: COHORT[h] + [e for e in events if e.hadm_id == h] for h in hadm_ids}
    store.write_batch(events + [e for h in hadm_ids for e in COHORT[h][: len(COHORT[h]) // 2]])
    store.write_batch([e for h in hadm_ids for e in COHORT[h][len(COHORT[h]) // 2 :]])
    want = FITTED.assemble([offline_blob(sorted(history[h], key=sort_key)) for h in hadm_ids])
    assert want["cxr_uri"].tolist()[:2] == [long_uri + "0", long_uri + "1"]
    served, rebuilt = store.read_inputs(hadm_ids), store.read_inputs(hadm_ids, as_of=want["as_of"])
    for key in served:
        np.testing.assert_array_equal(served[key], want[key], err_msg=key)
        np.testing.assert_array_equal(rebuilt[key], want[key], err_msg=key)


def test_keys_carry_the_version_and_a_hash_tag_and_expire(store):
    open_events = [e for e in COHORT[list(COHORT)[0]] if e.type != "discharge"]
    closed = COHORT[list(COHORT)[1]]
    store.write_batch(open_events + closed)
    blob_key = store.keys(list(COHORT)[1])[0]
    assert blob_key.startswith(store.prefix) and f"v{FITTED.version}-" in blob_key
    assert blob_key.startswith(f"{store.prefix}:{STORE_FORMAT}:")  # the key layout's version
    assert f"{{{list(COHORT)[1]}}}" in blob_key
    for key in store.keys(list(COHORT)[1]):
        assert 0 < store.client.ttl(key) <= DISCHARGED_TTL_S
    for key in store.keys(list(COHORT)[0]):
        assert DISCHARGED_TTL_S < store.client.ttl(key) <= OPEN_TTL_S


def test_online_offline_parity_on_hand_built_events(redis_client):
    report = parity.check_parity(
        EVENTS, redis_client, offline.CutoffPolicy((6.0, 24.0, 48.0)), sample=25
    )
    assert report.ok, report
    assert report.admissions == 25 and report.cutoffs >= 50


def test_parity_on_the_mimic_demo_and_the_cli(settings, monkeypatch, redis_client):
    from app.cli import app
    from ingest.mimic import MimicReader
    from m3t.settings import get_settings

    demo = settings.data_dir / "mimic-iv-demo-2.2"
    report = parity.check_parity(
        MimicReader(demo, cxr="none").admissions(), redis_client, sample=40, seed=2
    )
    assert report.ok, report
    assert report.admissions == 40 and report.cutoffs > 40

    for name, value in settings_env(settings).items():  # its services and credentials
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        result = runner.invoke(
            app, ["features", "check-parity", str(demo), "--sample", "10", "--json"]
        )
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert '"ok": true' in result.output and '"admissions": 10' in result.output


def test_features_get_shows_an_admission(settings, monkeypatch, redis_client):
    from app.cli import app
    from m3t.settings import get_settings

    store = OnlineStore(redis_client, FITTED)  # the serving namespace, as `publish` makes it
    hadm_id = list(COHORT)[3]
    store.write_batch(COHORT[hadm_id])
    store.publish()
    for name, value in settings_env(settings).items():  # its services and credentials
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        shown = runner.invoke(app, ["features", "get", str(hadm_id), "--json"])
        table = runner.invoke(app, ["features", "get", str(hadm_id)])
        missing = runner.invoke(app, ["features", "get", "1"])
    finally:
        get_settings.cache_clear()
        store.drop()
    assert shown.exit_code == 0, shown.output
    assert f'"hadm_id": {hadm_id}' in shown.output and '"creatinine.count"' in shown.output
    assert table.exit_code == 0 and "hours_since_admission" in table.output
    assert missing.exit_code == 2


@pytest.fixture
def own_redis(settings, tmp_path):
    """Settings for a Redis of the test's own, and their environment variables: database 15
    of the session's server, or on a Redis Cluster (database 0 only) a cluster of its own."""
    if not settings.cluster:
        isolated = settings.redis.model_copy(update={"db": 15})
        env = {**settings_env(settings), "M3T_REDIS__DB": "15"}
        yield settings.model_copy(update={"redis": isolated}), env
        return
    cluster = make_settings(tmp_path, cluster=True)
    try:
        services.up(cluster, ["redis"])
        yield cluster, settings_env(cluster)
    finally:
        services.down(cluster, ["redis"])


def test_prune_lists_and_deletes_only_what_the_stream_no_longer_uses(own_redis, monkeypatch):
    # On a Redis of its own, so that what the other tests publish and leave does not count;
    # on a cluster its keys lie on every primary, and each is scanned.
    from app.cli import app
    from m3t.settings import get_settings

    isolated, env = own_redis
    client = connect(isolated, role="admin")
    client.flushdb()
    try:
        other = FittedFeatures.unnormalised(Vocabulary.fit(["another vocabulary entirely"]))
        current, previous = OnlineStore(client, FITTED), OnlineStore(client, other)
        hadm_id = list(COHORT)[0]
        previous.write_batch(COHORT[hadm_id])
        previous.publish()
        current.write_batch(COHORT[hadm_id])
        current.publish()  # the stream moved on to FITTED's feature set
        old_layout = [key.replace(f":{STORE_FORMAT}:", ":2:") for key in current.keys(hadm_id)]
        for key in old_layout:
            client.set(key, b"written by an older layout")
        scratch = OnlineStore(client, FITTED, scratch="bench-0000")
        scratch.write_batch(COHORT[hadm_id])
        client.set("m3t:score:{1}", b"a score")
        kept = (
            set(client.keys("*"))
            - set(client.keys(f"{previous.prefix}:*"))
            - {k.encode() for k in old_layout}
        )

        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        try:
            listed = runner.invoke(app, ["features", "prune"])
            assert client.exists(*old_layout) == 3  # listing deletes nothing
            pruned = runner.invoke(app, ["features", "prune", "--apply"])
        finally:
            get_settings.cache_clear()
        assert listed.exit_code == 0, listed.output
        assert previous.prefix in listed.output and f"{current.prefix}:2" in listed.output
        # the other feature set's 5 keys (all_keys) and fitted, 3 old-layout keys
        assert "9 stale keys" in listed.output
        assert pruned.exit_code == 0 and "deleted 9 stale keys" in pruned.output
        assert set(client.keys("*")) == kept
        np.testing.assert_array_equal(current.read_inputs([hadm_id])["present"], [True])
    finally:
        client.flushdb()
        client.close()


def test_parity_on_a_synthetic_cohort(tmp_path, redis_client):
    from ingest.mimic import MimicReader
    from ingest.synth import generate

    generate(tmp_path / "cohort", 25, seed=4, image_size=64)
    events = MimicReader(tmp_path / "cohort").admissions()
    report = parity.check_parity(events, redis_client, sample=25, seed=4)
    assert report.ok, report
    assert report.admissions == 25 and report.cutoffs > 25


FEED = {h: sample.with_feed_events(evs, seed=2) for h, evs in list(COHORT.items())[:15]}


def test_feed_events_streamed_in_any_batches_equal_the_offline_fold(store):
    """Corrections, cancels, transfers and re-sent admissions, delivered shuffled in small
    batches with duplicates: the same model inputs, status and ward as the offline fold."""
    events = [e for evs in FEED.values() for e in evs]
    rng = random.Random(3)
    rng.shuffle(events)
    events += rng.sample(events, len(events) // 4)
    for i in range(0, len(events), 37):
        store.write_batch(events[i : i + 37])
    hadm_ids = list(FEED)
    want = [AdmissionState() for _ in hadm_ids]
    for state, h in zip(want, hadm_ids):
        for e in FEED[h]:
            state.apply(e, FITTED.vocab)
    expected = FITTED.assemble([s.to_blob() for s in want])
    served = store.read_inputs(hadm_ids)
    for key in served:
        if key != "present" and served[key].dtype.kind == "f":
            np.testing.assert_allclose(served[key], expected[key], rtol=1e-6, err_msg=key)
        elif key != "present":
            np.testing.assert_array_equal(served[key], expected[key], err_msg=key)
    assert store.read_status(hadm_ids) == [(s.status, s.ward) for s in want]
    assert {s for s, _ in store.read_status(hadm_ids)} == {"discharged"}
    assert all(ward for _, ward in store.read_status(hadm_ids))


def test_a_cancelled_discharge_reopens_the_admission_in_the_store(store):
    hadm_id = next(iter(FEED))
    events = FEED[hadm_id]
    a13 = next(e for e in events if e.type == "cancel" and e.payload.cancels == "discharge")
    before = [e for e in events if e.event_time < a13.event_time]
    store.write_batch(before)
    assert store.read_status([hadm_id])[0][0] == "discharged"  # the discharge in error
    store.write_batch([a13])
    assert store.read_status([hadm_id])[0][0] == "open"


def test_online_offline_parity_with_corrections_and_cancels(redis_client):
    report = parity.check_parity(
        [e for evs in FEED.values() for e in evs], redis_client, sample=15, seed=1
    )
    assert report.ok, report
