"""``m3t``: one command line over the library.

Each package owns its commands in ``<package>/cli.py``; this module mounts them and owns
``services`` and ``demo``. Library errors become one clean line and a non-zero exit.
"""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from benchmarks.cli import app as bench_app
from features.cli import app as features_app
from ingest.cli import app as ingest_app
from m3t import services as svc
from m3t.console import fail
from m3t.settings import Settings, get_settings
from stream.alerts_cli import app as alerts_app
from stream.cli import api_app, scores_app
from stream.cli import app as stream_app
from trainer.cli import app as train_app
from trainer.cli import export_app

console = Console()

app = typer.Typer(
    name="m3t",
    help="m3t-stream: real-time length-of-stay and mortality risk for inpatients (M3T-LM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

services_app = typer.Typer(
    help="Start, stop and check the local Redis, Kafka and Triton.", no_args_is_help=True
)
app.add_typer(services_app, name="services")


def _health_table(healths) -> Table:
    table = Table("service", "address", "healthy", "pid", "detail")
    for h in healths:
        table.add_row(
            h.name,
            h.address,
            "[green]yes[/]" if h.healthy else "[red]no[/]",
            str(h.pid or "-"),
            h.detail,
        )
    return table


CLUSTER_OPTION = typer.Option(
    False, "--cluster", help="3 Kafka brokers and a Redis Cluster (3x2); as M3T_CLUSTER=1."
)


def _services_settings(cluster: bool):
    return Settings(cluster=True) if cluster else get_settings()


@services_app.command("up")
def services_up(
    names: list[str] = typer.Argument(None, help="redis, kafka, triton (default: all)"),
    cluster: bool = CLUSTER_OPTION,
):
    """Start the services that are not running, and wait until each is healthy."""
    try:
        healths = svc.up(_services_settings(cluster), names or None)
    except svc.ServiceError as exc:
        fail(exc)
    console.print(_health_table(healths))


@services_app.command("down")
def services_down(
    names: list[str] = typer.Argument(None, help="redis, kafka, triton (default: all)"),
    cluster: bool = CLUSTER_OPTION,
):
    """Stop the services (the whole process group of each), leaving none behind."""
    stopped = svc.down(_services_settings(cluster), names or None)
    for name, was_running in stopped.items():
        console.print(f"{name}: {'stopped' if was_running else 'was not running'}")


@services_app.command("status")
def services_status(
    as_json: bool = typer.Option(
        False, "--json", help="Print JSON; exit 1 unless all are healthy."
    ),
    cluster: bool = CLUSTER_OPTION,
):
    """Show each service's address and health; exit non-zero unless all are healthy."""
    healths = svc.status(_services_settings(cluster))
    if as_json:
        print(json.dumps({h.name: h.as_dict() for h in healths}, indent=2))
    else:
        console.print(_health_table(healths))
    if not all(h.healthy for h in healths):
        raise typer.Exit(1)


# (command, sub-CLI, help), in the order `m3t --help` lists them.
GROUPS = [
    ("ingest", ingest_app, "Read MIMIC-IV, generate a synthetic cohort, replay it into Kafka."),
    ("features", features_app, "Online (Redis) and offline features, parity, CXR preprocessing."),
    ("train", train_app, "Train and evaluate M3T-LM."),
    ("export", export_app, "Export M3T-LM to ONNX/TensorRT and publish to model_repo/."),
    ("stream", stream_app, "Run the Kafka stream worker that keeps features and scores current."),
    ("scores", scores_app, "Query current risk scores."),
    ("alerts", alerts_app, "Alerts on risk scores: run, list, simulate a rule."),
    ("api", api_app, "The HTTP API's tokens: add, list, revoke."),
    ("bench", bench_app, "Benchmark throughput and latency, stage by stage and end to end."),
]
for _name, _sub, _help in GROUPS:
    app.add_typer(_sub, name=_name, help=_help)


security_app = typer.Typer(help="Check the installation's security posture.", no_args_is_help=True)
app.add_typer(security_app, name="security")


@security_app.command("check")
def security_check(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Check what is open: ACL users and their rules, listeners that answer without
    credentials, TLS, development credentials in use, the modes of the secrets. Exit 1
    where anything is open."""
    from app.security import check

    findings = check(get_settings())
    if as_json:
        print(json.dumps([f.as_dict() for f in findings], indent=2))
    else:
        table = Table("area", "check", "status", "detail")
        colour = {"ok": "green", "open": "red", "info": "dim"}
        for f in findings:
            table.add_row(f.area, f.check, f"[{colour[f.status]}]{f.status}[/]", f.detail)
        console.print(table)
    if any(f.status == "open" for f in findings):
        raise typer.Exit(1)


@app.command("demo")
def demo():
    """Run the whole system on a synthetic cohort and print how to query it."""
    from app.demo import run_demo

    try:
        run_demo(get_settings(), console)
    except (svc.ServiceError, RuntimeError) as exc:
        fail(exc)


if __name__ == "__main__":
    app()
