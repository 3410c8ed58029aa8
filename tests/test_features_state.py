"""Issue 4, pure logic: the state update, the transform and the offline builder."""

from __future__ import annotations

import random
from datetime import timedelta

import numpy as np
import pytest

from features import definitions as fd
from features import model_inputs as mi
from features import offline, sample
from features.fitted import FittedFeatures
from features.layout import NUMERIC_BYTES, URI_INLINE, serving_tail
from features.state import AdmissionState, hours
from features.transform import serving_blobs, serving_inputs
from features.vocab import Vocabulary, tokenize
from ingest import events as ev
from tests.test_features_windows import recompute_windows

COHORT = sample.cohort(30, seed=3)
VOCAB = Vocabulary.fit(e.payload.text for evs in COHORT.values() for e in evs if e.type == "note")
FITTED = FittedFeatures.unnormalised(VOCAB)


def fold(events, note_tokens=mi.NOTE_TOKENS) -> AdmissionState:
    state = AdmissionState(note_tokens)
    for event in events:
        state.apply(event, VOCAB)
    return state


def features_of(state: AdmissionState, as_of: float) -> dict[str, float]:
    raw = FITTED.assemble([state.to_blob()], as_of)["numeric_raw"][0]
    return dict(zip(fd.NUMERIC_FEATURES, raw))


def recompute(events, as_of: float) -> dict[str, float]:
    """The numeric features from the whole history at once, independently of the fold."""
    out = {name: np.nan for name in fd.NUMERIC_FEATURES}
    admit = next(e for e in events if e.type == "admission").payload
    out["age"], out["sex_male"] = admit.age, float(admit.gender == "M")
    kind = admit.admission_type if admit.admission_type in fd.ADMISSION_TYPES else "other"
    for t in fd.ADMISSION_TYPES + ("other",):
        out[f"admission_type={t}"] = float(t == kind)
    out["hours_since_admission"] = as_of - hours(admit.admittime)
    for item in fd.MEASURED:
        obs = [
            e.payload for e in events if e.type == "observation" and e.payload.itemid == item.itemid
        ]
        out[f"{item.name}.count"] = float(len(obs))
        if obs:
            values = np.array([o.value for o in obs])
            latest = max(obs, key=lambda o: (o.charttime, o.value))
            out[f"{item.name}.last"] = latest.value
            out[f"{item.name}.mean"] = values.mean()
            out[f"{item.name}.min"] = values.min()
            out[f"{item.name}.max"] = values.max()
            out[f"{item.name}.hours_since_last"] = as_of - hours(latest.charttime)
    out.update(recompute_windows([e.payload for e in events if e.type == "observation"], as_of))
    return out


def assert_features_equal(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in got:
        assert np.isclose(got[name], want[name], rtol=1e-6, atol=1e-4, equal_nan=True), name


def test_feature_definitions_are_consistent():
    assert len(set(fd.NUMERIC_FEATURES)) == fd.N_NUMERIC
    specs = {s.name: s for s in mi.input_specs(fd.N_NUMERIC)}
    for feature in fd.FEATURES:
        assert feature.version == fd.FEATURE_SET_VERSION
        if feature.name in specs:
            assert (
                specs[feature.name].dtype == feature.dtype
                and specs[feature.name].shape == feature.shape
            )


@pytest.mark.parametrize("hadm_id", list(COHORT)[:10])
def test_incremental_fold_equals_recomputation_from_history(hadm_id):
    events = [e for e in COHORT[hadm_id] if e.type != "discharge"]
    as_of = hours(events[-1].event_time) + 1.5
    assert_features_equal(features_of(fold(events), as_of), recompute(events, as_of))


def test_fold_does_not_depend_on_event_order():
    events = COHORT[list(COHORT)[0]]
    shuffled = random.Random(0).sample(events, len(events))
    a, b = fold(events), fold(shuffled)
    assert_features_equal(features_of(a, 1e6), features_of(b, 1e6))
    assert a.notes.radiology_tail() == b.notes.radiology_tail()
    assert a.notes.dis_ids == b.notes.dis_ids and a.notes.cxr_uri == b.notes.cxr_uri


@pytest.mark.parametrize("split", [1, 5, 20])
def test_a_stored_state_resumes_exactly(split):
    """What the online store does between batches: store, load (notes left encoded), go on."""
    events = COHORT[list(COHORT)[4]]
    first = fold(events[:split])
    blob = first.to_blob()
    stored = first.to_aggregates(), first.to_notes(), blob[NUMERIC_BYTES:]
    resumed = AdmissionState.from_stored(*stored)
    for event in events[split:]:
        resumed.apply(event, VOCAB)
    assert resumed.to_blob() == fold(events).to_blob()
    assert AdmissionState.from_stored(*stored).to_blob() == blob
    # What a point-in-time read rebuilds from: the aggregates and the tail, no notes.
    assert AdmissionState.from_stored(stored[0], None, stored[2]).to_blob() == blob


def _note(hadm_id, i, when, text, note_type="radiology"):
    return ev.NoteEvent(
        event_id=ev.event_id("t", (hadm_id, note_type, i)),
        hadm_id=hadm_id,
        subject_id=1,
        event_time=when,
        source="t",
        payload=ev.NotePayload(
            note_type=note_type,
            text=text,
            charttime=when,
            note_id=f"{note_type}-{i}",
            from_hadm_id=hadm_id,
        ),
    )


def test_radiology_tail_is_the_latest_text_in_charttime_order_whatever_the_arrival_order():
    rng = random.Random(1)
    notes = [
        _note(
            1,
            i,
            sample.T0 + timedelta(hours=i),
            " ".join(rng.choices(sample.WORDS, k=rng.randint(1, 9))),
        )
        for i in range(30)
    ]
    expected = [i for n in notes for i in VOCAB.encode(n.payload.text)][-16:]
    for order in range(5):
        state = fold(random.Random(order).sample(notes, len(notes)), note_tokens=16)
        assert state.notes.radiology_tail() == expected
        assert len(state.notes.rad_notes) <= 17  # pruned: bounded work per event


def test_discharge_summary_is_the_latest_prior_one_and_keeps_its_end():
    older = _note(1, 0, sample.T0, "old summary", "discharge")
    newer = _note(
        1, 1, sample.T0 + timedelta(days=1), " ".join(["stable"] * 200 + ["home"]), "discharge"
    )
    for events in ([older, newer], [newer, older]):
        ids = fold(events).notes.dis_ids
        assert len(ids) == mi.NOTE_TOKENS and ids[-1] == VOCAB.encode("home")[0]


def test_latest_value_is_by_charttime_not_arrival():
    events = COHORT[list(COHORT)[1]]
    obs = next(e for e in events if e.type == "observation")
    late = obs.model_copy(
        update={
            "event_id": "late",
            "payload": obs.payload.model_copy(
                update={
                    "charttime": obs.payload.charttime - timedelta(days=30),
                    "value": obs.payload.value + 1,
                }
            ),
        }
    )
    item = fd.MEASURED[fd.ITEM_INDEX[obs.payload.itemid]].name
    before, after = features_of(fold(events), 1e6), features_of(fold(events + [late]), 1e6)
    assert after[f"{item}.last"] == before[f"{item}.last"]
    assert after[f"{item}.count"] == before[f"{item}.count"] + 1


def _cxr(hadm_id, i, when, uri):
    return ev.CxrEvent(
        event_id=ev.event_id("t", (hadm_id, "cxr", i)),
        hadm_id=hadm_id,
        subject_id=1,
        event_time=when,
        source="t",
        payload=ev.CxrPayload(study_id=i, dicom_id=f"d{i}", uri=uri, studytime=when),
    )


def test_serving_blobs_decode_to_the_transform_whatever_the_uri():
    """The serving record holds URIs of up to URI_INLINE bytes; longer ones (or ones the
    fixed-width field would cut) follow it. Either way a read returns the transform's bits."""
    histories = list(COHORT.values())[:6]
    uris = [
        "",
        "file:///cxr/1.png",
        "f" * URI_INLINE,
        "s3://b/" + "é" * URI_INLINE,
        "file:///x\0",
        "g" * (URI_INLINE + 1),
    ]
    states = []
    for events, uri in zip(histories, uris):
        extra = [_cxr(events[0].hadm_id, 9, events[-1].event_time, uri)] if uri else []
        states.append(fold([e for e in events if e.type != "cxr"] + extra))
    blobs = [state.to_blob() for state in states]
    want = FITTED.assemble(blobs)
    assert want["cxr_uri"].tolist() == uris
    served = serving_blobs(want)
    assert [len(b) > len(served[0]) for b in served] == [False, False, False, True, True, True]
    for batch in (
        [*blobs, None],
        [blobs[0], blobs[2], None, blobs[1]],
    ):  # with and without long URIs
        rows = [blobs.index(b) if b is not None else None for b in batch]
        got = serving_inputs([served[r] if r is not None else None for r in rows])
        expected = FITTED.assemble(batch)
        assert set(got) == set(expected) - {"numeric_raw"}
        for key in got:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    # What the write's load and a point-in-time read rebuild the blob from.
    for blob, serving in zip(blobs, served):
        assert serving_tail(serving) == blob[NUMERIC_BYTES:]


def test_a_serving_row_too_short_for_a_record_reads_as_unknown():
    served = serving_blobs(FITTED.assemble([fold(COHORT[h]).to_blob() for h in list(COHORT)[:2]]))
    got = serving_inputs([served[0], served[1][:100]])
    assert got["present"].tolist() == [True, False] and got[mi.NUMERIC_MASK][1].sum() == 0


def test_unknown_admission_is_all_missing():
    batch = FITTED.assemble([None, fold(COHORT[list(COHORT)[0]]).to_blob()], 1e6)
    assert batch["present"].tolist() == [False, True]
    assert batch[mi.NUMERIC_MASK][0].sum() == 0 and batch[mi.MODALITY_MASK][0].sum() == 0
    assert batch[mi.NUMERIC][0].sum() == 0 and batch["cxr_uri"][0] == ""


def test_vocabulary_pad_unk_and_top_k():
    vocab = Vocabulary.fit(["b b b a a c", "a b"], max_size=4)
    assert vocab.words == ("<pad>", "<unk>", "b", "a")
    assert vocab.encode("A b Zebra") == [3, 2, fd.UNK]
    assert tokenize("Na 140, K+ 4.1") == ["na", "140", "k", "4.1"]


def test_offline_examples_are_point_in_time_correct():
    hadm_id = list(COHORT)[2]
    events = COHORT[hadm_id]
    admit = hours(events[0].payload.admittime)
    cutoff = admit + 24
    dataset = offline.build(events, offline.CutoffPolicy((24.0,)), fitted=FITTED)
    # The example equals a fold of exactly the events up to the cutoff...
    visible = [e for e in events if hours(e.event_time) <= cutoff]
    want = FITTED.assemble([fold(visible).to_blob()], cutoff)
    for name in (mi.NUMERIC, mi.NUMERIC_MASK, mi.NOTES_RADIOLOGY, mi.MODALITY_MASK):
        np.testing.assert_array_equal(dataset.arrays[name][0], want[name][0])
    # ...and nothing after the cutoff, the outcome included, can change it.
    tampered = [e for e in events if hours(e.event_time) <= cutoff]
    tampered += [
        e.model_copy(update={"payload": e.payload.model_copy(update={"value": 1e4})})
        if e.type == "observation"
        else e
        for e in events
        if hours(e.event_time) > cutoff
    ]
    tampered = [
        e.model_copy(update={"payload": e.payload.model_copy(update={"los_days": 99.0})})
        if e.type == "discharge"
        else e
        for e in tampered
    ]
    again = offline.build(tampered, offline.CutoffPolicy((24.0,)), fitted=FITTED)
    np.testing.assert_array_equal(again.arrays[mi.NUMERIC], dataset.arrays[mi.NUMERIC])
    assert again.arrays["los_days"][0] == 99.0  # the label comes from the discharge event


def test_offline_build_fits_on_train_and_round_trips(tmp_path):
    events = [e for evs in COHORT.values() for e in evs]
    dataset = offline.build(events, offline.CutoffPolicy((6.0, 24.0)))
    a = dataset.arrays
    assert set(a["split"]) <= set(offline.SPLITS)
    assert all(len(set(a["split"][a["subject_id"] == s])) == 1 for s in set(a["subject_id"]))
    train = a["split"] == "train"
    observed = a[mi.NUMERIC_MASK][train] > 0
    z = np.where(observed, a[mi.NUMERIC][train], np.nan)
    with np.errstate(all="ignore"):
        fitted_cols = observed.sum(axis=0) > 1
        assert np.allclose(np.nanmean(z, axis=0)[fitted_cols], 0, atol=1e-4)
    assert (a["cutoff"] - a["hours_after_admit"] < a["cutoff"]).all()
    offline.write(dataset, tmp_path)
    loaded = offline.load(tmp_path)
    assert loaded.fitted.tag == dataset.fitted.tag
    np.testing.assert_array_equal(loaded.fitted.mean, dataset.fitted.mean)
    assert offline.cxr_of(loaded.arrays).shape == (len(dataset), 1, mi.CXR_SIZE, mi.CXR_SIZE)
    assert (
        loaded.arrays[mi.MODALITY_MASK][:, 2].sum() == 0
    )  # images not preprocessed: marked absent
    assert loaded.meta["vocab_size"] == len(dataset.fitted.vocab)


# --- hospital feeds (#21): transfers, cancels, re-sent admissions, corrected results -------

FEED = {h: sample.with_feed_events(evs, seed=5) for h, evs in list(COHORT.items())[:12]}


def _event(kind, hadm_id, when, position, **payload):
    cls, payload_cls = {
        "transfer": (ev.TransferEvent, ev.TransferPayload),
        "cancel": (ev.CancelEvent, ev.CancelPayload),
        "observation": (ev.ObservationEvent, ev.ObservationPayload),
        "admission": (ev.AdmissionEvent, ev.AdmissionPayload),
        "discharge": (ev.DischargeEvent, ev.DischargePayload),
    }[kind]
    return cls(
        event_id=ev.event_id("t", position),
        hadm_id=hadm_id,
        subject_id=1,
        event_time=when,
        source="t",
        payload=payload_cls(**payload),
    )


def test_feed_events_fold_to_the_same_state_in_any_order():
    for events in FEED.values():
        want = fold(events)
        for seed in range(3):
            shuffled = list(events)
            random.Random(seed).shuffle(shuffled)
            got = fold(shuffled)
            a, b = FITTED.assemble([want.to_blob()]), FITTED.assemble([got.to_blob()])
            for key in a:
                if a[key].dtype.kind == "f":
                    np.testing.assert_allclose(a[key], b[key], rtol=1e-9, err_msg=key)
                else:
                    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
            assert (got.status, got.ward) == (want.status, want.ward)


def test_a_corrected_result_replaces_the_value_it_corrects():
    events = [e for e in COHORT[next(iter(COHORT))] if e.type != "discharge"]
    obs = next(e for e in events if e.type == "observation" and e.payload.itemid in fd.ITEM_INDEX)
    later = obs.event_time + timedelta(hours=1)
    value = obs.payload.value + 7.0
    as_of = hours(max(e.event_time for e in events)) + 2
    replaced = [e for e in events if e is not obs]
    for result_id in ("R1", None):  # by result id, else by item and charttime
        original = obs.model_copy(
            update={"payload": obs.payload.model_copy(update={"result_id": result_id})}
        )
        correction = original.model_copy(
            update={
                "event_id": "correction",
                "event_time": later,
                "payload": original.payload.model_copy(
                    update={"value": value, "status": "corrected"}
                ),
            }
        )
        want = fold([*replaced, correction])
        for order in ([*replaced, original, correction], [correction, *replaced, original]):
            got = fold(order)
            assert_features_equal(features_of(got, as_of), features_of(want, as_of))
        # Before the correction's event time the original value is what was known.
        before = fold([e for e in [*replaced, original, correction] if e.event_time < later])
        with_original = fold([e for e in [*replaced, original] if e.event_time < later])
        assert_features_equal(features_of(before, as_of), features_of(with_original, as_of))


def test_cancels_undo_what_they_cancel_and_a_later_event_counts_again():
    t = sample.T0
    admit = _event("admission", 9, t, "a", admittime=t, admission_type="URGENT", gender="F", age=50)
    state = fold([admit])
    assert state.status == "open"
    gone = _event(
        "discharge",
        9,
        t + timedelta(hours=5),
        "d",
        dischtime=t + timedelta(hours=5),
        los_days=0.2,
        hospital_expire_flag=False,
    )
    a13 = _event("cancel", 9, t + timedelta(hours=6), "c13", cancels="discharge")
    assert fold([admit, gone]).status == "discharged"
    assert fold([a13, admit, gone]).status == "open"  # a cancelled discharge reopens it
    again = gone.model_copy(update={"event_id": "d2", "event_time": t + timedelta(hours=9)})
    assert fold([admit, gone, a13, again]).status == "discharged"
    a11 = _event("cancel", 9, t + timedelta(hours=1), "c11", cancels="admission")
    assert fold([admit, a11]).status == "cancelled"
    a08 = admit.model_copy(
        update={
            "event_id": "a08",
            "event_time": t + timedelta(hours=2),
            "payload": admit.payload.model_copy(update={"age": 51.0}),
        }
    )
    readmitted = fold([a08, a11, admit])
    assert readmitted.status == "open"
    assert readmitted.static_features()[0] == 51.0  # the admission sent last gives the age


def test_the_ward_is_the_latest_transfer_not_cancelled():
    t = sample.T0
    moves = [
        _event(
            "transfer",
            9,
            t + timedelta(hours=h),
            f"t{h}",
            careunit=unit,
            intime=t + timedelta(hours=h),
        )
        for h, unit in ((0, "ED"), (3, "MICU"), (8, "Medicine"))
    ]
    assert fold(moves).ward == "Medicine"
    assert fold(moves[::-1]).ward == "Medicine"
    a12 = _event("cancel", 9, t + timedelta(hours=9), "c12", cancels="transfer")
    assert fold([a12, *moves]).ward == "MICU"  # back where the cancelled transfer came from
    later = _event(
        "transfer",
        9,
        t + timedelta(hours=10),
        "t10",
        careunit="Surgery",
        intime=t + timedelta(hours=10),
    )
    assert fold([later, a12, *moves]).ward == "Surgery"  # a transfer after the cancel counts
    assert fold([]).ward == ""


def test_the_ward_takes_back_what_the_one_cancel_at_a_time_rule_does():
    from features.state import Transfers

    def by_rule(transfers: Transfers) -> str:  # the rule as written: each cancel in turn
        live = set(transfers.moves)
        for cancelled in sorted(transfers.cancels):
            sent = [move for move in live if transfers.moves[move] <= cancelled]
            if sent:
                live.remove(max(sent))
        return max(live)[1] if live else ""

    rng = random.Random(7)
    for _ in range(300):
        transfers = Transfers()
        for _ in range(rng.randint(0, 12)):
            intime = float(rng.randint(0, 20))
            transfers.add(intime, rng.choice("ABCD"), intime + rng.choice((0.0, 0.5, 3.0)))
        for _ in range(rng.randint(0, 8)):
            transfers.cancel(float(rng.randint(0, 24)) + 0.25)
        assert transfers.ward() == by_rule(transfers)


def test_empty_radiology_notes_leave_nothing_to_keep():
    from features.state import Notes

    notes = Notes(note_tokens=4)
    for i in range(1000):
        notes.add_radiology(float(i), f"n{i}", [])
    notes.add_radiology(1000.0, "last", [5, 6])
    assert notes.rad_notes == [(1000.0, "last", [5, 6])] and notes.radiology_tail() == [5, 6]


def test_offline_labels_use_the_discharge_no_cancel_took_back():
    admissions = offline.labelled(offline.group_admissions(FEED.values()))
    assert len(admissions) == len(FEED)
    for a in admissions:
        real = next(e for e in COHORT[a.hadm_id] if e.type == "discharge")
        assert a.discharge == hours(real.payload.dischtime)
