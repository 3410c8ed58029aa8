"""Take docs/ward.png and docs/patient.png from a real run: `m3t demo`'s steps on a small
synthetic cohort (the demo's model, trained for a few epochs; the real stream worker with
explanations on; the real alerting process), on services of their own (a temporary state
folder, free ports), then the ward pages in headless Chromium.

    PYTHONPATH=. .venv/bin/python docs/screenshots.py [--admissions 300] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console

from app.demo import run_demo
from benchmarks.browser import chromium, log_in, serving, wait_for
from m3t import services
from m3t.clients import redis_client
from m3t.services.process import free_ports
from m3t.settings import get_settings
from stream.alerts import AlertStore
from stream.api_tokens import TokenStore
from stream.scores import HISTORY_KEY, RANKING_KEY

DOCS = Path(__file__).resolve().parent
# The demo's rule (each ward's three highest risks), but one ward's runs silent.
RULES = {
    "": {"top_k": 3},
    "Cardiac Vascular Intensive Care Unit (CVICU)": {"top_k": 3, "silent": True},
}
# Each admission's first 12 hours replayed, then 24, 36, 48: four scores each, for the charts.
FIRST_HOURS = (12, 24, 36, 48)


def isolated(state: Path) -> dict[str, str]:
    """M3T_* variables for services, state and models of this run's own."""
    redis, kafka, controller, http, grpc, metrics, api = free_ports(7)
    (state / "model_repo").mkdir(parents=True)
    return {
        "M3T_STATE_DIR": str(state / "state"),
        "M3T_MODEL_REPO": str(state / "model_repo"),
        "M3T_REDIS__PORT": str(redis),
        "M3T_KAFKA__PORT": str(kafka),
        "M3T_KAFKA__CONTROLLER_PORT": str(controller),
        "M3T_TRITON__HTTP_PORT": str(http),
        "M3T_TRITON__GRPC_PORT": str(grpc),
        "M3T_TRITON__METRICS_PORT": str(metrics),
        "M3T_API__PORT": str(api),
        "M3T_ALERTS__RULES": json.dumps(RULES),
    }


def patient_to_show(settings) -> int:
    """An admission with an active alert and the longest score history (else the longest)."""
    client = redis_client(settings, role="admin")
    try:
        alerted = [a["hadm_id"] for a in AlertStore(client).active()]
        ranked = [int(h) for h in client.zrevrange(RANKING_KEY, 0, 49)]
        candidates = alerted or ranked
        return max(candidates, key=lambda h: client.xlen(HISTORY_KEY.format(hadm_id=h)))
    finally:
        client.close()


def shoot(settings, folder: Path) -> None:
    from selenium.webdriver.common.by import By

    token = TokenStore(settings).add("screenshots", "reader")
    hadm_id = patient_to_show(settings)
    driver = chromium(1500, 1000)
    try:
        with serving(settings) as base:
            log_in(driver, base, token)
            wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#rows tr .spark-line"), 30)
            time.sleep(1.0)
            driver.save_screenshot(str(folder / "ward.png"))
            driver.set_window_size(1400, 1300)
            driver.get(f"{base}/ward/patient/{hadm_id}")
            wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#history-chart .risk-line"))
            time.sleep(1.0)
            driver.save_screenshot(str(folder / "patient.png"))
    finally:
        driver.quit()
        TokenStore(settings).revoke("screenshots")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admissions", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--keep", action="store_true", help="leave the services and state")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="m3t-screenshots-"))
    os.environ.update(isolated(work))
    get_settings.cache_clear()
    settings = get_settings()
    try:
        run_demo(
            settings,
            Console(),
            admissions=args.admissions,
            epochs=args.epochs,
            first_hours=FIRST_HOURS,
        )
        shoot(settings, args.out)
        print(f"wrote {args.out / 'ward.png'} and {args.out / 'patient.png'}")
    finally:
        if not args.keep:
            services.down(settings)
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
