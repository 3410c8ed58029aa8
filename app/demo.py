"""`m3t demo`: the whole system from a fresh machine, as the commands a user would type.

services up -> a synthetic cohort -> offline features -> train M3T-LM -> publish to Triton
-> the stream worker starts, and the cohort is replayed into Kafka while the worker scores
it live and a top-risk table updates -> how to query. Each step is printed before it runs.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live

from m3t.credentials import API_TOKEN, secret_file
from m3t.settings import Settings
from stream.api_tokens import TokenStore
from stream.cli import scores_table


def demo_steps(work: Path, admissions: int, seed: int, epochs: int) -> list[list[str]]:
    cohort, dataset, run = work / "cohort", work / "dataset", work / "run"
    return [
        ["services", "up"],
        [
            "ingest",
            "synth",
            "--admissions",
            str(admissions),
            "--seed",
            str(seed),
            "--out",
            str(cohort),
        ],
        ["features", "build", str(cohort), "--out", str(dataset)],
        ["features", "publish", str(dataset / "meta.json")],
        [
            "train",
            "run",
            "--data",
            str(dataset),
            "--out",
            str(run),
            "--epochs",
            str(epochs),
            "--seed",
            str(seed),
            "--bootstrap",
            "50",
        ],
        ["export", "publish", "--run", str(run), "--load"],
        ["ingest", "replay", str(cohort), "--first-hours", "48"],
    ]


def m3t(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", *args]


def run_demo(
    settings: Settings, console: Console, admissions: int = 3000, seed: int = 7, epochs: int = 20
) -> None:
    from m3t.clients import redis_client
    from stream.scores import ScoreStore

    work = settings.state_dir / "demo"
    *prepare, replay = demo_steps(work, admissions, seed, epochs)
    for step in prepare:
        console.rule(f"m3t {' '.join(step)}")
        if subprocess.run(m3t(*step)).returncode != 0:
            raise RuntimeError(f"`m3t {' '.join(step)}` failed")

    # The worker first, then the cohort streams in: scores appear as the events arrive.
    console.rule(f"m3t stream run --idle-timeout 20   while   m3t {' '.join(replay)}")
    worker = subprocess.Popen(m3t("stream", "run", "--idle-timeout", "20"))
    log = work / "replay.log"
    with log.open("w") as out:  # its own output would tear the live table
        replaying = subprocess.Popen(m3t(*replay), stdout=out, stderr=subprocess.STDOUT)
        store = ScoreStore(redis_client(settings, role="reader"))
        with Live(scores_table([]), console=console, refresh_per_second=2) as live:
            while worker.poll() is None:
                state = "replaying" if replaying.poll() is None else "replayed"
                live.update(
                    scores_table(
                        store.top(15),
                        title=f"top mortality risk, {time.strftime('%H:%M:%S')} ({state})",
                    )
                )
                time.sleep(1.0)
            live.update(scores_table(store.top(15), title="top mortality risk (final)"))
        replaying.wait()
    console.print(log.read_text())
    if replaying.returncode != 0:
        raise RuntimeError(f"`m3t {' '.join(replay)}` failed (its output is above)")
    if worker.returncode != 0:
        raise RuntimeError("the stream worker failed")

    top = store.top(1)
    if not top:
        raise RuntimeError("no admission was scored")
    score = store.get(top[0].hadm_id)
    console.print(f"Score read back from Redis for admission {score.hadm_id}: {score.as_json()}")
    console.rule("query it yourself")
    # Generated now if it is to be, so the hint's file exists, and registered as a reader.
    TokenStore(settings).development_token()
    token = f"$(cat {secret_file(settings, API_TOKEN)})"
    console.print(
        f"  m3t scores get {score.hadm_id}\n"
        "  m3t scores top --n 20\n"
        "  m3t scores watch\n"
        f'  m3t stream api   # then: curl -H "Authorization: Bearer {token}" '
        f"http://{settings.api.host}:{settings.api.port}/risk/top?n=20\n"
        "  m3t services down   # when done"
    )
