"""`m3t alerts ...`: run the alerting process, list active alerts, simulate a rule."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from m3t.clients import redis_client
from m3t.console import fail
from m3t.settings import AlertRule, get_settings

console = Console()

app = typer.Typer(
    help="Alerts on risk scores: run the alerting process, list alerts, simulate a rule.",
    no_args_is_help=True,
)


@app.command("run")
def run(
    idle_timeout: float = typer.Option(None, help="Stop after this many seconds without scores."),
):
    """Consume risk scores, raise and clear alerts under each ward's rule (settings.alerts),
    keep them in Redis and publish them to the alerts topic. SIGTERM finishes the poll in
    hand, commits and leaves the group."""
    from stream.alerts import AlertProcess

    process = AlertProcess(get_settings())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    process.run(idle_timeout_s=idle_timeout, stop=stop)
    console.print(dict(process.counts))


@app.command("list")
def list_alerts(
    silent: bool = typer.Option(False, "--silent", help="The silent rules' alerts instead."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Active alerts (as GET /alerts gives them), or the silent ones."""
    from stream.alerts import AlertStore

    alerts = AlertStore(redis_client(get_settings(), role="reader")).active(silent=silent)
    if as_json:
        print(json.dumps(alerts))
        return
    table = Table("hadm_id", "ward", "criteria", "mortality risk", "raised at (feature time)")
    for a in alerts:
        table.add_row(
            str(a["hadm_id"]),
            a["ward"],
            ",".join(a["criteria"]),
            f"{a['mortality_prob']:.3f}",
            f"{a['raised_at']:.0f}",
        )
    console.print(table)


@app.command("simulate")
def simulate(
    threshold: float = typer.Option(None, help="Alert at this mortality probability or above."),
    rise: float = typer.Option(None, help="Alert on a rise this large within --window hours."),
    window: float = typer.Option(24.0, help="The rise's window, in hours."),
    top_k: int = typer.Option(None, "--top-k", help="Alert on the ward's k highest."),
    hysteresis: float = typer.Option(0.05, help="Clear only this far below each line."),
    min_interval: float = typer.Option(6.0, help="Hours between two alerts of one admission."),
    dataset: Path = typer.Option(None, help="Outcome labels: a dataset m3t features build wrote."),
    cohort: Path = typer.Option(
        None, help="Outcome labels and stay lengths: a cohort's discharge events (MIMIC layout)."
    ),
    labelled_only: bool = typer.Option(
        False, "--labelled-only", help="Only the admissions the labels cover (a test split)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Replay the score histories in Redis under a rule (without --threshold, --rise or
    --top-k: each ward's rule in settings.alerts) and report alerts per 100 patient-days,
    with labels the sensitivity and PPV they would have had."""
    from stream.alerts_simulate import (
        dataset_outcomes,
        discharge_outcomes,
        redis_histories,
    )
    from stream.alerts_simulate import simulate as run_simulation

    settings = get_settings()
    if threshold is None and rise is None and top_k is None:
        rule_of = settings.alerts.rule
    else:
        given = AlertRule(
            threshold=threshold,
            rise=rise,
            window_h=window,
            top_k=top_k,
            hysteresis=hysteresis,
            min_interval_h=min_interval,
        )

        def rule_of(ward: str) -> AlertRule:
            return given

    outcomes = {}
    try:
        if dataset is not None:
            outcomes |= dataset_outcomes(dataset)
        if cohort is not None:
            from ingest.mimic import MimicReader

            stays = MimicReader(cohort).admissions()
            outcomes |= discharge_outcomes(e for events in stays for e in events)
        client = redis_client(settings, role="admin")  # it scans the score histories
        histories = redis_histories(client)
        if labelled_only:
            histories = {h: s for h, s in histories.items() if h in outcomes}
    except (OSError, KeyError, ValueError) as exc:
        fail(exc)
    report = run_simulation(histories, rule_of, outcomes).as_dict()
    if as_json:
        print(json.dumps(report))
        return
    table = Table("measure", "value")
    for name, value in report.items():
        table.add_row(name, "-" if value is None else f"{value:,.3f}".rstrip("0").rstrip("."))
    console.print(table)
