"""``m3t features``: build the offline dataset, check online/offline parity, read the store."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from m3t.console import fail as _fail

app = typer.Typer(
    help="Online (Redis) and offline features, parity, CXR preprocessing.", no_args_is_help=True
)
console = Console(stderr=True)  # stdout stays clean for --json
out = Console()

COHORT_HELP = (
    "A cohort folder in the MIMIC-IV layout (the MIMIC-IV demo, or `m3t ingest synth` output)."
)
CUTOFFS_HELP = "Cutoffs, hours after admission, comma separated."


def _cutoffs(text: str):
    from features.offline import CutoffPolicy

    try:
        return CutoffPolicy(tuple(float(h) for h in text.split(",") if h.strip()))
    except ValueError as exc:
        _fail(f"--cutoffs: {exc}")


def _admissions(root: Path, cxr: str = "auto"):
    from ingest.mimic import MimicLayoutError, MimicReader

    try:
        reader = MimicReader(root, cxr=cxr)
    except MimicLayoutError as exc:
        _fail(str(exc))
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("reading events", total=None)
        admissions = []
        for events in reader.admissions():
            admissions.append(events)
            progress.update(task, advance=len(events), total=reader.expected_events)
    return admissions


def _redis():
    import redis

    from m3t.clients import redis_client
    from m3t.settings import get_settings

    client = redis_client(get_settings(), role="admin")  # publishing and pruning
    try:
        client.ping()
    except redis.RedisError as exc:
        _fail(
            f"Redis is not reachable ({type(exc).__name__}); start it with `m3t services up redis`"
        )
    return client


@app.command("build")
def build(
    cohort: Path = typer.Argument(..., exists=True, file_okay=False, help=COHORT_HELP),
    out_dir: Path = typer.Option(
        ..., "--out", file_okay=False, help="Where dataset.npz and meta.json go."
    ),
    cutoffs: str = typer.Option(
        None,
        help="Only these cutoffs, hours after admission, comma separated (e.g. 24: one example "
        "per stay at 24 h). Default: the stream policy, the horizons 6,12,24,48,72 h, a grid "
        "and sampled event times.",
    ),
    grid_every: float = typer.Option(
        6.0, help="Stream policy: a cutoff every so many hours to discharge (0: no grid)."
    ),
    grid_from: float = typer.Option(2.0, help="Stream policy: the grid's first hour."),
    events_train: int = typer.Option(
        2, help="Stream policy: event times drawn per training stay as cutoffs."
    ),
    events_eval: int = typer.Option(
        8, help="Stream policy: event times drawn per validation or test stay."
    ),
    cutoff_seed: int = typer.Option(0, help="Seed of the event times drawn."),
    split_seed: int = typer.Option(
        0, help="Seed of the 70/10/20 patient split (a hash of subject_id) the trainer uses."
    ),
    cxr: bool = typer.Option(True, help="Preprocess the chest X-rays (DALI) into the `cxr` array."),
    device: str = typer.Option("auto", help="DALI device for the X-rays: auto, cpu or gpu."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
):
    """Build point-in-time training examples from a cohort folder."""
    from features import offline

    if cutoffs is not None:
        policy = _cutoffs(cutoffs)
    else:
        try:
            policy = offline.CutoffPolicy.stream(
                grid_every or None, grid_from, events_train, events_eval, cutoff_seed
            )
        except ValueError as exc:
            _fail(str(exc))
    admissions = _admissions(cohort, "auto" if cxr else "none")
    try:
        dataset = offline.build(admissions, policy, offline.SplitPolicy(seed=split_seed))
    except ValueError as exc:
        _fail(str(exc))
    # The cohort named here is read from, with the configured image roots; its X-ray URIs
    # may point nowhere else.
    images = offline.preprocess_cxr(dataset, cohort, (cohort,), device) if cxr else None
    cxr_errors = dataset.meta.get("cxr_errors", {})
    path = offline.write(dataset, out_dir, images)
    summary = {
        "dataset": str(path),
        **{
            k: dataset.meta[k]
            for k in (
                "examples",
                "admissions",
                "examples_per_split",
                "examples_per_kind",
                "skipped_admissions",
            )
        },
        "feature_set": dataset.fitted.tag,
        "cxr_errors": cxr_errors,
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        out.print(f"{key}: {value}")


@app.command("check-parity")
def check_parity(
    cohort: Path = typer.Argument(..., exists=True, file_okay=False, help=COHORT_HELP),
    sample: int = typer.Option(50, min=1, help="How many admissions to compare."),
    cutoffs: str = typer.Option("6,24,48", help=CUTOFFS_HELP),
    seed: int = typer.Option(0, help="Seed for the sample and the delivery order."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
):
    """Stream a sample of admissions into Redis and compare with the offline builder.

    Exits 0 only if every compared feature matches (float rounding aside).
    """
    from features.parity import check_parity as run

    report = run(_admissions(cohort, "none"), _redis(), _cutoffs(cutoffs), sample=sample, seed=seed)
    if as_json:
        print(json.dumps({"ok": report.ok, **report.__dict__}, indent=2))
    else:
        table = Table("feature", "rows differing", "max abs diff")
        for name, rows in report.mismatched_rows.items():
            table.add_row(name, str(rows), f"{report.max_abs_diff.get(name, 0.0):.3g}")
        out.print(table)
        verdict = "[green]parity[/]" if report.ok else "[red]MISMATCH[/]"
        out.print(
            f"{verdict}: {report.admissions} admissions, "
            f"{report.cutoffs} (admission, cutoff) pairs compared"
        )
    raise typer.Exit(0 if report.ok else 1)


@app.command("publish")
def publish(
    meta: Path = typer.Argument(..., exists=True, dir_okay=False, help="A dataset's meta.json."),
):
    """Make a fitted feature set (vocabulary, normalisation) the one the stream writes under."""
    from features.fitted import FittedFeatures
    from features.online import OnlineStore

    try:
        fitted = FittedFeatures.load(meta)
    except (ValueError, KeyError) as exc:
        _fail(f"{meta}: {exc}")
    OnlineStore(_redis(), fitted).publish()
    out.print(f"published feature set {fitted.tag}")


@app.command("prune")
def prune(
    apply: bool = typer.Option(
        False, "--apply", help="Delete the keys; without it, only list them."
    ),
):
    """List (or delete) the online-store keys of feature sets and key layouts the stream no
    longer uses, such as those left after a new feature set was published."""
    from features.online import stale_namespaces
    from m3t.clients import unlink

    client = _redis()
    try:
        stale = stale_namespaces(client)
    except LookupError as exc:
        _fail(
            f"{exc}: nothing is stale until one is (run `m3t features publish DATASET/meta.json`)"
        )
    table = Table("namespace", "keys")
    for namespace, keys in sorted(stale.items()):
        table.add_row(namespace, f"{len(keys):,}")
    out.print(table)
    total = sum(len(keys) for keys in stale.values())
    if not apply:
        out.print(f"{total:,} stale keys; run with --apply to delete them")
        return
    unlink(client, (key for keys in stale.values() for key in keys))
    out.print(f"deleted {total:,} stale keys")


@app.command("get")
def get(
    hadm_id: int = typer.Argument(..., help="The admission (hadm_id)."),
    as_of: datetime = typer.Option(
        None, help="Scoring time (default: the admission's latest event)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the features as JSON on stdout."),
):
    """Show an admission's current online features, unnormalised."""
    from features.online import OnlineStore

    try:
        store = OnlineStore.current(_redis())
    except LookupError as exc:
        _fail(f"{exc} (run `m3t features publish DATASET/meta.json`)")
    features = store.describe(hadm_id, as_of)
    if features is None:
        _fail(f"admission {hadm_id} has no online features (never seen, or expired)", code=2)
    if as_json:
        print(json.dumps(features, indent=2))
        return
    head = {k: v for k, v in features.items() if k != "numeric"}
    for key, value in head.items():
        out.print(f"[bold]{key}[/]: {value}")
    table = Table("feature", "value")
    for name, value in features["numeric"].items():
        table.add_row(name, "[dim]missing[/]" if value is None else f"{value:g}")
    out.print(table)
