"""Issue 6: a synthetic cohort replayed end to end through Kafka, the online store and
M3T-LM on Triton. Every admission gets a score equal to offline batch scoring of the
offline features at the same cutoff, by both serving paths (cached encoders, full model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from features import model_inputs as mi
from features.cxr import CxrPreprocessor, preprocess_uris
from features.offline import snapshots
from features.online import OnlineStore
from features.state import hours
from m3t.clients import triton_admin_headers
from stream.scores import SCORE_KEY, ScoreStore
from stream.scoring import EMB_KEY, CachedEncoderScorer, FullModelScorer, OnlineFeatures
from stream.wiring import connect
from stream.worker import StreamWorker
from stream.xrays import CxrInputs
from tests.conftest import command_calls, replay_all
from trainer.publish import load_in_triton, read_config

pytestmark = pytest.mark.services


def offline_scores(cohort, fitted, model) -> dict[int, tuple[float, float]]:
    """Batch scoring of the offline features as of each admission's last event."""
    hadm_ids = sorted(cohort)
    cutoffs = [hours(cohort[h][-1].event_time) for h in hadm_ids]
    blobs = [
        snapshots(cohort[h], [t], fitted.vocab, fitted.note_tokens)[0]
        for h, t in zip(hadm_ids, cutoffs)
    ]
    inputs = fitted.assemble(blobs, np.array(cutoffs))
    uris = [u or "" for u in inputs["cxr_uri"].tolist()]
    distinct = sorted({u for u in uris if u})
    images, ok, _ = preprocess_uris(distinct, CxrPreprocessor(device="cpu"))
    cxr = np.zeros((len(uris), 1, mi.CXR_SIZE, mi.CXR_SIZE), np.float32)
    decoded = np.zeros(len(uris), bool)
    for row, uri in enumerate(uris):
        if uri:
            cxr[row], decoded[row] = images[distinct.index(uri)], ok[distinct.index(uri)]
    mask = inputs[mi.MODALITY_MASK].copy()
    mask[:, 2] *= decoded
    with torch.no_grad():
        los, mortality = model(
            *(
                torch.from_numpy(np.asarray(a))
                for a in (
                    inputs[mi.NUMERIC],
                    inputs[mi.NUMERIC_MASK],
                    inputs[mi.NOTES_RADIOLOGY],
                    inputs[mi.NOTES_DISCHARGE],
                    cxr,
                    mask,
                )
            )
        )
    return {
        h: (float(days), float(risk)) for h, days, risk in zip(hadm_ids, los[:, 0], mortality[:, 0])
    }


def stream_scores(
    settings, cohort, store, scorer, redis_client, group: str
) -> tuple[dict, StreamWorker]:
    for h in cohort:  # no score, and no embedding cached by a test before
        redis_client.delete(SCORE_KEY.format(hadm_id=h), EMB_KEY.format(hadm_id=h))
    scores = ScoreStore(redis_client)
    worker = connect(
        settings,
        OnlineFeatures(store),
        scorer,
        scores,
        max_batch=8,
        max_wait_ms=20,
        group_id=f"{settings.kafka.consumer_group}-{group}",  # a group the stream may join
    )
    total = sum(len(events) for events in cohort.values())
    worker.run(stop_after=total, idle_timeout_s=60)
    assert worker.stats.events == total and worker.stats.dead_letters == 0
    return {h: scores.get(h) for h in cohort}, worker


def test_replayed_cohort_scores_equal_offline_batch_scoring(
    isolated_settings, cohort, deployed, redis_client
):
    settings = isolated_settings
    fitted, model = deployed
    replay_all(settings, cohort.values())
    store = OnlineStore(redis_client, fitted, scratch=settings.kafka.consumer_group)
    want = offline_scores(cohort, fitted, model)

    cxr = CxrInputs(CxrPreprocessor(device="cpu"))
    cached_scorer = CachedEncoderScorer(settings, redis_client, cxr=cxr)
    cached, worker = stream_scores(settings, cohort, store, cached_scorer, redis_client, "cached")
    full, _ = stream_scores(
        settings, cohort, store, FullModelScorer(settings, cxr=cxr), redis_client, "full"
    )

    assert set(want) == set(cached) == set(full)
    for h, (los, mortality) in want.items():
        for path, got in (("cached", cached[h]), ("full", full[h])):
            assert got is not None, f"{path}: admission {h} has no score"
            assert got.los_remaining_days == pytest.approx(los, abs=1e-4), path
            # As read back from Redis: discharge expected after the remaining stay.
            discharge = got.feature_time + got.los_remaining_days * 86400
            assert got.expected_discharge == discharge, path
            assert got.mortality_prob == pytest.approx(mortality, abs=1e-4), path
        assert (
            cached[h].feature_time == full[h].feature_time == hours(cohort[h][-1].event_time) * 3600
        )
    # The cache did its job: X-ray embeddings were computed for fewer rows than were scored.
    assert 0 < cached_scorer.runs["cxr"] < worker.stats.scored
    assert 0 < cached_scorer.runs["notes"] < worker.stats.scored


def test_two_workers_in_one_group_share_the_partitions_and_score_as_offline(
    isolated_settings, cohort, deployed, redis_client
):
    """Issue 19.3: several workers in one consumer group (on the clusters too, with
    ``make test-cluster``): each takes its share of the partitions, every event is applied
    once, and the scores equal offline batch scoring."""
    import threading

    from benchmarks.browser import wait_for
    from m3t import kafka

    settings = isolated_settings
    fitted, model = deployed
    group = f"{settings.kafka.consumer_group}-two"
    for h in cohort:
        redis_client.delete(SCORE_KEY.format(hadm_id=h), EMB_KEY.format(hadm_id=h))
    store = OnlineStore(redis_client, fitted, scratch=group)
    scores = ScoreStore(redis_client)
    cxr = CxrInputs(CxrPreprocessor(device="cpu"))
    workers = [
        connect(
            settings,
            OnlineFeatures(store),
            CachedEncoderScorer(settings, redis_client, cxr=cxr),
            scores,
            group_id=group,
            max_batch=8,
        )
        for _ in range(2)
    ]
    threads = [
        threading.Thread(target=w.run, kwargs={"idle_timeout_s": 15}, daemon=True) for w in workers
    ]
    for thread in threads:
        thread.start()
    wait_for(lambda: kafka.group_members(settings, group) == 2, timeout_s=60, every_s=0.5)
    replay_all(settings, cohort.values())
    for thread in threads:
        thread.join(timeout=180)
    assert not any(t.is_alive() for t in threads)

    total = sum(len(events) for events in cohort.values())
    applied = [w.stats.events for w in workers]
    assert sum(applied) == total and min(applied) > 0, applied  # each had partitions
    want = offline_scores(cohort, fitted, model)
    for h, (los, mortality) in want.items():
        got = scores.get(h)
        assert got is not None, f"admission {h} has no score"
        assert got.los_remaining_days == pytest.approx(los, abs=1e-4)
        assert got.mortality_prob == pytest.approx(mortality, abs=1e-4)
        assert got.feature_time == hours(cohort[h][-1].event_time) * 3600


def test_only_admissions_with_notes_or_an_xray_read_the_embedding_cache(
    isolated_settings, cohort, deployed, redis_client
):
    fitted, _ = deployed
    store = OnlineStore(
        redis_client, fitted, scratch=f"cache-{isolated_settings.kafka.consumer_group}"
    )
    scorer = CachedEncoderScorer(
        isolated_settings, redis_client, cxr=CxrInputs(CxrPreprocessor(device="cpu"))
    )
    features = OnlineFeatures(store)
    hadm_ids = sorted(cohort)[:6]

    def cache_reads() -> int:
        return command_calls(redis_client).get("cmdstat_hgetall", 0)

    try:
        store.write_batch([e for h in hadm_ids for e in cohort[h] if e.type not in ("note", "cxr")])
        inputs, _ = features.inputs(hadm_ids)
        before = cache_reads()
        los, _ = scorer.score(inputs)
        assert len(los) == len(hadm_ids) and np.isfinite(los).all()
        assert cache_reads() == before  # numbers only: no embedding to look up

        store.write_batch([e for h in hadm_ids for e in cohort[h]])
        inputs, _ = features.inputs(hadm_ids)
        mask = inputs[mi.MODALITY_MASK]
        with_modality = int(((mask[:, 0] > 0) | (mask[:, 1] > 0) | (inputs["cxr_uri"] != "")).sum())
        assert with_modality > 0
        before = cache_reads()
        scorer.score(inputs)
        assert cache_reads() == before + with_modality
    finally:
        store.drop()
        redis_client.delete(*[f"m3t:emb:{{{h}}}" for h in hadm_ids])


def test_scoring_benchmark_compares_cache_and_full_model(
    isolated_settings, cohort, deployed, redis_client, tmp_path
):
    from benchmarks import bench_scoring, harness

    fitted, _ = deployed
    store = OnlineStore(
        redis_client, fitted, scratch=f"bench-{isolated_settings.kafka.consumer_group}"
    )
    store.write_batch([e for events in cohort.values() for e in events])
    result = bench_scoring.run(
        isolated_settings, repeats=1, paced=(50, 1.0), store=store, hadm_ids=sorted(cohort)
    )
    assert not result.missing
    *batched, paced = result.rows
    assert [r["variant"] for r in batched] == [bench_scoring.FULL, bench_scoring.CACHED]
    assert all(r["items_per_s"] > 0 and r["batch"] == len(cohort) for r in batched)
    # One admission a call at 50 a second for 1 s: each call's CPU, by process on its path.
    assert paced["variant"] == bench_scoring.CACHED and paced["batch"] == 1
    assert paced["calls"] == 50 and 0 < paced["p50_ms"] <= paced["p99_ms"]
    cpu = paced["cpu_ms_per_call"]
    assert set(cpu) == {"scorer", "triton", "redis"} and cpu["scorer"] > 0 and cpu["triton"] > 0
    assert result.params["paced"] == [50, 1.0]
    assert (
        result.params["max_abs_diff_los"] <= 1e-4
        and result.params["max_abs_diff_mortality"] <= 1e-4
    )
    assert result.params["with_cxr"] > 0.5  # the synthetic cohort has X-rays for most stays
    (comparison,) = result.comparisons
    assert comparison["numerator"] == bench_scoring.CACHED and comparison["ratio"] > 0
    saved = harness.save(result, tmp_path)
    assert harness.load(saved["json"]).stage == "scoring"


def test_in_process_onnx_runtime_path_equals_triton(
    isolated_settings, cohort, deployed, redis_client
):
    fitted, _ = deployed
    store = OnlineStore(
        redis_client, fitted, scratch=f"onnx-{isolated_settings.kafka.consumer_group}"
    )
    store.write_batch([e for events in cohort.values() for e in events])
    inputs, _ = OnlineFeatures(store).inputs(sorted(cohort))
    cxr = CxrInputs(CxrPreprocessor(device="cpu"))
    for make in (
        lambda b: FullModelScorer(isolated_settings, cxr=cxr, backend=b),
        lambda b: CachedEncoderScorer(isolated_settings, redis_client, cxr=cxr, backend=b),
    ):
        on_triton, in_process = make("triton"), make("onnx")
        assert in_process.model == on_triton.model  # the same published version
        for a, b in zip(on_triton.score(inputs), in_process.score(inputs)):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_batch_answers_alike_as_one_blocking_request_or_as_chunks_in_flight_together(
    deployed, triton
):
    from tritonclient.utils import InferenceServerException

    from stream.models import TritonModel

    model = TritonModel(triton, "m3t_rescore")
    config = triton.get_model_config("m3t_rescore", as_json=True)["config"]
    rng = np.random.default_rng(3)
    arrays = {
        i["name"]: rng.random((7, int(i["dims"][-1])), dtype=np.float32) for i in config["input"]
    }
    whole = model.infer(arrays)  # one request, sent blocking
    model.max_batch = 3  # three requests (3, 3, 1 rows), in flight together
    chunked = model.infer(arrays)
    for name in model.outputs:
        assert whole[name].shape == (7, 1)
        np.testing.assert_allclose(chunked[name], whole[name], atol=1e-6)
    # A lone request's error comes back as its result, as a chunk's does.
    short = {**arrays, "numeric": arrays["numeric"][:, :5]}
    (answer,) = model.requests([short])
    assert isinstance(answer, InferenceServerException)
    with pytest.raises(InferenceServerException):
        model.infer(short)


def test_a_score_as_json_carries_every_field():
    import dataclasses
    import json

    from stream.scores import RiskScore

    score = RiskScore.predicted(7, 3.5, 0.25, "m3t_lm:2", 1.5e9, 1.6e9)
    assert json.loads(score.as_json()) == dataclasses.asdict(score)


STANDIN_CONFIG = """name: "m3t_cxr_embed"
backend: "python"
max_batch_size: 8
input {{ name: "cxr_bytes" data_type: TYPE_UINT8 dims: -1 allow_ragged_batch: true }}
output {{ name: "emb_cxr" data_type: TYPE_FP32 dims: {width} }}
instance_group {{ count: 1 kind: KIND_CPU }}
dynamic_batching {{ max_queue_delay_microseconds: 1000 }}
"""


def test_xrays_sent_as_bytes_to_tritons_cxr_ensemble_embed_like_the_workers_pipeline(
    settings, deployed, cohort, redis_client, tmp_path
):
    import shutil
    from pathlib import Path

    import tritonclient.grpc as grpcclient

    from features.cxr import Encoded, Pixels, load
    from features.image_files import BadImage
    from stream.xrays import CXR_EMBED

    repo = settings.model_repo
    width = read_config(repo / "m3t_enc_cxr" / "config.pbtxt").output[0].dims[0]
    folder = repo / CXR_EMBED
    (folder / "1").mkdir(parents=True)
    shutil.copy(
        Path(__file__).parent / "triton_models" / "cxr_embed_standin.py", folder / "1" / "model.py"
    )
    (folder / "config.pbtxt").write_text(STANDIN_CONFIG.format(width=width))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    uris = sorted({e.payload.uri for events in cohort.values() for e in events if e.type == "cxr"})
    uris += [
        (settings.data_dir / "cxr-samples" / name).as_uri()  # uncompressed DICOM: pixels, not bytes
        for name in ("nih-cxr14_gcp-dicom_DX_implicit.dcm", "nema-wg04_RG1_chest_UNCR.dcm")
    ]
    kinds = []
    for uri in uris:
        try:
            kinds.append(type(load(uri)))
        except BadImage:
            kinds.append(None)
    assert Encoded in kinds and Pixels in kinds  # both routes are exercised
    uris += [corrupt.as_uri(), (tmp_path / "missing.png").as_uri()]
    try:
        assert load_in_triton(settings, (CXR_EMBED,)) == {CXR_EMBED: True}
        on_triton = CachedEncoderScorer(settings, redis_client)  # "auto": the ensemble is loaded
        in_worker = CachedEncoderScorer(settings, redis_client, cxr_pipeline="worker")
        assert on_triton.cxr_embedder is not None and in_worker.cxr_embedder is None
        got = on_triton.cxr_embedder(uris)
        want = in_worker._embed_locally(uris)
        np.testing.assert_array_equal(got["cxr_ok"], want["cxr_ok"])
        assert not got["cxr_ok"][-2:].any() and got["cxr_ok"].sum() == sum(
            k is not None for k in kinds
        )
        decoded = (
            got["cxr_ok"][:, 0] > 0
        )  # elsewhere the fusion head uses its placeholder, whatever the row holds
        np.testing.assert_allclose(got[mi.EMB_CXR][decoded], want[mi.EMB_CXR][decoded], atol=1e-5)
        assert on_triton.cxr_embedder.sent == kinds.count(Encoded)  # pixels went through the worker
    finally:
        client = grpcclient.InferenceServerClient(settings.triton.grpc_url)
        client.unload_model(CXR_EMBED, headers=triton_admin_headers(settings))
        client.close()
        shutil.rmtree(folder)
