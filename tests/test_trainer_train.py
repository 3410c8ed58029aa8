"""Training, evaluation and the ``m3t train`` commands, on small synthetic datasets."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from trainer.data import load_dataset, split_by_patient
from trainer.evaluate import evaluate_run
from trainer.synthetic import make_dataset, write_dataset
from trainer.train import MultiTaskLoss, TrainConfig, load_checkpoint, train

SMALL = dict(
    numeric_embed_dim=16,
    numeric_heads=2,
    notes_embed_dim=16,
    notes_hidden_dim=16,
    cxr_channels=(8, 16),
    emb_dim=16,
    fusion_hidden_dim=32,
)
TINY = dict(
    numeric_embed_dim=8,
    numeric_heads=2,
    notes_embed_dim=8,
    notes_hidden_dim=8,
    cxr_channels=(4, 8),
    emb_dim=8,
    fusion_hidden_dim=16,
)


@pytest.fixture(scope="module")
def dataset():
    return make_dataset(n=1500, seed=3)  # enough "every event" test rows to beat the mean


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


def test_training_lowers_the_loss_and_writes_its_artefacts(trained):
    out, result = trained
    first, best = result.history[0], result.history[result.best_epoch - 1]
    assert best["val_score"] < first["val_score"]
    assert result.history[-1]["train"]["los"] < first["train"]["los"]
    assert result.history[-1]["train"]["mortality"] < first["train"]["mortality"]
    for name in ("best.pt", "last.pt", "history.json", "split.json", "train.json"):
        assert (out / name).exists()


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
