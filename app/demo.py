"""`m3t demo`: the whole system from a fresh machine, as the commands a user would type.

services up -> a synthetic cohort -> offline features -> train M3T-LM -> publish to Triton
(with the m3t_explain graph) -> the stream worker (scores, then their reasons) and the
alerting process start, and the cohort is replayed into Kafka while the worker scores it
live and a top-risk table updates -> how to query it and open the ward page. Each step is
printed before it runs.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live

from m3t.credentials import API_TOKEN, secret_file
from m3t.settings import AlertSettings, Settings
from stream.api_tokens import TokenStore
from stream.cli import scores_table


def demo_steps(
    work: Path, admissions: int, seed: int, epochs: int, first_hours: tuple[float, ...] = (48,)
) -> list[list[str]]:
    """The commands, in order; the last ones replay each admission's first hours, one
    replay per entry of ``first_hours`` (a later replay resends the earlier events, which
    change nothing, and the new ones: a new score for every admission)."""
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
        *(["ingest", "replay", str(cohort), "--first-hours", f"{h:g}"] for h in first_hours),
    ]


WORKER = ["stream", "run", "--idle-timeout", "20"]
ALERTS = ["alerts", "run"]
# Unless rules are configured: each ward's three highest risks alert, whatever the model's
# scale.
DEMO_RULES = {"": {"top_k": 3}}


def m3t(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", *args]


def shown(env: dict[str, str], step: list[str]) -> str:
    """A step as a user would type it."""
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), "m3t", *step])


def run_demo(
    settings: Settings,
    console: Console,
    admissions: int = 3000,
    seed: int = 7,
    epochs: int = 20,
    first_hours: tuple[float, ...] = (48,),
) -> None:
    from m3t.clients import redis_client
    from stream.alerts import AlertStore
    from stream.scores import ScoreStore

    work = settings.state_dir / "demo"
    steps = demo_steps(work, admissions, seed, epochs, first_hours)
    prepare, replays = steps[: -len(first_hours)], steps[-len(first_hours) :]
    for step in prepare:
        console.rule(f"m3t {' '.join(step)}")
        if subprocess.run(m3t(*step)).returncode != 0:
            raise RuntimeError(f"`m3t {' '.join(step)}` failed")

    # The worker and the alerting process first, then the cohort streams in: scores (and
    # alerts) appear as the events arrive.
    configured = settings.alerts != AlertSettings()
    rules = {} if configured else {"M3T_ALERTS__RULES": DEMO_RULES}
    alerts_env = {k: json.dumps(v, separators=(",", ":")) for k, v in rules.items()}
    replaying_shown = "   then   ".join(shown({}, r) for r in replays)
    console.rule(
        f"{shown({}, WORKER)}   beside   {shown(alerts_env, ALERTS)}   while   {replaying_shown}"
    )
    worker = subprocess.Popen(m3t(*WORKER))
    log = work / "replay.log"
    failed = []
    with log.open("w") as out:  # their own output would tear the live table
        alerting = subprocess.Popen(
            m3t(*ALERTS), stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **alerts_env}
        )
        pending = list(replays)
        replay = pending.pop(0)
        replaying = subprocess.Popen(m3t(*replay), stdout=out, stderr=subprocess.STDOUT)
        store = ScoreStore(redis_client(settings, role="reader"))
        with Live(scores_table([]), console=console, refresh_per_second=2) as live:
            while worker.poll() is None:
                if replaying.poll() is not None and pending:
                    if replaying.returncode != 0:
                        failed.append(replay)
                    replay = pending.pop(0)
                    replaying = subprocess.Popen(m3t(*replay), stdout=out, stderr=subprocess.STDOUT)
                state = "replaying" if replaying.poll() is None or pending else "replayed"
                live.update(
                    scores_table(
                        store.top(15),
                        title=f"top mortality risk, {time.strftime('%H:%M:%S')} ({state})",
                    )
                )
                time.sleep(1.0)
            live.update(scores_table(store.top(15), title="top mortality risk (final)"))
        if replaying.wait() != 0:
            failed.append(replay)
        # The worker stopped 20 s after the last event: the alerts have long caught up.
        alerting.send_signal(signal.SIGTERM)
        alerting.wait(60)
    console.print(log.read_text())
    if failed or pending:
        step = " ".join((failed or pending)[0])
        raise RuntimeError(f"`m3t {step}` failed or did not run (the output is above)")
    if worker.returncode != 0:
        raise RuntimeError("the stream worker failed")
    if alerting.returncode != 0:
        raise RuntimeError("the alerting process failed (its output is above)")

    top = store.top(1)
    if not top:
        raise RuntimeError("no admission was scored")
    score = store.get(top[0].hadm_id)
    console.print(f"Score read back from Redis for admission {score.hadm_id}: {score.as_json()}")
    alerts = AlertStore(store.client).active()
    rules_shown = alerts_env.get("M3T_ALERTS__RULES", "as configured")
    console.print(f"Active alerts: {len(alerts)} (rules: {rules_shown}); `m3t alerts list`")
    console.rule("query it yourself")
    # Generated now if it is to be, so the hint's file exists, and registered as a reader.
    TokenStore(settings).development_token()
    token = f"$(cat {secret_file(settings, API_TOKEN)})"
    url = f"http://{settings.api.host}:{settings.api.port}"
    console.print(
        f"  m3t scores get {score.hadm_id}\n"
        "  m3t scores top --n 20\n"
        "  m3t scores watch\n"
        "  m3t alerts list\n"
        f'  m3t stream api   # then: curl -H "Authorization: Bearer {token}" '
        f"{url}/risk/top?n=20\n"
        "  m3t api token add ward-nurse --role reader   # a reader's token, printed once;\n"
        f"      # with `m3t stream api` running, open {url}/ward and log in with it\n"
        "  m3t services down   # when done"
    )
