"""The model card published with every version of M3T-LM, and where the API finds it.

``m3t export publish`` writes ``model_card.json`` and ``model_card.md`` into the full
model's version folder (``model_repo/m3t_lm/<v>/``), beside ``m3t.json``: Triton loads a
version from the files its backend names and ignores the rest, so the card never changes
what is served, and a version's card is never overwritten, like the version itself.

The card is built from the run folder: the dataset's ``meta.json`` as the checkpoint keeps
it (cohort, feature set, cutoffs, split), ``train.json`` and the evaluation
(``RUN/evaluation.json`` from ``m3t train evaluate``, else ``RUN/metrics.json`` from
``m3t train run``; neither: stated as not evaluated). No patient-level data goes in.
"""

from __future__ import annotations

import json
from pathlib import Path

CARD_JSON, CARD_MD = "model_card.json", "model_card.md"

INTENDED_USE = (
    "Decision support for clinicians: a running estimate of the remaining length of stay and "
    "of the risk of in-hospital death of adult inpatients, rescored at every new event of "
    "the stay. It is not a diagnosis and must not be the sole basis of a clinical decision."
)
NOT_VALIDATED = (
    "Not validated on real patients: its figures come only from held-out patients of the "
    "cohort it was trained on. When that cohort is synthetic, they say nothing about real "
    "patients."
)
KNOWN_LIMITS = (
    "Evaluated retrospectively on one cohort; no prospective or external validation.",
    "Mortality is in-hospital death only; deaths after discharge count as survivals.",
    "Calibration holds for the cohort's case mix; recalibrate before use on another population.",
    "Inputs are the cohort's labs, vitals, notes and chest X-rays at the time the hospital "
    "knew them; a site that records them later or differently shifts the scores.",
    "Subgroup figures rest on few deaths per group: read their intervals, not the point values.",
)
HEADLINE = ("auroc", "auprc", "f1", "sensitivity", "specificity", "ppv", "npv")
CALIBRATION = ("slope", "intercept", "ece")
LOS = ("mae", "rmse", "r2")


def _evaluation(run_dir: Path) -> tuple[str, dict | None]:
    for name in ("evaluation.json", "metrics.json"):
        path = run_dir / name
        if path.exists():
            return name, json.loads(path.read_text())
    return "", None


def build_card(run_dir: Path, checkpoint: dict, model: str) -> dict:
    """The card as JSON-ready data (``checkpoint``: ``trainer.train.load_checkpoint``'s);
    ``publish`` adds the version."""
    run_dir = Path(run_dir)
    meta = checkpoint.get("meta") or {}
    train_path = run_dir / "train.json"
    trained = json.loads(train_path.read_text()) if train_path.exists() else {}
    source, evaluation = _evaluation(run_dir)
    return {
        "model": model,
        "version": None,
        "run": {
            "epoch": checkpoint.get("epoch"),
            "train_config": checkpoint.get("train_config"),
            "split_sizes": trained.get("split_sizes"),
            "train_seconds": trained.get("train_seconds"),
        },
        "data": {
            "source": meta.get("source") or meta.get("cohort") or "not recorded in meta.json",
            "feature_set_version": meta.get("feature_set_version"),
            "numeric_features": len(meta.get("numeric_features", [])),
            "vocab_size": meta.get("vocab_size"),
            "examples": meta.get("examples"),
            "admissions": meta.get("admissions"),
            "examples_per_split": meta.get("examples_per_split"),
            "cutoff_policy": meta.get("cutoff_policy"),
            "split_policy": meta.get("split_policy"),
            "point_in_time": meta.get("point_in_time"),
        },
        "cohort": (evaluation or {}).get("cohort"),
        "intended_use": INTENDED_USE,
        "validation_status": NOT_VALIDATED,
        "evaluation_source": source or None,
        "evaluation": _summary(evaluation) if evaluation else None,
        "known_limits": list(KNOWN_LIMITS),
    }


def _summary(evaluation: dict) -> dict:
    """M3T-LM's figures per slice, the alert threshold, seeds and the paired comparisons."""
    slices = {}
    for name, part in (evaluation.get("slices") or {}).items():
        ours = (part.get("models") or {}).get("M3T-LM")
        if ours:
            slices[name] = {
                "stays": part.get("stays"),
                "deaths": part.get("deaths"),
                **{k: ours.get(k) for k in ("mortality", "at_f1_threshold", "at_alert_threshold")},
                "calibration": ours.get("calibration"),
                "los_remaining": ours.get("los_remaining"),
            }
    alerts = evaluation.get("alerts")
    if alerts:
        counting = (evaluation.get("counting") or {}).get("patient_days")
        alerts = {**alerts, "counting": counting}
    return {
        "test": evaluation.get("test"),
        "alerts": alerts,
        "slices": slices,
        "seeds": evaluation.get("seeds"),
        "paired": evaluation.get("paired"),
        "subgroups": evaluation.get("subgroups"),
    }


def _figure(metric: dict | None, digits: int = 3) -> str:
    if not metric or metric.get("value") is None:
        return "n/a"
    text = f"{metric['value']:.{digits}f}"
    if metric.get("lo") is not None:
        text += f" [{metric['lo']:.{digits}f}, {metric['hi']:.{digits}f}]"
    return text


def render_markdown(card: dict) -> str:
    data = card["data"]
    lines = [
        f"# Model card: {card['model']} version {card['version']}",
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
        f"**{card['validation_status']}**",
        "",
        "## Data",
        "",
        f"- source: {data['source']}",
        f"- feature set: version {data['feature_set_version']}, "
        f"{data['numeric_features']} numeric features, notes (vocabulary {data['vocab_size']}), "
        "chest X-rays",
    ]
    for label, key in (
        ("examples", "examples"),
        ("admissions", "admissions"),
        ("examples per split", "examples_per_split"),
        ("cutoffs", "cutoff_policy"),
        ("split", "split_policy"),
        ("point in time", "point_in_time"),
    ):
        if data.get(key) is not None:
            lines.append(f"- {label}: {data[key]}")
    cohort = card.get("cohort")
    if cohort:
        lines += ["", "## Cohort (test patients)", ""]
        lines += [f"- {key}: {value}" for key, value in cohort.items()]
    lines += ["", "## Metrics", ""]
    summary = card.get("evaluation")
    if not summary:
        lines.append("Not evaluated: run `m3t train evaluate` before publishing.")
    else:
        lines += _metric_lines(summary, card["evaluation_source"])
    lines += ["", "## Known limits", ""] + [f"- {limit}" for limit in card["known_limits"]]
    return "\n".join(lines) + "\n"


def _metric_lines(summary: dict, source: str) -> list[str]:
    lines = [
        f"From `{source}`, on held-out test patients; brackets: 95% patient-level bootstrap "
        "intervals. F1 to NPV: at the F1-maximising threshold, chosen on validation patients.",
        "",
    ]
    alerts = summary.get("alerts") or {}
    if alerts:
        lines += [
            f"Alert threshold: {alerts.get('target_per_100_patient_days')} alerts per 100 "
            f"patient-days on validation patients ({alerts.get('counting')}).",
            "",
        ]
    head = ["when", "stays", "AUROC", "AUPRC", "F1", "sens.", "spec.", "PPV", "NPV"]
    head += ["cal. slope", "ECE", "remaining LoS MAE (d)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, part in summary["slices"].items():
        mortality = part.get("mortality") or {}
        at = part.get("at_f1_threshold") or {}
        calibration = part.get("calibration") or {}
        los = part.get("los_remaining") or {}
        cells = [name, str(part.get("stays"))]
        cells += [_figure(mortality.get(m)) for m in ("auroc", "auprc")]
        cells += [_figure(at.get(m)) for m in ("f1", "sensitivity", "specificity", "ppv", "npv")]
        cells += [_figure(calibration.get("slope"), 2), _figure(calibration.get("ece"))]
        cells.append(_figure(los.get("mae"), 2))
        lines.append("| " + " | ".join(cells) + " |")
    beats = [c for c in summary.get("paired") or [] if c["verdict"].startswith("M3T-LM better")]
    lines += ["", "Paired bootstrap (M3T-LM minus the other; only intervals that exclude 0):", ""]
    if not beats:
        lines.append("- M3T-LM beats no other model with an interval that excludes 0.")
    for c in beats:
        lines.append(
            f"- {c['slice']}, {c['metric']}: M3T-LM beats {c['other']} ({_figure(c['difference'])})"
        )
    return lines


def card_bytes(card: dict) -> dict[str, bytes]:
    """The two files of a card, for a version folder being staged."""
    return {CARD_JSON: json.dumps(card, indent=2).encode(), CARD_MD: render_markdown(card).encode()}


def find_card(repo: Path, model: str, version: str = "") -> Path | None:
    """The folder holding the card of ``model``'s ``version`` (empty: the newest version that
    has one), or None."""
    folder = Path(repo) / model
    if version:
        candidates = [folder / version]
    elif folder.is_dir():
        numbered = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
        candidates = sorted(numbered, key=lambda p: int(p.name), reverse=True)
    else:
        candidates = []
    return next((p for p in candidates if (p / CARD_JSON).is_file()), None)
