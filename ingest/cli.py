"""``m3t ingest``: read MIMIC-IV, generate a synthetic cohort, replay a cohort into Kafka,
take HL7 v2 over MLLP."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ingest.accounting import IngestStats, JsonLinesDeadLetters
from ingest.events import MAX_NOTE_CHARS
from m3t.console import fail as _fail

app = typer.Typer(
    help="Read MIMIC-IV, generate a synthetic cohort, replay it into Kafka.", no_args_is_help=True
)
console = Console(stderr=True)  # stdout stays clean for --json


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _reader(root: Path, max_note_chars: int, cxr: str, dead_letters):
    from ingest.mimic import MimicLayoutError, MimicReader

    try:
        return MimicReader(root, max_note_chars=max_note_chars, cxr=cxr, dead_letters=dead_letters)
    except MimicLayoutError as exc:
        _fail(str(exc))


def _stats_table(stats: IngestStats) -> Table:
    table = Table(
        "source table", "read", "used", "dead letters", "skipped", "fallbacks", title="rows"
    )
    for name, t in sorted(stats.tables.items()):
        table.add_row(
            name,
            f"{t.read:,}",
            f"{t.used:,}",
            ", ".join(f"{k} {v:,}" for k, v in sorted(t.dead.items())) or "-",
            ", ".join(f"{k} {v:,}" for k, v in sorted(t.skipped.items())) or "-",
            ", ".join(f"{k} {v:,}" for k, v in sorted(t.fallbacks.items())) or "-",
        )
    return table


@contextmanager
def _kafka(settings, client: str, **options):
    from ingest.replay import make_producer

    try:
        producer = make_producer(settings, client, **options)
    except Exception as exc:  # kafka-python raises NoBrokersAvailable, confluent a KafkaException
        _fail(
            f"cannot reach Kafka at {settings.kafka.bootstrap_servers} ({type(exc).__name__}); "
            "is it up? (m3t services up kafka)"
        )
    try:
        yield producer
    finally:
        producer.close()


@app.command("mimic")
def mimic(
    root: Path = typer.Argument(
        ..., exists=True, file_okay=False, help="A MIMIC-IV folder (hosp/, icu/, note/, CXR)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Read and count everything; send nothing to Kafka."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    dead_letter_file: Path = typer.Option(
        None,
        help="Dry runs: JSON-lines file for dead letters "
        "[default: <state_dir>/dead-letters.jsonl].",
    ),
    max_note_chars: int = typer.Option(
        MAX_NOTE_CHARS, help="Notes longer than this are dead-lettered."
    ),
    cxr: str = typer.Option(
        "auto", help="Chest X-rays from: auto, jpg (MIMIC-CXR-JPG), dicom (MIMIC-CXR), none."
    ),
    client: str = typer.Option(
        "confluent", help="Kafka client: confluent (librdkafka) or kafka-python."
    ),
):
    """Read a MIMIC-IV folder: every admission's events, and where every row went.

    Without --dry-run the events go to the events topic (as `replay --speed 0`) and dead
    letters to the dead-letter topic.
    """
    from m3t.settings import get_settings

    settings = get_settings()
    if not dry_run:
        return _replay(
            root,
            settings,
            speed=0.0,
            max_wait_s=0.0,
            client=client,
            linger_ms=20,
            batch_size=512 * 1024,
            compression=None,
            as_json=as_json,
            max_note_chars=max_note_chars,
            cxr=cxr,
        )
    path = dead_letter_file or settings.state_dir / "dead-letters.jsonl"
    with JsonLinesDeadLetters(path) as sink:
        reader = _reader(root, max_note_chars, cxr, sink)
        with _progress() as progress:
            task = progress.add_task("reading", total=None)
            for events in reader.admissions():
                progress.update(task, advance=len(events), total=reader.expected_events)
    summary = reader.stats.as_dict() | {"dead_letter_file": str(path)}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    console.print(_stats_table(reader.stats))
    console.print(f"events: {summary['events']}  dead letters: {summary['dead_letters']} -> {path}")
    console.print(f"every row accounted for: {summary['balanced']}")


@app.command("synth")
def synth(
    admissions: int = typer.Option(1000, min=1, help="How many admissions."),
    seed: int = typer.Option(0, help="Random seed (same seed, same cohort)."),
    out: Path = typer.Option(..., file_okay=False, help="Output folder (MIMIC-IV layout)."),
    image_size: int = typer.Option(256, min=32, help="Radiograph side in pixels."),
    dicom: bool = typer.Option(
        True, help="Also write the DICOM tree (CR/DX; JPEG-baseline and uncompressed)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    feed_format: str = typer.Option(
        "mimic",
        "--format",
        help="mimic: the MIMIC-IV layout only; hl7: also its events as an HL7 v2 message "
        "stream in OUT/hl7/messages.hl7; fhir: also OUT/fhir/bundles.ndjson, the cohort as FHIR "
        "R4 Bundles (one an admission-hour) for POST /fhir.",
    ),
):
    """Write a synthetic multimodal cohort in the MIMIC-IV layout (see ingest/synth.py)."""
    from dataclasses import asdict

    from ingest.synth import generate, studies_count

    if feed_format not in ("mimic", "hl7", "fhir"):
        _fail(f"--format is mimic, hl7 or fhir, not {feed_format!r}")

    with _progress() as progress:
        task = progress.add_task("painting radiographs", total=studies_count(admissions, seed))
        summary = generate(
            out,
            admissions,
            seed,
            image_size=image_size,
            dicom=dicom,
            progress=lambda n: progress.advance(task, n),
        )
    result = asdict(summary)
    if feed_format == "hl7":
        from ingest import hl7_writer
        from ingest.mimic import MimicReader

        events = (e for evs in MimicReader(out).admissions() for e in evs)
        result["hl7_messages"] = hl7_writer.write(events, out / "hl7" / "messages.hl7")
    elif feed_format == "fhir":
        from ingest.fhir_writer import write_cohort

        written = write_cohort(out, out / "fhir")
        result["fhir_bundles"], result["fhir_file"] = written.bundles, str(written.path)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    table = Table("what", "count", title=f"synthetic cohort in {out}")
    for name, value in result.items():
        if name != "out":
            table.add_row(name, str(value))
    console.print(table)


@app.command("replay")
def replay(
    root: Path = typer.Argument(
        ..., exists=True, file_okay=False, help="A cohort folder (MIMIC-IV layout)."
    ),
    speed: float = typer.Option(
        0.0,
        min=0.0,
        help="Event time runs this many times faster than wall time; 0: as fast as possible.",
    ),
    max_wait: float = typer.Option(
        1.0, min=0.0, help="Longest wait between two events, in wall seconds."
    ),
    client: str = typer.Option(
        "confluent", help="Kafka client: confluent (librdkafka) or kafka-python."
    ),
    linger_ms: int = typer.Option(20, help="Producer batching delay."),
    batch_size: int = typer.Option(512 * 1024, help="Producer batch size in bytes."),
    compression: str = typer.Option(
        "none", help="none, gzip, lz4, zstd (kafka-python needs the lz4 package for lz4)."
    ),
    max_note_chars: int = typer.Option(
        MAX_NOTE_CHARS, help="Notes longer than this are dead-lettered."
    ),
    cxr: str = typer.Option("auto", help="Chest X-rays from: auto, jpg, dicom, none."),
    first_hours: float = typer.Option(
        None,
        min=0.0,
        help="Replay only each admission's first HOURS after "
        "admission (longer stays stay open: current inpatients).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
):
    """Stream a cohort's events into Kafka in event-time order (key: hadm_id)."""
    from m3t.settings import get_settings

    _replay(
        root,
        get_settings(),
        speed=speed,
        max_wait_s=max_wait,
        client=client,
        linger_ms=linger_ms,
        batch_size=batch_size,
        compression=None if compression == "none" else compression,
        as_json=as_json,
        max_note_chars=max_note_chars,
        cxr=cxr,
        first_hours=first_hours,
    )


def _replay(
    root,
    settings,
    *,
    speed,
    max_wait_s,
    client,
    linger_ms,
    batch_size,
    compression,
    as_json,
    max_note_chars,
    cxr,
    first_hours=None,
):
    from ingest import replay as rp

    with _kafka(
        settings, client, linger_ms=linger_ms, batch_size=batch_size, compression=compression
    ) as producer:
        dead = rp.KafkaDeadLetters(producer, settings.kafka.topic_dead_letter)
        reader = _reader(root, max_note_chars, cxr, dead)
        with _progress() as progress:
            task = progress.add_task(f"replaying into {settings.kafka.topic_events}", total=None)
            try:
                admissions = reader.admissions()
                if first_hours is not None:
                    admissions = rp.first_hours(admissions, first_hours)
                summary = rp.replay(
                    admissions,
                    producer,
                    settings.kafka.topic_events,
                    dead_letter_topic=settings.kafka.topic_dead_letter,
                    speed=speed,
                    max_wait_s=max_wait_s,
                    progress=lambda n: progress.update(
                        task, completed=n, total=reader.expected_events
                    ),
                )
            except rp.ReplayError as exc:
                _fail(str(exc))
    summary.dead_letters.update(reader.stats.dead_letters)
    result = summary.as_dict() | {"rows": reader.stats.as_dict()["tables"], "client": client}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(
        "type",
        "events",
        title=f"replayed {summary.events:,} events in {summary.seconds:.1f} s "
        f"({summary.events_per_s:,.0f} events/s, {client})",
    )
    for name, count in sorted(summary.by_type.items()):
        table.add_row(name, f"{count:,}")
    console.print(table)
    console.print(
        f"dead letters -> {settings.kafka.topic_dead_letter}: "
        f"{dict(summary.dead_letters) or 'none'}"
    )


@app.command("mllp")
def mllp(
    host: str = typer.Option(None, help="Address to listen on (default: ingest.mllp_host)."),
    port: int = typer.Option(None, help="Port to listen on (default: ingest.mllp_port)."),
):
    """Listen for HL7 v2 over MLLP: each message's events go to Kafka, then its ACK."""
    import asyncio
    import logging

    from ingest.mllp import serve
    from m3t.settings import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        asyncio.run(serve(get_settings(), host, port))
    except KeyboardInterrupt:
        pass


@app.command("send-hl7")
def send_hl7(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="HL7 v2 messages."),
    host: str = typer.Option(None, help="Listener's address (default: ingest.mllp_host)."),
    port: int = typer.Option(None, help="Listener's port (default: ingest.mllp_port)."),
):
    """Send each message in FILE (segments one a line, a message from each MSH) through
    python-hl7's MLLP client and print each ACK: the message's number, MSA-1 (the code),
    MSA-2 (the control id acknowledged) and MSA-3 (a refusal's reason); exit 1 unless all
    are AA."""
    from hl7.client import MLLPClient

    from m3t.settings import get_settings

    cfg = get_settings().ingest
    codes = []
    with MLLPClient(host or cfg.mllp_host, port or cfg.mllp_port) as client:
        for n, message in enumerate(split_messages(file.read_text()), 1):
            code, control_id, reason = ack_fields(client.send_message(message))
            codes.append(code)
            print(f"{n}\t{code}\t{control_id}\t{reason}".rstrip())
            if code == "none":
                break  # the listener closed the connection: resend later
    if any(code != "AA" for code in codes):
        raise typer.Exit(1)


def split_messages(text: str) -> list[str]:
    """Messages in a file: segments on lines (any line ending), each message from its MSH."""
    messages: list[list[str]] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line.startswith("MSH"):
            messages.append([])
        if line.strip() and messages:
            messages[-1].append(line)
    return ["\r".join(segments) + "\r" for segments in messages]


def ack_fields(ack: bytes) -> tuple[str, str, str]:
    """MSA-1 (the code), MSA-2 (the control id acknowledged) and MSA-3 (the reason) of an
    ACK as the client received it; ``("none", "", "")`` when nothing came back."""
    for segment in ack.strip(b"\x0b\x1c\r").split(b"\r"):
        if segment.startswith(b"MSA|"):
            fields = segment.decode(errors="replace").split("|")[1:4]
            return tuple(fields + [""] * (3 - len(fields)))
    return "none", "", ""


def msa_code(ack: bytes) -> str:
    """MSA-1 of an ACK, or ``none`` when nothing came back."""
    return ack_fields(ack)[0]
