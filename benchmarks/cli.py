"""``m3t bench``: one command per stage, and ``all``.

Every command writes ``<stage>-<UTC time>.json``, ``<stage>-latest.json``, a markdown table
and PNG plots under ``--out`` (default ``benchmarks/results/``) and prints the table.
"""

from __future__ import annotations

import json
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

from benchmarks import harness as h
from benchmarks.stages import STAGES, run_all

console = Console()
err = Console(stderr=True)

app = typer.Typer(
    help="Benchmark throughput and latency, stage by stage and end to end.", no_args_is_help=True
)

QUICK = typer.Option(False, "--quick", help="Small sizes: every stage in a few minutes on 2 cores.")
OUT = typer.Option(h.RESULTS_DIR, "--out", help="Folder for the JSON, markdown and PNG results.")
AS_JSON = typer.Option(
    False, "--json", help="Print the result as JSON on stdout instead of tables."
)


def _settings():
    from m3t.settings import get_settings

    return get_settings()


def _show(result: h.Result, paths: dict | None, as_json: bool) -> None:
    if as_json:
        print(h.dumps(result.to_dict()))
        return
    for table in h.rich_tables(result):
        console.print(table)
    for c in result.comparisons:
        ratio = f"{c['ratio']:.2f}x" if c["ratio"] is not None else "-"
        console.print(f"{c['what']}: {c['numerator']} / {c['denominator']} = [bold]{ratio}[/]")
    for name, why in result.missing.items():
        console.print(f"[yellow]not measured[/] {name}: {why}")
    if paths:
        console.print(f"[dim]wrote {paths['json']} and {len(paths) - 1} more[/]")


def _overrides(pairs: list[str] | None) -> dict:
    """``NAME=JSON`` pairs as keyword arguments of a stage's ``run``."""
    out = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        try:
            if not sep or not name.isidentifier():
                raise ValueError("expected NAME=JSON")
            out[name] = json.loads(value)
        except ValueError as exc:
            raise typer.BadParameter(f"--set {pair!r}: {exc}") from None
    return out


@contextmanager
def _unwinding_on_sigterm():
    """SIGTERM (``timeout``, ``kill``) unwinds like Ctrl-C while a command runs: a stage's
    ``finally`` blocks stop its workers and remove what it wrote to Redis."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


SET = typer.Option(
    None,
    "--set",
    help="NAME=JSON: one argument of the stage's run() over its sizes (repeatable), e.g. "
    "--set 'workers=[1, 2]'.",
)


def _stage_command(name: str):
    stage = STAGES[name]

    def command(
        quick: bool = QUICK, out: Path = OUT, as_json: bool = AS_JSON, given: list[str] = SET
    ):
        overrides = _overrides(given)
        try:
            with _unwinding_on_sigterm():
                result = stage.run(_settings(), quick=quick, **overrides)
            if overrides:
                result.params["set"] = overrides
        except Exception as exc:  # services down, data missing: one clean line
            err.print(f"[red]error:[/] bench {name} failed: {type(exc).__name__}: {exc}")
            raise typer.Exit(1) from None
        _show(result, h.save(result, out), as_json)

    command.__doc__ = stage.help
    app.command(name)(command)


for _name in STAGES:
    _stage_command(_name)


@app.command("all")
def all_stages(
    quick: bool = QUICK,
    out: Path = OUT,
    as_json: bool = AS_JSON,
    stages: list[str] = typer.Option(None, "--stage", help="Only these stages (repeatable)."),
):
    """Run every stage, then summarise one event's path by stage (summary-latest.md)."""
    unknown = set(stages or []) - set(STAGES)
    if unknown:
        err.print(f"[red]error:[/] unknown stage(s) {sorted(unknown)}; choose from {list(STAGES)}")
        raise typer.Exit(2)

    def progress(result: h.Result) -> None:
        if not as_json:
            _show(result, None, False)

    with _unwinding_on_sigterm():
        results, pipeline = run_all(
            _settings(), quick=quick, out_dir=out, stages=stages or None, on_result=progress
        )
    if as_json:
        print(h.dumps([r.to_dict() for r in [*results, pipeline]]))
    else:
        console.print(
            "one event's path (ms): "
            + ", ".join(f"{k} {v:.2f}" for k, v in pipeline.breakdown_ms.items())
        )
        console.print(f"[dim]wrote {Path(out) / 'summary-latest.md'}[/]")
    for name, why in pipeline.missing.items():
        err.print(f"[red]stage {name} failed:[/] {why}")
    if pipeline.missing:
        raise typer.Exit(1)


@app.command("show")
def show(
    path: Path = typer.Argument(
        ..., help="A result JSON file, e.g. benchmarks/results/redis-latest.json"
    ),
):
    """Print a saved result's tables (and redraw its plots next to it)."""
    try:
        result = h.load(path)
    except (OSError, ValueError, TypeError) as exc:
        err.print(f"[red]error:[/] cannot read {path}: {exc}")
        raise typer.Exit(1) from None
    _show(result, None, False)
    from benchmarks.plots import plot

    for kind, drawn in plot(result, path.parent).items():
        console.print(f"[dim]{kind} plot: {drawn}[/]")
