"""The evaluation as markdown tables (``RUN/evaluation.md``), from ``evaluate_run``'s JSON."""

from __future__ import annotations


def cell(metric: dict | None, digits: int = 3) -> str:
    if metric is None:
        return "-"
    if metric["value"] is None:
        return "n/a"
    if metric["lo"] is None:
        return f"{metric['value']:.{digits}f}"
    return f"{metric['value']:.{digits}f} [{metric['lo']:.{digits}f}, {metric['hi']:.{digits}f}]"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def place_tables(place: str, part: dict) -> list[str]:
    if not part["rows"]:
        return [f"### {place}", "", "No test rows here.", ""]
    lines = [
        f"### {place}",
        "",
        f"{part['stays']} stays ({part['rows']} rows) of {part['patients']} patients, "
        f"{part['deaths']} deaths.",
        "",
    ]
    mortality, los = [], []
    for name, m in part["models"].items():
        if "mortality" in m:
            f1, alert = m["at_f1_threshold"], m["at_alert_threshold"]
            mortality.append(
                [name]
                + [cell(m["mortality"][k]) for k in ("auroc", "auprc", "brier")]
                + [cell(m["calibration"]["slope"], 2), cell(m["calibration"]["intercept"], 2)]
                + [cell(m["calibration"]["ece"])]
                + [f"{f1['threshold']:.3f}"]
                + [cell(f1[k]) for k in ("f1", "sensitivity", "specificity", "ppv", "npv")]
                + [f"{alert['threshold']:.3f}"]
                + [cell(alert[k]) for k in ("sensitivity", "specificity", "ppv", "npv")]
            )
        if "los_remaining" in m:
            los.append([name] + [cell(m["los_remaining"][k], 2) for k in ("mae", "rmse", "r2")])
    head = ["model", "AUROC", "AUPRC", "Brier", "cal. slope", "cal. intercept", "ECE"]
    head += ["F1 cut", "F1", "sens.", "spec.", "PPV", "NPV"]
    head += ["alert cut", "sens.", "spec.", "PPV", "NPV"]
    lines += ["Mortality:", ""] + _table(head, mortality) + [""]
    head = ["model", "MAE (d)", "RMSE (d)", "R²"]
    return lines + ["Remaining length of stay:", ""] + _table(head, los) + [""]


def markdown_report(table: dict) -> str:
    test = table["test"]
    boot = table["bootstrap"]
    lines = [
        "# Evaluation on held-out test patients",
        "",
        f"{test['rows']} rows from {test['admissions']} admissions of {test['patients']} "
        f"patients; in-hospital mortality {test['mortality_per_stay']:.1%} of stays. "
        f"Brackets: 95% intervals, patient-level bootstrap ({boot['resamples']} resamples).",
        "",
        "How things are counted:",
        "",
    ]
    lines += [f"- {key}: {text}" for key, text in table["counting"].items()]
    lines += ["", "## Per horizon and at every event", ""]
    for place, part in table["slices"].items():
        lines += place_tables(place, part)

    alerts = table["alerts"]
    lines += [
        "## Alert threshold",
        "",
        f"Set on validation patients to {alerts['target_per_100_patient_days']:g} alerts "
        "per 100 patient-days.",
        "",
    ]
    lines += _table(
        ["model", "threshold", "validation /100 pd", "test /100 pd"],
        [
            [
                name,
                f"{a['threshold']:.3f}",
                f"{a['validation_per_100_patient_days']:.2f}",
                f"{a['test_per_100_patient_days']:.2f}",
            ]
            for name, a in alerts["models"].items()
        ],
    )

    seeds = table.get("seeds")
    if seeds:
        lines += [
            "",
            f"## M3T-LM over seeds {', '.join(map(str, seeds['seeds']))}: mean (SD)",
            "",
        ]
        names = ("auroc", "auprc", "f1", "slope", "ece", "mae", "r2")
        rows = []
        for place, figures in seeds["slices"].items():
            row = [place]
            for k in names:
                f = figures[k]
                mean = "n/a" if f["mean"] is None else f"{f['mean']:.3f}"
                row.append(mean if f["sd"] is None else f"{mean} ({f['sd']:.3f})")
            rows.append(row)
        lines += _table(["where", "AUROC", "AUPRC", "F1", "cal. slope", "ECE", "MAE", "R²"], rows)

    lines += [
        "",
        "## Paired bootstrap: M3T-LM minus each other model",
        "",
        "Same resampled patients for both models. AUROC: above 0 favours M3T-LM; MAE: below 0 "
        "does. 'Better' only where the 95% interval excludes 0.",
        "",
    ]
    lines += _table(
        ["where", "metric", "other model", "difference", "verdict"],
        [
            [c["slice"], c["metric"], c["other"], cell(c["difference"]), c["verdict"]]
            for c in table["paired"]
        ],
    )

    for place, groups in table["subgroups"].items():
        lines += ["", f"## Subgroups at {place} (M3T-LM)", ""]
        lines += _table(
            ["group", "value", "stays", "deaths", "observed", "mean predicted", "AUROC", "MAE"],
            [
                [
                    g["group"],
                    g["value"],
                    str(g["stays"]),
                    str(g["deaths"]),
                    f"{g['observed_mortality']:.3f}",
                    f"{g['mean_predicted']:.3f}",
                    cell(g["auroc"]),
                    cell(g["mae"], 2),
                ]
                for g in groups
            ],
        )
    return "\n".join(lines) + "\n"


HEADLINE = (
    ("AUROC", "mortality", "auroc"),
    ("AUPRC", "mortality", "auprc"),
    ("F1", "at_f1_threshold", "f1"),
    ("cal. slope", "calibration", "slope"),
    ("ECE", "calibration", "ece"),
    ("MAE (d)", "los_remaining", "mae"),
    ("R²", "los_remaining", "r2"),
)


def headline(table: dict, model: str = "M3T-LM") -> dict[str, dict]:
    """{place: {metric: figure}} of one model: what the console shows."""
    out = {}
    for place, part in table["slices"].items():
        figures = part["models"].get(model)
        if figures:
            out[place] = {
                key: figures[section][key] for _, section, key in HEADLINE if section in figures
            }
    return out
