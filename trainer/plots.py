"""Training and evaluation plots, written as PNGs into the run folder (headless, Agg)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_curves(history: list[dict], path: Path) -> Path:
    tasks = list(history[0]["train"])
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4 * (len(tasks) + 1), 3.2))
    epochs = [h["epoch"] for h in history]
    for ax, task in zip(axes, tasks):
        ax.plot(epochs, [h["train"][task] for h in history], marker="o", label="train")
        ax.plot(epochs, [h["val"][task] for h in history], marker="o", label="validation")
        ax.set(title=f"{task} loss", xlabel="epoch")
        ax.legend()
    axes[-1].plot(epochs, [h["val_score"] for h in history], marker="o", color="C2")
    axes[-1].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[-1].set(title="validation score (1 = baseline)", xlabel="epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reliability(bins_by_place: dict[str, dict], path: Path) -> Path:
    """Observed against predicted mortality per equal-mass bin, with 95% Wilson intervals,
    one panel per place (``trainer.metrics.reliability``'s bins)."""
    places = list(bins_by_place)
    fig, axes = plt.subplots(1, len(places), figsize=(4 * len(places), 4), squeeze=False)
    for ax, place in zip(axes[0], places):
        bins = bins_by_place[place]
        observed, predicted = np.array(bins["observed"]), np.array(bins["predicted"])
        errors = [observed - np.array(bins["lo"]), np.array(bins["hi"]) - observed]
        top = float(max(np.max(bins["hi"]), predicted.max(), 0.05)) * 1.05
        ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--", label="perfect")
        ax.errorbar(predicted, observed, yerr=errors, marker="o", capsize=3, label="M3T-LM")
        ax.set(xlabel="predicted mortality", ylabel="observed mortality", title=place)
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.legend()
    fig.suptitle("reliability (test patients, 95% intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def los_scatter(true: np.ndarray, pred: np.ndarray, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(true, pred, s=6, alpha=0.4)
    top = float(max(true.max(), pred.max())) * 1.05
    ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--")
    ax.set(
        xlabel="true remaining days",
        ylabel="predicted remaining days",
        title="remaining stay (test)",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(run_dir: Path, los_true, los_pred, reliability_bins: dict) -> list[Path]:
    folder = Path(run_dir) / "plots"
    folder.mkdir(exist_ok=True)
    written = []
    history_path = Path(run_dir) / "history.json"
    if history_path.exists():
        written.append(
            loss_curves(json.loads(history_path.read_text()), folder / "loss_curves.png")
        )
    if reliability_bins:
        written.append(reliability(reliability_bins, folder / "reliability.png"))
    if los_pred is not None:
        written.append(los_scatter(los_true, los_pred, folder / "los_pred_vs_true.png"))
    return written
