"""`m3t stream ...`, `m3t scores ...` and `m3t api ...`."""

from __future__ import annotations

import json
import signal
import threading
from dataclasses import asdict
from datetime import UTC, datetime

import typer
from rich.console import Console
from rich.table import Table

from m3t.clients import redis_client
from m3t.console import fail
from m3t.settings import get_settings

console = Console()

app = typer.Typer(
    help="Run the Kafka stream worker that keeps features and scores current.", no_args_is_help=True
)
scores_app = typer.Typer(help="Query current risk scores.", no_args_is_help=True)
api_app = typer.Typer(help="The HTTP API's tokens.", no_args_is_help=True)
token_app = typer.Typer(
    help="Named API tokens, each with a role: reader (scores), metrics (/metrics) or ingest "
    "(POST /fhir).",
    no_args_is_help=True,
)
api_app.add_typer(token_app, name="token")


def scores_table(scores, title: str | None = None) -> Table:
    table = Table(
        "hadm_id", "mortality risk", "remaining (d)", "expected discharge", "model", title=title
    )
    for s in scores:
        table.add_row(
            str(s.hadm_id),
            f"{s.mortality_prob:.3f}",
            f"{s.los_remaining_days:.1f}",
            iso_time(s.expected_discharge),
            s.model,
        )
    return table


def iso_time(epoch_s: float) -> str:
    """ISO 8601 in UTC, to the minute: an expected discharge is no more precise than that."""
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%MZ")


@app.command("dead-letters")
def dead_letters(
    latest: int = typer.Option(10, help="How many of the newest letters to show."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """What the dead-letter topic holds: counts by reason and the latest letters."""
    from stream.dead_letters import summarize

    try:
        summary = summarize(get_settings(), latest)
    except Exception as exc:  # Kafka unreachable, topic missing: one clean line
        fail(exc)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    table = Table(
        "reason", "letters", title=f"{summary['total']:,} dead letters in {summary['topic']}"
    )
    for reason, count in summary["by_reason"].items():
        table.add_row(reason, f"{count:,}")
    console.print(table)
    latest_table = Table("kafka time (ms)", "reason", "detail", "where", "event", title="latest")
    for letter in summary["latest"]:
        where = (
            f"{letter['topic']}[{letter['partition']}]@{letter['offset']}"
            if "offset" in letter
            else letter.get("source")
            or (f"admission {letter['hadm_id']}" if "hadm_id" in letter else "")
        )
        event = " ".join(str(letter[k]) for k in ("type", "event_id") if letter.get(k))
        latest_table.add_row(
            str(letter["kafka_time_ms"]),
            letter["reason"],
            str(letter.get("detail", "")),
            where,
            event,
        )
    console.print(latest_table)
    if not summary["complete"]:
        console.print("[yellow]the topic was not read to its end in time[/]")


@app.command("run")
def run(
    scorer: str = typer.Option(
        "cached", help="cached (encoders + fusion, embeddings cached) or full (m3t_lm)."
    ),
    idle_timeout: float = typer.Option(None, help="Stop after this many seconds without events."),
    max_batch: int = typer.Option(
        None, help="Most admissions scored in one request (default: settings.stream.max_batch)."
    ),
    max_wait_ms: int = typer.Option(
        None,
        help="Longest a change waits for a batch to fill; 0: scored at once when no batch is "
        "in flight (default: settings.stream.max_wait_ms).",
    ),
    max_poll: int = typer.Option(
        2048, help="Most events taken from Kafka in one poll (folded in one write)."
    ),
    group: str = typer.Option(
        None,
        help="Consumer group (default: settings.kafka.consumer_group; the stream's Kafka user "
        "may join the groups whose name starts with that one).",
    ),
    backend: str = typer.Option(
        "triton",
        help="triton, or onnx: the published ONNX files in-process "
        "with ONNX Runtime (development; same numbers).",
    ),
):
    """Consume admission events, keep features current in Redis and write risk scores.

    Run N of them (same group) to scale over the topic's partitions. SIGTERM finishes the
    batch in hand, commits and leaves the group.
    """
    from stream.scores import ScoreStore
    from stream.scoring import build_scoring

    settings = get_settings()
    client = redis_client(settings)
    try:
        features, model = build_scoring(settings, client, scorer, backend)
    except (LookupError, RuntimeError, ValueError) as exc:
        fail(exc)
    stats = run_worker(
        settings,
        features,
        model,
        ScoreStore(client),
        idle_timeout,
        max_batch=settings.stream.max_batch if max_batch is None else max_batch,
        max_wait_ms=settings.stream.max_wait_ms if max_wait_ms is None else max_wait_ms,
        max_poll_records=max_poll,
        group_id=group,
    )
    console.print(asdict(stats))


def run_worker(settings, features, scorer, scores, idle_timeout_s: float | None = None, **options):
    """A stream worker over these pieces, run until SIGTERM or SIGINT (it finishes the batch in
    hand, commits and leaves the group) or ``idle_timeout_s`` without events; its stats.
    ``options`` are ``stream.worker.connect``'s."""
    from stream.wiring import connect

    worker = connect(settings, features, scorer, scores, **options)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return worker.run(stop=stop, idle_timeout_s=idle_timeout_s)


@app.command("api")
def api(
    host: str = typer.Option(None, help="Bind address (default: settings.api.host)."),
    port: int = typer.Option(None, help="Port (default: settings.api.port)."),
):
    """Serve the HTTP API: /admissions/{id}/risk, /risk/top, /metrics, /openapi.json (each
    with a bearer token of its role) and /healthz.

    Beyond loopback: TLS (M3T_API__TLS_CERTFILE, M3T_API__TLS_KEYFILE), no development token.
    """
    import uvicorn

    from stream.api import bind_refusals, create_app

    settings = get_settings()
    host = host or settings.api.host
    refusals = bind_refusals(settings, host)
    if refusals:
        fail(f"the API will not listen on {host}: " + "; ".join(refusals))
    tls = {}
    if settings.api.tls_certfile and settings.api.tls_keyfile:
        for path in (settings.api.tls_certfile, settings.api.tls_keyfile):
            if not path.is_file():
                fail(f"the API's TLS certificate or key is missing: {path}")
        tls = {
            "ssl_certfile": str(settings.api.tls_certfile),
            "ssl_keyfile": str(settings.api.tls_keyfile),
        }
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port or settings.api.port,
        log_level="warning",
        # The client's address is the socket's: a forwarded-for header from a local process
        # would otherwise let it dodge the per-address limit on failed sign-ins.
        proxy_headers=False,
        **tls,
    )


def _store():
    from stream.scores import ScoreStore

    # The query side logs in as the read-only user.
    return ScoreStore(redis_client(get_settings(), role="reader"))


@scores_app.command("get")
def get(hadm_id: int, as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """An admission's current remaining length of stay, expected discharge and mortality risk."""
    score = _store().get(hadm_id)
    if score is None:
        Console(stderr=True).print(f"no score for admission {hadm_id}")
        raise typer.Exit(1)
    if as_json:
        print(score.as_json())
    else:
        console.print(scores_table([score]))


@scores_app.command("top")
def top(
    n: int = typer.Option(20, "--n", help="How many admissions."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Current inpatients ranked by mortality risk."""
    scores = _store().top(n)
    if as_json:
        print(json.dumps([asdict(s) for s in scores]))
    else:
        console.print(scores_table(scores))


@scores_app.command("watch")
def watch(
    n: int = typer.Option(20, "--n", help="How many admissions."),
    interval: float = typer.Option(1.0, help="Seconds between refreshes."),
    count: int = typer.Option(0, help="Stop after this many refreshes (0: until Ctrl-C)."),
):
    """A live table of the current top-risk inpatients."""
    import time

    from rich.live import Live

    store = _store()
    with Live(scores_table(store.top(n)), console=console, refresh_per_second=4) as live:
        refreshes = 0
        try:
            while count == 0 or refreshes < count:
                time.sleep(interval)
                live.update(scores_table(store.top(n)))
                refreshes += 1
        except KeyboardInterrupt:
            pass


@token_app.command("add")
def token_add(
    name: str,
    role: str = typer.Option(
        ..., help="reader (scores), metrics (/metrics only) or ingest (POST /fhir only)."
    ),
):
    """Make a token; it is printed once (only its hash is kept)."""
    from stream.api_tokens import TokenStore

    try:
        token = TokenStore(get_settings()).add(name, role)
    except ValueError as exc:
        fail(exc)
    print(token)
    Console(stderr=True).print(f"token {name!r} ({role}) made: it is shown only this once")


@token_app.command("list")
def token_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """The tokens' names, roles and creation times (never a token or its hash)."""
    from stream.api_tokens import TokenStore

    entries = [
        {"name": t.name, "role": t.role, "created": t.created, "development": t.development}
        for t in TokenStore(get_settings()).tokens()
    ]
    if as_json:
        print(json.dumps(entries))
        return
    table = Table("name", "role", "created", "development")
    for e in entries:
        table.add_row(e["name"], e["role"], e["created"], "yes" if e["development"] else "")
    console.print(table)


@token_app.command("revoke")
def token_revoke(name: str):
    """Revoke a token: from the next request on, it is refused."""
    from stream.api_tokens import TokenStore

    if not TokenStore(get_settings()).revoke(name):
        fail(f"no token named {name!r}")
    console.print(f"token {name!r} revoked")
