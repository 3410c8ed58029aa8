"""Training, evaluation and the ``m3t train`` commands, on small synthetic datasets."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.tiny_model import TINY
from trainer.data import load_dataset, split_by_patient
from trainer.evaluate import evaluate_run
from trainer.synthetic import make_dataset, write_dataset
from trainer.train import (
    MultiTaskLoss,
    TrainConfig,
    load_checkpoint,
    sample_examples,
    task_losses,
    train,
)

SMALL = dict(
    numeric_embed_dim=16,
    numeric_heads=2,
    notes_embed_dim=16,
    notes_hidden_dim=16,
    cxr_channels=(8, 16),
    emb_dim=16,
    fusion_hidden_dim=32,
)


@pytest.fixture(scope="module")
def dataset():
    return make_dataset(n=1200, seed=3)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = train(
        dataset, out, TrainConfig(max_epochs=6, patience=6, seed=1, lr=3e-3), SMALL, progress=False
    )
    return out, result


def test_split_keeps_each_patient_in_one_split():
    subjects = np.repeat(np.arange(50), 3)
    splits = split_by_patient(subjects, seed=4)
    sets = [set(subjects[idx]) for idx in splits.values()]
    assert (
        sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2]) and sets[1].isdisjoint(sets[2])
    )
    assert sorted(np.concatenate(list(splits.values()))) == list(range(150))
    assert all(len(idx) for idx in splits.values())


def test_the_split_holds_70_10_20_percent_of_the_patients():
    subjects = np.arange(20_000)
    shares = {name: len(idx) / len(subjects) for name, idx in split_by_patient(subjects).items()}
    assert shares == pytest.approx({"train": 0.7, "val": 0.1, "test": 0.2}, abs=0.01)


def test_training_lowers_the_loss_and_writes_its_artefacts(trained):
    out, result = trained
    first, best = result.history[0], result.history[result.best_epoch - 1]
    assert best["val_score"] < first["val_score"]
    assert result.history[-1]["train"]["los"] < first["train"]["los"]
    assert result.history[-1]["train"]["mortality"] < first["train"]["mortality"]
    for name in ("best.pt", "last.pt", "history.json", "split.json", "train.json"):
        assert (out / name).exists()


def test_the_split_is_the_datasets_column_and_recorded_as_it_is(dataset, trained):
    out, _ = trained
    a = dataset.arrays
    patients = json.loads((out / "split.json").read_text())
    for name in ("train", "val", "test"):
        assert patients[name] == sorted(set(a["subject_id"][a["split"] == name].tolist()))
    record = json.loads((out / "train.json").read_text())["split"]
    assert record["source"] == "the dataset's split column"
    assert record["policy"] == {"val": 0.1, "test": 0.2, "seed": 0}
    assert record["train"]["examples"] == int((a["split"] == "train").sum())
    assert "split" not in json.loads((out / "train.json").read_text())["train_config"]


def test_trained_model_beats_mean_and_prevalence_on_held_out_patients(dataset, trained):
    out, _ = trained
    table = evaluate_run(
        dataset, out, ablations=False, seeds=1, n_boot=50, progress=False, stem="metrics"
    )
    rows = table["slices"]["every event"]["models"]
    model, baseline = rows["M3T-LM"], rows["mean / prevalence"]
    mae = lambda row: row["los_remaining"]["mae"]["value"]  # noqa: E731
    assert mae(model) < mae(baseline)
    assert model["mortality"]["brier"]["value"] < baseline["mortality"]["brier"]["value"]
    assert model["mortality"]["auroc"]["value"] > 0.7
    lo, hi = model["mortality"]["auroc"]["lo"], model["mortality"]["auroc"]["hi"]
    assert lo <= model["mortality"]["auroc"]["value"] <= hi
    for plot in ("loss_curves.png", "reliability.png", "los_pred_vs_true.png"):
        assert (out / "plots" / plot).stat().st_size > 1000
    assert "| M3T-LM |" in (out / "metrics.md").read_text()


def test_same_seed_gives_identical_weights_and_history(tmp_path):
    data = make_dataset(n=120, seed=5)
    config = TrainConfig(max_epochs=2, seed=7)
    a = train(data, tmp_path / "a", config, TINY, progress=False)
    b = train(data, tmp_path / "b", config, TINY, progress=False)
    wa, wb = (
        load_checkpoint(p / "last.pt")[0].state_dict() for p in (tmp_path / "a", tmp_path / "b")
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    train(data, tmp_path / "c", TrainConfig(max_epochs=2, seed=8), TINY, progress=False)
    wc = load_checkpoint(tmp_path / "c" / "last.pt")[0].state_dict()
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_uncertainty_weighting_learns_one_log_variance_per_task():
    loss = MultiTaskLoss(("los", "mortality"), "uncertainty")
    total = loss({"los": torch.tensor(2.0), "mortality": torch.tensor(0.5)})
    assert total.item() == pytest.approx(2.5)  # exp(0) * L + 0 at the start
    total.backward()
    assert loss.log_vars.grad.tolist() == pytest.approx([1 - 2.0, 1 - 0.5])
    fixed = MultiTaskLoss(("los", "mortality"), "fixed", {"los": 0.5, "mortality": 2.0})
    assert fixed(
        {"los": torch.tensor(2.0), "mortality": torch.tensor(0.5)}
    ).item() == pytest.approx(2.0)


def test_invalid_training_configs_raise():
    for bad in (
        dict(weighting="magic"),
        dict(tasks=()),
        dict(tasks=("icu",)),
        dict(modalities=("ecg",)),
    ):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_cli_trains_and_evaluates(tmp_path):
    from trainer.cli import app

    write_dataset(make_dataset(n=120, seed=7), tmp_path / "data")
    runner = CliRunner()
    trained = runner.invoke(
        app,
        [
            "run",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "run"),
            "--epochs",
            "1",
            "--bootstrap",
            "5",
            "--json",
        ],
    )
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.stdout[trained.stdout.index("{") :])
    assert summary["epochs_run"] == 1 and set(summary["split_sizes"]) == {"train", "val", "test"}
    evaluated = runner.invoke(
        app,
        [
            "evaluate",
            "--data",
            str(tmp_path / "data"),
            "--run",
            str(tmp_path / "run"),
            "--no-ablations",
            "--seeds",
            "1",
            "--bootstrap",
            "5",
            "--json",
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads(evaluated.stdout[evaluated.stdout.index("{") :])
    assert list(result["slices"]["every event"]["models"])[-1] == "M3T-LM"
    missing = runner.invoke(
        app, ["run", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]
    )
    assert missing.exit_code == 1 and "dataset.npz" in missing.output


def test_dataset_round_trips_through_npz(tmp_path):
    data = make_dataset(n=30, seed=8)
    loaded = load_dataset(write_dataset(data, tmp_path))
    assert loaded.meta == data.meta
    assert all(np.array_equal(loaded.arrays[k], v) for k, v in data.arrays.items())


def test_the_datasets_own_patient_split_is_used_and_checked():
    from trainer.data import Dataset, DatasetError, dataset_splits

    data = make_dataset(n=40, seed=9)
    patients = np.unique(data.arrays["subject_id"])
    names = np.array(["train", "val", "test"])[
        np.searchsorted(patients, data.arrays["subject_id"]) % 3
    ]
    splits = dataset_splits(Dataset({**data.arrays, "split": names}, data.meta))
    assert all((names[idx] == name).all() and len(idx) for name, idx in splits.items())
    # the first row's patient gets a second row in another split: a leak
    arrays = {k: np.concatenate([v, v[:1]]) for k, v in data.arrays.items()}
    other = "val" if names[0] == "train" else "train"
    with pytest.raises(DatasetError, match="both"):
        dataset_splits(Dataset({**arrays, "split": np.append(names, other)}, data.meta))


def test_losses_are_weighted_means():
    from trainer.model import los_loss, mortality_loss

    log_los = torch.log1p(torch.tensor([[1.0], [3.0]]))
    days = torch.tensor([2.0, 3.0])
    assert los_loss(log_los, days, torch.tensor([0.0, 1.0])).item() == pytest.approx(0.0)
    first = los_loss(log_los[:1], days[:1]).item()
    assert los_loss(log_los, days, torch.tensor([1.0, 0.0])).item() == pytest.approx(first)
    assert los_loss(log_los, days).item() == pytest.approx(first / 2)
    logit, died = torch.tensor([[2.0], [-1.0]]), torch.tensor([1.0, 1.0])
    alone = mortality_loss(logit[1:], died[1:]).item()
    assert mortality_loss(logit, died, torch.tensor([0.0, 3.0])).item() == pytest.approx(alone)


def test_weights_change_what_is_learned(tmp_path):
    from trainer.data import Dataset, batch_at, to_tensors

    data = make_dataset(n=120, seed=5)
    config = TrainConfig(max_epochs=2, seed=7, examples_per_stay=None)
    tilted = data.arrays["weight"] * np.where(data.arrays["mortality"] > 0, 5.0, 0.2)
    other = Dataset({**data.arrays, "weight": tilted.astype(np.float32)}, data.meta)
    a = train(data, tmp_path / "a", config, TINY, progress=False)
    b = train(other, tmp_path / "b", config, TINY, progress=False)
    assert a.history[0]["val"] != b.history[0]["val"]
    model = load_checkpoint(tmp_path / "a" / "best.pt")[0]
    batch = batch_at(to_tensors(other), torch.arange(len(other)))
    weighted = task_losses(model, batch, ("mortality",))["mortality"]
    batch["weight"] = torch.ones(len(other))
    assert task_losses(model, batch, ("mortality",))["mortality"] != weighted


def test_each_epoch_draws_examples_per_stay_with_the_seed():
    data = make_dataset(n=200, seed=2, max_rows=9)
    stay, weight = data.arrays["hadm_id"], data.arrays["weight"].astype(np.float64)
    rows, w = sample_examples(stay, weight, 4, np.random.default_rng(5))
    again, w_again = sample_examples(stay, weight, 4, np.random.default_rng(5))
    assert np.array_equal(rows, again) and np.array_equal(w, w_again)
    other, _ = sample_examples(stay, weight, 4, np.random.default_rng(6))
    assert not np.array_equal(rows, other)
    assert len(np.unique(rows)) == len(rows)
    stays, counts = np.unique(stay, return_counts=True)
    drawn = dict(zip(*np.unique(stay[rows], return_counts=True)))
    assert all(drawn[s] == min(4, c) for s, c in zip(stays, counts))  # every stay, <= 4 rows
    per_stay = {s: w[stay[rows] == s].sum() for s in stays}
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in per_stay.values())  # a stay weighs 1
    every, w_every = sample_examples(stay, weight, None, np.random.default_rng(5))
    assert np.array_equal(every, np.arange(len(stay))) and np.allclose(w_every, weight)
    # rows of one stay are drawn in proportion to their weight
    heavy = np.array([0.7, 0.1, 0.1, 0.1])
    hits = np.zeros(4)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        hits[sample_examples(np.zeros(4, int), heavy, 1, rng)[0]] += 1
    assert hits[0] / hits.sum() == pytest.approx(0.7, abs=0.04)


def test_training_with_examples_per_stay_is_deterministic_and_draws_fewer_rows(tmp_path):
    data = make_dataset(n=150, seed=4, max_rows=8)
    config = TrainConfig(max_epochs=2, seed=3, examples_per_stay=2)
    a = train(data, tmp_path / "a", config, TINY, progress=False)
    b = train(data, tmp_path / "b", config, TINY, progress=False)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    train_stays = len(np.unique(data.arrays["hadm_id"][data.arrays["split"] == "train"]))
    assert a.history[0]["examples"] <= 2 * train_stays < a.split_sizes["train"]
