"""Issue 20: the ward pages in a real headless browser (Debian's Chromium, driven by Selenium)
against the API served by uvicorn, the session's Redis and Kafka, the real stream worker
scoring a synthetic cohort with a small M3T-LM on Triton, and the real alerting process."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import pytest
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By

from benchmarks.browser import chromium, log_in, serving, wait_for
from features.cxr import CxrPreprocessor
from features.online import OnlineStore
from features.state import hours
from ingest.replay import make_producer, replay
from m3t.settings import AlertRule, AlertSettings
from stream.alerts import AlertProcess, AlertStore
from stream.api_tokens import TokenStore
from stream.explanations import Explainer
from stream.scores import HISTORY_KEY, SCORE_KEY, ScoreStore
from stream.scoring import CachedEncoderScorer, OnlineFeatures
from stream.ward_session import COOKIE, Sessions
from stream.wiring import connect
from stream.xrays import CxrInputs
from tests.test_alerts import forget, produce_scores
from tests.test_api_security import bearer, own_state

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    driver.quit()


@pytest.fixture
def ward(settings, tmp_path, browser):
    """The API on this test's own state folder (token store, session key, audit log), a
    reader's token, and the browser on a blank page afterwards (its event stream closed)."""
    cfg = own_state(settings, tmp_path)
    token = TokenStore(cfg).add("ward-nurse", "reader")
    with serving(cfg) as base:
        yield cfg, base, token
        browser.get("about:blank")


def page_rows(driver) -> list[int]:
    return [
        int(tr.get_attribute("data-hadm-id"))
        for tr in driver.find_elements(By.CSS_SELECTOR, "#rows tr")
    ]


def with_session(base: str, cookie: str) -> httpx.Client:
    return httpx.Client(base_url=base, cookies={COOKIE: cookie})


def clicked(driver, selector: str) -> bool:
    """Whether a click on ``selector`` landed: the live list may redraw the row between
    finding it and clicking it."""
    try:
        driver.find_element(By.CSS_SELECTOR, selector).click()
    except StaleElementReferenceException:
        return False
    return True


def at_login(driver) -> bool:
    return driver.current_url.endswith("/ward/login")


def test_no_token_a_wrong_token_and_an_expired_session_are_refused(
    ward, browser, settings, tmp_path
):
    cfg, base, token = ward
    http = httpx.Client(base_url=base)

    # No session: the pages send the browser to the login form, the data answer 401.
    browser.get(f"{base}/ward")
    assert at_login(browser)
    assert http.get("/ward").status_code == 303
    assert http.get("/ward").headers["location"] == "/ward/login"
    for path in ("/ward/data/rows", "/ward/events", "/ward/data/patient/1"):
        assert http.get(path).status_code == 401, path
        assert http.get(path, headers=bearer(token)).status_code == 401, path  # no bearer here

    # A wrong token: refused with the form again, no cookie.
    log_in(browser, base, "not-a-token")
    assert at_login(browser)
    assert browser.find_element(By.ID, "error").text == "Not a valid token."
    assert browser.get_cookie(COOKIE) is None
    assert http.post("/ward/login", data={"token": "not-a-token"}).status_code == 401
    metrics = TokenStore(cfg).add("prometheus", "metrics")
    assert http.post("/ward/login", data={"token": metrics}).status_code == 403

    # The right token: a session cookie the page's scripts cannot read, never a token in a URL.
    log_in(browser, base, token)
    wait_for(lambda: browser.current_url == f"{base}/ward")
    cookie = browser.get_cookie(COOKIE)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ward"
    assert not cookie["secure"]  # plain HTTP on loopback; Secure whenever the API serves TLS
    assert cookie["expiry"] <= time.time() + cfg.api.session_ttl_s + 5
    assert COOKIE not in browser.execute_script("return document.cookie")
    assert token not in cookie["value"] and token not in browser.current_url
    assert with_session(base, cookie["value"]).get("/ward/data/rows").status_code == 200

    # Tampered with, or expired: refused.
    name, expires, signature = cookie["value"].rsplit(".", 2)
    forged = f"{name}.{int(expires) + 86400}.{signature}"
    assert with_session(base, forged).get("/ward/data/rows").status_code == 401
    entry = next(t for t in TokenStore(cfg).tokens() if t.name == "ward-nurse")
    sessions = Sessions(cfg, TokenStore(cfg))
    expired = sessions.issue(entry, now=time.time() - cfg.api.session_ttl_s - 1)
    assert with_session(base, expired).get("/ward/data/rows").status_code == 401
    assert with_session(base, expired).get("/ward/events").status_code == 401
    assert with_session(base, expired).get("/ward").status_code == 303
    browser.delete_all_cookies()
    browser.add_cookie({"name": COOKIE, "value": expired, "path": "/ward"})
    browser.get(f"{base}/ward")
    assert at_login(browser)

    # A revoked token ends its sessions.
    TokenStore(cfg).revoke("ward-nurse")
    assert with_session(base, cookie["value"]).get("/ward/data/rows").status_code == 401

    # A session that expires while its page is open: the live view sends it to the login form.
    short = own_state(settings, tmp_path / "short", session_ttl_s=2)
    brief = TokenStore(short).add("ward-brief", "reader")
    with serving(short) as other:
        log_in(browser, other, brief)
        wait_for(lambda: browser.current_url == f"{other}/ward")
        wait_for(lambda: at_login(browser), timeout_s=10)
        browser.get("about:blank")


def held_back(cohort) -> tuple[dict[int, list], object]:
    """Each admission's events up to before its discharge (so all stay on the ranking), less
    the last event, an observation, of one admission: the event sent while the page is open."""
    open_stays = {h: [e for e in events if e.type != "discharge"] for h, events in cohort.items()}
    chosen = next(h for h, events in open_stays.items() if events[-1].type == "observation")
    return open_stays, open_stays[chosen].pop()


def test_the_ward_list_ranks_updates_live_and_shows_the_apis_reasons(
    ward, browser, isolated_settings, cohort, deployed, redis_client, scores_restored
):
    cfg, base, token = ward
    fitted, _ = deployed
    stays, later = held_back(cohort)
    for h in cohort:  # other tests score the same cohort: no score or history of theirs
        redis_client.delete(SCORE_KEY.format(hadm_id=h), HISTORY_KEY.format(hadm_id=h))
    store = OnlineStore(
        redis_client, fitted, scratch=f"ward-{isolated_settings.kafka.consumer_group}"
    )
    scores = ScoreStore(redis_client)
    scorer = CachedEncoderScorer(
        isolated_settings,
        redis_client,
        cxr=CxrInputs(CxrPreprocessor(device="cpu")),
        explainer=Explainer(redis_client, store),
    )
    worker = connect(
        isolated_settings,
        OnlineFeatures(store),
        scorer,
        scores,
        max_batch=8,
        max_wait_ms=20,
        group_id=f"{isolated_settings.kafka.consumer_group}-ward",
    )
    total = sum(len(events) for events in stays.values()) + 1
    runner = threading.Thread(
        target=worker.run, kwargs={"stop_after": total, "idle_timeout_s": 120}
    )
    runner.start()
    producer = make_producer(isolated_settings)
    try:
        topic = isolated_settings.kafka.topic_events
        dead = isolated_settings.kafka.topic_dead_letter
        assert not replay(
            list(stays.values()), producer, topic, dead_letter_topic=dead
        ).dead_letters
        wait_for(lambda: all(scores.get(h) for h in stays), timeout_s=180, every_s=0.5)

        # The top admission's reasons, as the worker's reasons thread wrote them.
        api = httpx.Client(base_url=base, headers=bearer(token))
        top = api.get("/risk/top", params={"n": 100}).json()
        # The ranking may hold other tests' admissions: the highest of this one's.
        first = next(s["hadm_id"] for s in top if s["hadm_id"] in stays)
        reasoner = worker.batch_scorer.reasoner
        try:
            wait_for(lambda: scores.get(first).reasons, timeout_s=60, every_s=0.2)
        except TimeoutError:
            pytest.fail(
                f"no reasons for {first}: {scores.get(first)}, reasons {reasoner.stats}, "
                f"{reasoner.waiting} waiting, pending {list(worker.batcher.pending)}"
            )

        log_in(browser, base, token)
        wait_for(lambda: len(page_rows(browser)) == len(top), timeout_s=15)
        assert page_rows(browser) == [s["hadm_id"] for s in top]  # in the API's order

        def shown():
            try:
                return [
                    (li.get_attribute("data-feature"), float(li.get_attribute("data-contribution")))
                    for li in browser.find_elements(
                        By.CSS_SELECTOR, f'tr[data-hadm-id="{first}"] .reasons li[data-feature]'
                    )
                ]
            except WebDriverException:  # redrawn while read
                return None

        served = api.get(f"/admissions/{first}/risk").json()["reasons"]
        assert served and served == scores.get(first).reasons
        # The ward row shows the first three (stream/static/ward.js).
        wanted = [(r["feature"], r["contribution"]) for r in served[:3]]
        wait_for(lambda: shown() == wanted, timeout_s=15)

        # A new event through Kafka changes its row within seconds, without a reload.
        row = f'tr[data-hadm-id="{later.hadm_id}"]'
        before = browser.find_element(By.CSS_SELECTOR, row).get_attribute("data-scored-at")
        browser.execute_script("window.notReloaded = true;")
        sent = time.monotonic()
        replay([[later]], producer, topic, dead_letter_topic=dead)
        wait_for(
            lambda: (
                browser.find_element(By.CSS_SELECTOR, row).get_attribute("data-scored-at") != before
            ),
            timeout_s=20,
        )
        took = time.monotonic() - sent
        assert took < 20 and browser.execute_script("return window.notReloaded === true;")
        now = api.get(f"/admissions/{later.hadm_id}/risk").json()
        shown_risk = browser.find_element(By.CSS_SELECTOR, row).get_attribute("data-mortality")
        assert float(shown_risk) == pytest.approx(now["mortality_prob"])
        assert now["feature_time"] == hours(later.event_time) * 3600

        # The patient page draws its chart: a point per score in the history.
        wait_for(lambda: clicked(browser, f"{row} a"))
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#history-chart .risk-dot"))
        history = scores.history(later.hadm_id)
        dots = browser.find_elements(By.CSS_SELECTOR, "#history-chart .risk-dot")
        assert len(dots) == len(history) >= 2
        points = browser.find_element(By.CSS_SELECTOR, "#history-chart .risk-line")
        assert len(points.get_attribute("points").split()) == len(history)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#timeline > li")) == len(history)

        # Each score's reasons in the timeline (newest first), as its history entry holds
        # them once the reasons thread is done (the page reloads every few seconds).
        def timeline_matches() -> bool:
            wanted = [
                [r["feature"] for r in (json.loads(h["reasons"]) or [])[:5]]
                for h in scores.history(later.hadm_id)
            ]
            try:
                shown = [
                    [
                        li.get_attribute("data-feature")
                        for li in entry.find_elements(By.CSS_SELECTOR, ".reasons li[data-feature]")
                    ]
                    for entry in browser.find_elements(By.CSS_SELECTOR, "#timeline > li")
                ]
            except WebDriverException:  # redrawn while read
                return False
            return shown == wanted and any(wanted)

        wait_for(timeline_matches, timeout_s=20, every_s=0.25)
    finally:
        producer.close()
        runner.join(120)
        store.drop()
    assert worker.stats.events == total and worker.stats.dead_letters == 0


def page_alerts(driver) -> list[tuple[int, float, list[str]]]:
    """The alert list: (admission, raised at, criteria) per entry, in the page's order (read
    in one script, so a redraw cannot come between two entries)."""
    entries = driver.execute_script(
        "return [...document.querySelectorAll('#alert-list li')].map((li) =>"
        " [li.dataset.hadmId, li.dataset.raisedAt, li.dataset.criteria]);"
    )
    return [(int(h), float(at), criteria.split(",")) for h, at, criteria in entries]


def row_alert(driver, hadm_id: int) -> float | None:
    """The alert shown in an admission's row (its raise time), None without one."""
    raised = driver.execute_script(
        'const b = document.querySelector(`tr[data-hadm-id="${arguments[0]}"] .alert-badge`);'
        "return b ? b.dataset.raisedAt : null;",
        hadm_id,
    )
    return None if raised is None else float(raised)


def patient_alert(driver) -> list | None:
    """The patient page's alert: [active, raised at, text], None before it is drawn."""
    return driver.execute_script(
        "const d = document.querySelector('dd.alert');"
        "return d ? [d.dataset.active ?? null, d.dataset.raisedAt ?? null, d.textContent] : null;"
    )


def test_alerts_of_the_alerting_process_show_live_and_silent_ones_never(
    ward, browser, isolated_settings, redis_client, scores_restored
):
    cfg, base, token = ward
    rules = AlertSettings(
        rules={
            "": AlertRule(threshold=0.5, hysteresis=0.05, min_interval_h=0.0),
            "SICU": AlertRule(threshold=0.5, silent=True),
        }
    )
    alerting = isolated_settings.model_copy(update={"alerts": rules})
    first = 75_000_000 + uuid.uuid4().int % 100_000 * 10
    shown, silent = first + 1, first + 2
    api = httpx.Client(base_url=base, headers=bearer(token))

    def served() -> list[tuple[int, float, list[str]]]:
        return [(a["hadm_id"], a["raised_at"], a["criteria"]) for a in api.get("/alerts").json()]

    def folded(hadm_id: int, feature_time: float) -> bool:
        fields = AlertStore(redis_client).states([hadm_id])[hadm_id]
        return "state" in fields and json.loads(fields["state"])["feature_time"] == feature_time

    process = AlertProcess(alerting)
    stop = threading.Event()
    thread = threading.Thread(target=process.run, kwargs={"stop": stop}, daemon=True)
    log_in(browser, base, token)
    wait_for(lambda: "live" in browser.find_element(By.ID, "status").get_attribute("class"))
    browser.execute_script("window.notReloaded = true;")
    thread.start()
    try:
        # Scores on the scores topic: the alerting process raises one shown and one silent.
        produce_scores(alerting, redis_client, [(shown, 100.0, 0.97, "MICU")])
        produce_scores(alerting, redis_client, [(silent, 100.0, 0.98, "SICU")])
        wait_for(lambda: folded(shown, 100.0) and folded(silent, 100.0), timeout_s=60)
        wait_for(lambda: row_alert(browser, shown) == 100.0, timeout_s=15)
        assert (shown, 100.0, ["threshold"]) in page_alerts(browser)
        wait_for(lambda: page_alerts(browser) == served(), timeout_s=15)
        assert silent in page_rows(browser) and row_alert(browser, silent) is None
        assert silent not in [a[0] for a in page_alerts(browser)]
        assert silent not in [a[0] for a in served()]
        assert redis_client.zscore("m3t:alert:silent", str(silent)) == 100.0  # recorded

        # A lower score clears it: gone from the row and the list, still without a reload.
        produce_scores(alerting, redis_client, [(shown, 200.0, 0.2, "MICU")])
        wait_for(lambda: folded(shown, 200.0), timeout_s=60)
        wait_for(lambda: shown not in [a[0] for a in page_alerts(browser)], timeout_s=15)
        assert row_alert(browser, shown) is None
        wait_for(lambda: page_alerts(browser) == served(), timeout_s=15)
        assert browser.execute_script("return window.notReloaded === true;")

        # The patient pages: the last alert, cleared; the silent rule's, none.
        browser.get(f"{base}/ward/patient/{shown}")
        active, raised_at, _ = wait_for(lambda: patient_alert(browser))
        assert active == "false" and float(raised_at) == 100.0
        browser.get(f"{base}/ward/patient/{silent}")
        assert wait_for(lambda: patient_alert(browser)) == [None, None, "none"]
    finally:
        stop.set()
        thread.join(30)
        forget(redis_client, [shown, silent])
    assert process.counts["raised"] == 2 and process.counts["cleared"] == 1
