"""The HTTP API's security: named tokens with roles kept hashed, TLS to listen beyond loopback,
an audit line per read of a score, rate limits, metrics from counters read without a scan, and
an OpenAPI document schemathesis finds true. The API is served by a real uvicorn and queried
over HTTP(S) with httpx; Redis is the session's."""

from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
import sys
import time
import uuid

import httpx
import pytest
import redis
from pydantic import SecretStr
from typer.testing import CliRunner

import stream.api
from app.cli import app as cli
from benchmarks.browser import serving
from m3t import tls
from m3t.clients import is_cluster
from m3t.credentials import API_TOKEN, login, secret_file
from m3t.services.process import wait_until
from m3t.services.redis_cluster import CLIENT_RULES
from m3t.settings import Settings, get_settings
from m3t.tls import ca_file, server_certificate
from stream.api_tokens import TokenStore
from stream.metrics import COUNTERS, METRICS_KEY, STALE_AFTER_S, WorkerMetrics
from stream.rate_limit import RateLimiter
from stream.scores import RiskScore, ScoreStore
from tests.conftest import cluster_env, free_ports

runner = CliRunner()

# What the reader may do in Redis: read the keys of scores, the ranking and metrics by name.
READER_RULES = [
    "resetkeys",
    "~m3t:score:*",
    "~m3t:score-history:*",
    "~m3t:risk:*",
    "~m3t:metrics:*",
    "~m3t:alert:*",
    "resetchannels",
    "-@all",
    *(
        f"+{c}"
        for c in "get hget hgetall hmget zrevrange zrevrangebyscore zrange zscore zcard "
        "xrevrange xrange mget exists type ttl ping".split()
    ),
]


def own_state(settings: Settings, tmp_path, **api) -> Settings:
    """The session's Redis and Kafka, with a state folder of this test's own (its token store
    and audit log); the logins of the session (the Redis reader, the Kafka producer that
    ``POST /fhir`` uses) and its CA are given as settings."""
    _, password = login(settings, "redis", "reader")
    given = settings.redis.model_copy(update={"reader_password": SecretStr(password)})
    _, producer = login(settings, "kafka", "producer")
    kafka = settings.kafka.model_copy(
        update={"producer_password": SecretStr(producer), "ca_file": tls.ca_file(settings)}
    )
    return settings.model_copy(
        update={
            "state_dir": tmp_path / "state",
            "redis": given,
            "kafka": kafka,
            "api": settings.api.model_copy(update=api),
        }
    )


def environment(settings: Settings, **extra: str) -> dict[str, str]:
    """M3T_* variables that give a CLI these settings."""
    return {
        "M3T_STATE_DIR": str(settings.state_dir),
        "M3T_REDIS__PORT": str(settings.redis.port),
        "M3T_REDIS__READER_USERNAME": settings.redis.reader_username,
        "M3T_REDIS__READER_PASSWORD": settings.redis.reader_password.get_secret_value(),
        **(cluster_env(settings) if settings.cluster else {}),
        **extra,
    }


def invoke(settings: Settings, *args: str):
    """``m3t ARGS`` in this process, with these settings."""
    get_settings.cache_clear()
    try:
        return runner.invoke(cli, list(args), env=environment(settings))
    finally:
        get_settings.cache_clear()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_tokens_are_named_with_a_role_and_kept_only_as_a_hash(tmp_path):
    cfg = Settings(state_dir=tmp_path / "state")
    added = invoke(cfg, "api", "token", "add", "ward-7", "--role", "reader")
    assert added.exit_code == 0, added.output
    assert "shown only this once" in added.stderr
    token = added.stdout.strip()
    scraper = invoke(cfg, "api", "token", "add", "prom", "--role", "metrics").stdout.strip()
    store = TokenStore(cfg)
    assert len(token) >= 43  # 256 random bits, URL-safe base64
    assert store.find(token).name == "ward-7" and store.find(token).role == "reader"
    assert store.find(scraper).role == "metrics"
    assert store.find(token + "x") is None and store.find("") is None
    for refused in (
        ["ward-7", "--role", "reader"],  # a name is taken once
        ["x", "--role", "admin"],
        ["development", "--role", "reader"],
        ["a b", "--role", "reader"],
    ):
        assert invoke(cfg, "api", "token", "add", *refused).exit_code != 0
    listed = invoke(cfg, "api", "token", "list", "--json").stdout
    assert [(t["name"], t["role"], t["development"]) for t in json.loads(listed)] == [
        ("prom", "metrics", False),
        ("ward-7", "reader", False),
    ]
    digest = store.find(token).sha256
    for shown in (listed, invoke(cfg, "api", "token", "list").stdout):
        assert token not in shown and digest not in shown and "ward-7" in shown
    text = store.path.read_text()
    assert token not in text and scraper not in text and digest in text
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert invoke(cfg, "api", "token", "revoke", "ward-7").exit_code == 0
    assert store.find(token) is None
    assert invoke(cfg, "api", "token", "revoke", "ward-7").exit_code != 0
    # The development token: the generated file's, a reader, flagged; revoked with its file.
    development = store.development_token()
    assert store.find(development).development and store.find(development).role == "reader"
    assert store.development_token() == development and len(store.tokens()) == 2
    assert invoke(cfg, "api", "token", "revoke", "development").exit_code == 0
    assert store.development() is None and not secret_file(cfg, API_TOKEN).exists()


def test_the_rate_limiter_refills_at_its_rate():
    now = [1000.0]
    limiter = RateLimiter(60, clock=lambda: now[0])  # one a second, bursts of 60
    assert all(limiter.take("a") is None for _ in range(60))
    assert limiter.take("a") == pytest.approx(1.0)
    assert limiter.take("b") is None  # per key
    now[0] += 0.5
    assert limiter.wait("a") == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.take("a") is None and limiter.take("a") is not None


@pytest.mark.services
def test_tokens_and_roles_are_enforced(settings, tmp_path, redis_client, scores_restored):
    cfg = own_state(settings, tmp_path)
    ScoreStore(redis_client).write_batch(
        [RiskScore.predicted(72_000_001, 3.0, 0.4, "m:1", 1.0, 2.0)]
    )
    store = TokenStore(cfg)
    reader, scraper = store.add("ward", "reader"), store.add("prometheus", "metrics")
    with serving(cfg) as url, httpx.Client(base_url=url, timeout=10) as api:
        assert api.get("/healthz").json() == {"status": "ok"}  # the only open endpoint
        paths = ("/admissions/72000001/risk", "/risk/top", "/alerts", "/metrics", "/openapi.json")
        for path in paths:
            missing = api.get(path)
            assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
            assert api.get(path, headers=bearer("not-a-token")).status_code == 401
        for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            assert api.get(path).status_code == 404
            assert api.get(path, headers=bearer(reader)).status_code == 404
        document = api.get("/openapi.json", headers=bearer(scraper))
        assert document.status_code == 200 and "/risk/top" in document.json()["paths"]
        assert api.get("/openapi.json", headers=bearer(reader)).status_code == 200

        score = api.get("/admissions/72000001/risk", headers=bearer(reader))
        assert score.status_code == 200 and score.json()["mortality_prob"] == 0.4
        assert score.json()["los_remaining_days"] == 3.0
        assert score.json()["expected_discharge"] == 1.0 + 3.0 * 86400  # feature time + stay
        for path in ("/admissions/72000001/risk", "/risk/top", "/alerts"):
            assert api.get(path, headers=bearer(scraper)).status_code == 403
        assert api.get("/metrics", headers=bearer(reader)).status_code == 403
        metrics = api.get("/metrics", headers=bearer(scraper))
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")

        # Revoked by another process while the API runs: refused from the next request on.
        revoke = invoke(cfg, "api", "token", "revoke", "ward")
        assert revoke.exit_code == 0, revoke.output
        assert api.get("/admissions/72000001/risk", headers=bearer(reader)).status_code == 401
        new = bearer(
            invoke(cfg, "api", "token", "add", "ward-2", "--role", "reader").stdout.strip()
        )
        assert api.get("/admissions/72000001/risk", headers=new).status_code == 200


def publish_card(repo, version: int) -> None:
    """A model card as `m3t export publish` writes it into m3t_lm's version folder."""
    from trainer.model_card import build_card, card_bytes

    folder = repo / "m3t_lm" / str(version)
    folder.mkdir(parents=True)
    card = {**build_card(repo, {"epoch": version}, "m3t_lm"), "version": version}
    for name, data in card_bytes(card).items():
        (folder / name).write_bytes(data)


@pytest.mark.services
def test_the_model_card_is_served_to_readers(settings, tmp_path):
    cfg = own_state(settings, tmp_path).model_copy(update={"model_repo": tmp_path / "repo"})
    store = TokenStore(cfg)
    reader, scraper = store.add("ward", "reader"), store.add("prometheus", "metrics")
    with serving(cfg) as url, httpx.Client(base_url=url, timeout=10) as api:
        assert api.get("/model-card", headers=bearer(reader)).status_code == 404  # none yet
        for version in (1, 2):  # the newest version's card is the served model's
            publish_card(cfg.model_repo, version)
        assert api.get("/model-card").status_code == 401
        assert api.get("/model-card", headers=bearer("not-a-token")).status_code == 401
        assert api.get("/model-card", headers=bearer(scraper)).status_code == 403
        card = api.get("/model-card", headers=bearer(reader))
        assert card.status_code == 200 and card.json()["version"] == 2
        assert "Decision support" in card.json()["intended_use"]
        text = api.get("/model-card?format=markdown", headers=bearer(reader))
        assert text.headers["content-type"].startswith("text/markdown")
        assert text.text.startswith("# Model card: m3t_lm version 2")
        assert api.get("/model-card?format=pdf", headers=bearer(reader)).status_code == 422


@pytest.mark.services
def test_each_read_of_a_score_is_one_audit_line(settings, tmp_path, redis_client, scores_restored):
    cfg = own_state(settings, tmp_path)
    # Figures that show up nowhere but in these scores.
    ours = [
        RiskScore.predicted(72_000_011, 7.123456789, 0.987654321, "m:1", 1.0, 2.0),
        RiskScore.predicted(72_000_012, 5.918273645, 0.876543219, "m:1", 1.0, 2.0),
    ]
    ScoreStore(redis_client).write_batch(ours)
    store = TokenStore(cfg)
    reader, scraper = store.add("ward", "reader"), store.add("prometheus", "metrics")
    with serving(cfg) as url, httpx.Client(base_url=url, timeout=10) as api:
        assert api.get("/admissions/72000011/risk", headers=bearer(reader)).status_code == 200
        assert api.get("/admissions/72000019/risk", headers=bearer(reader)).status_code == 404
        top = api.get("/risk/top?n=5", headers=bearer(reader)).json()
        # Refused and unrelated requests read nothing, and leave no line.
        assert api.get("/admissions/72000011/risk", headers=bearer(scraper)).status_code == 403
        assert api.get("/admissions/72000011/risk").status_code == 401
        assert api.get("/risk/top?n=0", headers=bearer(reader)).status_code == 422
        assert api.get("/metrics", headers=bearer(scraper)).status_code == 200
        assert api.get("/healthz").status_code == 200
        metrics = api.get("/metrics", headers=bearer(scraper)).text
    log = cfg.logs_dir / "audit.log"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    times = [line.pop("time") for line in lines]
    assert lines == [
        {
            "token": "ward",
            "role": "reader",
            "endpoint": "/admissions/{hadm_id}/risk",
            "admissions": [72_000_011],
            "status": 200,
        },
        {
            "token": "ward",
            "role": "reader",
            "endpoint": "/admissions/{hadm_id}/risk",
            "admissions": [72_000_019],
            "status": 404,
        },
        {
            "token": "ward",
            "role": "reader",
            "endpoint": "/risk/top",
            "admissions": [row["hadm_id"] for row in top],
            "status": 200,
        },
    ]
    assert all(t.endswith("+00:00") for t in times)  # UTC
    text = log.read_text()
    for s in ours:
        for figure in (s.los_remaining_days, s.expected_discharge, s.mortality_prob):
            assert str(figure) not in text and str(figure)[:6] not in text
    assert reader not in text and scraper not in text
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert "m3t_api_audit_lines_total 3.0" in metrics


@pytest.mark.services
def test_rate_limits_answer_429_then_recover(settings, tmp_path, monkeypatch):
    monkeypatch.setattr(stream.api, "FAILED_AUTHS_PER_MINUTE", 30)
    cfg = own_state(settings, tmp_path, rate_limit_per_minute=60)  # one a second, bursts of 60
    store = TokenStore(cfg)
    busy, other = store.add("busy", "reader"), store.add("other", "reader")
    with serving(cfg) as url, httpx.Client(base_url=url, timeout=10) as api:
        answers = [api.get("/risk/top?n=1", headers=bearer(busy)) for _ in range(70)]
        codes = [a.status_code for a in answers]
        first = codes.index(429)
        assert 60 <= first < 70 and set(codes[:first]) == {200}, codes
        limited = answers[first]
        assert limited.json()["detail"] and 1 <= int(limited.headers["Retry-After"]) <= 2
        assert api.get("/risk/top?n=1", headers=bearer(other)).status_code == 200  # per token
        time.sleep(int(limited.headers["Retry-After"]))
        assert api.get("/risk/top?n=1", headers=bearer(busy)).status_code == 200

        # Failed authentications from one address: 401 up to the limit, then 429 for any
        # request from there, a valid token's too, until the bucket refills.
        failed = [api.get("/risk/top", headers=bearer(f"guess-{i}")).status_code for i in range(40)]
        assert 30 <= failed.index(429) < 40 and set(failed[: failed.index(429)]) == {401}
        locked = api.get("/risk/top?n=1", headers=bearer(other))
        assert locked.status_code == 429 and int(locked.headers["Retry-After"]) >= 1
        time.sleep(int(locked.headers["Retry-After"]))
        assert api.get("/risk/top?n=1", headers=bearer(other)).status_code == 200
        metrics = api.get("/metrics", headers=bearer(store.add("prometheus", "metrics"))).text
    assert f'm3t_api_rate_limited_total{{limit="token"}} {codes.count(429)}.0' in metrics
    address = failed.count(429) + 1
    assert f'm3t_api_rate_limited_total{{limit="address"}} {address}.0' in metrics


@pytest.mark.services
def test_the_ward_pages_hold_to_the_token_limit_and_refuse_forged_or_foreign_requests(
    settings, tmp_path
):
    from stream import ward
    from stream.ward_session import COOKIE

    cfg = own_state(settings, tmp_path, rate_limit_per_minute=6)
    nurse = TokenStore(cfg).add("nurse", "reader")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    with serving(cfg) as url, httpx.Client(base_url=url, timeout=10) as api:
        # Another site's page posting the login or logout form: refused.
        elsewhere = {"Origin": "https://elsewhere.example"}
        assert api.post("/ward/login", data={"token": nurse}, headers=elsewhere).status_code == 403
        assert api.post("/ward/logout", headers=elsewhere).status_code == 403
        hidden = {"Origin": "null"}  # a page with no-referrer hides where it is
        assert api.post("/ward/login", data={"token": nurse}, headers=hidden).status_code == 403
        # A body far past one token is refused before it is read whole.
        huge = b"token=" + b"x" * (ward.MAX_LOGIN_BYTES * 256)
        assert api.post("/ward/login", content=huge, headers=form).status_code == 413
        login = api.post("/ward/login", data={"token": nurse}, headers={"Origin": url})
        assert login.status_code == 303
        cookie = login.cookies[COOKIE]
        # A signature with a character outside ASCII: 401, not a 500.
        name, expires, _ = cookie.rsplit(".", 2)
        forged = {"Cookie": f"{COOKIE}={name}.{expires}.sig\u00e9".encode("latin-1")}
        assert api.get("/ward/data/rows", headers=forged).status_code == 401
        # The ward's data count against the token's limit, as the API's routes do.
        session = {"Cookie": f"{COOKIE}={cookie}"}
        codes = [api.get("/ward/data/rows", headers=session).status_code for _ in range(9)]
        assert codes[:6] == [200] * 6 and set(codes[6:]) == {429}, codes
        assert api.get("/risk/top?n=1", headers=bearer(nurse)).status_code == 429  # one bucket


@pytest.mark.services
def test_a_token_opens_a_bounded_number_of_live_views(settings, tmp_path, monkeypatch):
    from stream import ward
    from stream.ward_session import COOKIE

    monkeypatch.setattr(ward, "MAX_STREAMS", 2)
    cfg = own_state(settings, tmp_path)
    nurse = TokenStore(cfg).add("nurse", "reader")
    with serving(cfg) as url, httpx.Client(base_url=url, timeout=10) as api:
        cookie = api.post("/ward/login", data={"token": nurse}).cookies[COOKIE]
        session = {"Cookie": f"{COOKIE}={cookie}"}
        with (
            api.stream("GET", "/ward/events", headers=session) as one,
            api.stream("GET", "/ward/events", headers=session) as two,
        ):
            assert one.status_code == two.status_code == 200
            running = [one.iter_lines(), two.iter_lines()]  # held: a dropped one closes
            assert [next(lines) for lines in running] == ["event: rows"] * 2
            assert api.get("/ward/events", headers=session).status_code == 429
        # Closed, they free their places.
        assert wait_until(lambda: _opens(api, session), 10)


def _opens(api: httpx.Client, session: dict) -> bool:
    with api.stream("GET", "/ward/events", headers=session) as view:
        return view.status_code == 200


@pytest.mark.services
def test_listening_beyond_loopback_needs_tls_and_no_development_token(
    settings, tmp_path, redis_client
):
    cfg = own_state(settings, tmp_path)
    store = TokenStore(cfg)
    store.development_token()
    cert, key = server_certificate(cfg, "api", ["127.0.0.1", "localhost"])
    tls = {"M3T_API__TLS_CERTFILE": str(cert), "M3T_API__TLS_KEYFILE": str(key)}
    (port,) = free_ports(1)
    command = [sys.executable, "-m", "app.cli", "stream", "api", "--host", "0.0.0.0"]
    command += ["--port", str(port)]

    def refused(env: dict[str, str]) -> str:
        # A start that was not refused would serve: the timeout fails the test then.
        run = subprocess.run(
            command, env={**os.environ, **env}, capture_output=True, text=True, timeout=60
        )
        assert run.returncode != 0, run.stdout
        assert "will not listen on 0.0.0.0" in run.stderr
        return run.stderr

    both = refused(environment(cfg))
    assert "plain HTTP" in both and "development token" in both
    with_tls = refused(environment(cfg, **tls))
    assert "development token" in with_tls and "plain HTTP" not in with_tls
    store.revoke("development")
    without_tls = refused(environment(cfg))
    assert "plain HTTP" in without_tls and "development token" not in without_tls

    # With TLS and no development token it serves, over HTTPS only.
    reader = store.add("ward", "reader")
    server = subprocess.Popen(
        command,
        env={**os.environ, **environment(cfg, **tls)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    trusted = ssl.create_default_context(cafile=str(ca_file(cfg)))
    https = httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=trusted, timeout=10)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read().decode()
            try:
                health = https.get("/healthz")
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "the API did not start listening in 60 s"
                time.sleep(0.2)
        assert health.json() == {"status": "ok"}
        assert https.get("/risk/top?n=1", headers=bearer(reader)).status_code == 200
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"https://127.0.0.1:{port}/healthz", timeout=10)  # the system's CAs
    finally:
        https.close()
        server.terminate()
        server.wait(30)


@pytest.mark.services
def test_the_api_and_the_score_commands_need_no_more_than_the_narrowed_reader(
    settings, tmp_path, redis_client, scores_restored
):
    """As a Redis user that may read only the scores', ranking's and metrics' keys by name,
    with no SCAN, KEYS or connection commands but PING."""
    user, password = f"m3t-reader-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    # A Redis Cluster keeps users per node: each is told, with the rules its clients need.
    nodes, rules = {}, READER_RULES
    if is_cluster(redis_client):
        nodes, rules = {"target_nodes": redis_client.ALL_NODES}, READER_RULES + CLIENT_RULES.split()
    redis_client.execute_command("ACL", "SETUSER", user, "on", f">{password}", *rules, **nodes)
    narrowed = own_state(settings, tmp_path)
    given = narrowed.redis.model_copy(
        update={"reader_username": user, "reader_password": SecretStr(password)}
    )
    cfg = narrowed.model_copy(update={"redis": given})
    ScoreStore(redis_client).write_batch(
        [RiskScore.predicted(72_000_021, 3.0, 0.5, "m:1", 1.0, 2.0)]
    )
    WorkerMetrics(redis_client, "narrow-test").flush({name: 1 for name in COUNTERS})
    store = TokenStore(cfg)
    reader, scraper = store.add("ward", "reader"), store.add("prometheus", "metrics")
    try:
        with serving(cfg) as url, httpx.Client(base_url=url, timeout=10) as api:
            assert api.get("/healthz").status_code == 200
            assert api.get("/admissions/72000021/risk", headers=bearer(reader)).status_code == 200
            assert api.get("/admissions/72000029/risk", headers=bearer(reader)).status_code == 404
            assert api.get("/risk/top?n=1000", headers=bearer(reader)).status_code == 200
            assert api.get("/alerts", headers=bearer(reader)).status_code == 200
            metrics = api.get("/metrics", headers=bearer(scraper))
            assert metrics.status_code == 200
            assert 'm3t_events_total{worker="narrow-test"} 1.0' in metrics.text
        got = invoke(cfg, "scores", "get", "72000021", "--json")
        assert got.exit_code == 0, got.output
        assert json.loads(got.stdout)["mortality_prob"] == 0.5
        top = invoke(cfg, "scores", "top", "--n", "1000", "--json")
        assert top.exit_code == 0 and 72_000_021 in [s["hadm_id"] for s in json.loads(top.stdout)]
        watched = invoke(cfg, "scores", "watch", "--n", "1000", "--count", "1", "--interval", "0")
        assert watched.exit_code == 0 and "72000021" in watched.stdout
        # The user really is that narrow: a scan, or a key outside its patterns, is refused.
        from m3t.clients import redis_client as connect

        narrow = connect(cfg, role="reader")
        for refused in (lambda: narrow.scan(0), lambda: narrow.get("m3t:features:1")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                refused()
        narrow.close()
    finally:
        redis_client.execute_command("ACL", "DELUSER", user, **nodes)
        redis_client.hdel(METRICS_KEY, "narrow-test")


@pytest.mark.services
def test_worker_metrics_are_one_hash_whose_stale_fields_go(redis_client):
    stale = json.dumps({"updated": time.time() - STALE_AFTER_S - 5, "counters": {}})
    redis_client.hset(METRICS_KEY, mapping={"dead-worker": stale, "garbled": "{not json"})
    try:
        from prometheus_client import CollectorRegistry, generate_latest

        from stream.metrics import RedisWorkerCollector

        registry = CollectorRegistry()
        registry.register(RedisWorkerCollector(redis_client))
        assert "dead-worker" not in generate_latest(registry).decode()  # ignored by the reader
        WorkerMetrics(redis_client, "live-a").flush({name: 2 for name in COUNTERS})
        WorkerMetrics(redis_client, "live-b").flush({name: 3 for name in COUNTERS})
        fields = redis_client.hgetall(METRICS_KEY)
        assert {b"live-a", b"live-b"} <= set(fields)
        assert b"dead-worker" not in fields and b"garbled" not in fields  # removed by a writer
        assert 0 < redis_client.ttl(METRICS_KEY) <= STALE_AFTER_S
        text = generate_latest(registry).decode()
        assert 'm3t_events_total{worker="live-a"} 2.0' in text
        assert 'm3t_scored_total{worker="live-b"} 3.0' in text
    finally:
        redis_client.hdel(METRICS_KEY, "dead-worker", "garbled", "live-a", "live-b")


@pytest.mark.services
def test_the_openapi_document_is_true(
    settings, tmp_path, redis_client, scores_restored, monkeypatch
):
    """Each endpoint's statuses and schemas, as schemathesis's every check finds them."""
    # Schemathesis sends hundreds of requests and probes without a token: no 429 here.
    monkeypatch.setattr(stream.api, "FAILED_AUTHS_PER_MINUTE", 1_000_000)
    cfg = own_state(settings, tmp_path, rate_limit_per_minute=1_000_000)
    cfg = cfg.model_copy(update={"model_repo": tmp_path / "repo"})
    publish_card(cfg.model_repo, 1)
    ScoreStore(redis_client).write_batch(
        [RiskScore.predicted(hadm, 3.0, 0.1, "m:1", 1.0, 2.0) for hadm in range(1, 6)]
    )
    store = TokenStore(cfg)
    tokens = {role: store.add(role, role) for role in ("reader", "metrics", "ingest")}
    with serving(cfg) as url, httpx.Client(base_url=url, timeout=10) as api:
        document = api.get("/openapi.json", headers=bearer(tokens["reader"])).json()
        assert document["components"]["securitySchemes"] == {
            "bearerToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "A token from `m3t api token add NAME --role "
                "reader|metrics|ingest`.",
            }
        }
        statuses = {
            (method, path): sorted(op["responses"])
            for path, operation in document["paths"].items()
            for method, op in operation.items()
        }
        fhir = ["200", "400", "401", "403", "413", "415", "422", "429", "503"]
        assert statuses == {
            ("get", "/healthz"): ["200", "503"],
            ("get", "/admissions/{hadm_id}/risk"): [
                "200",
                "401",
                "403",
                "404",
                "422",
                "429",
                "503",
            ],
            ("get", "/risk/top"): ["200", "401", "403", "422", "429", "503"],
            ("get", "/alerts"): ["200", "401", "403", "429", "503"],
            ("get", "/metrics"): ["200", "401", "403", "429", "503"],
            ("get", "/model-card"): ["200", "401", "403", "404", "422", "429"],
            ("get", "/openapi.json"): ["200", "401", "429"],
            ("post", "/fhir"): fhir,
            ("post", "/fhir/subscription"): fhir,
        }
        assert list(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == [
            "text/plain"
        ]
        assert all(
            op.get("security") == [{"bearerToken": []}]
            for path, operation in document["paths"].items()
            for op in operation.values()
            if path != "/healthz"
        )
        schema = tmp_path / "openapi.json"
        schema.write_text(json.dumps(document))
        config = tmp_path / "schemathesis.toml"
        config.write_text('[auth.openapi.bearerToken]\nbearer = "${M3T_API_TEST_TOKEN}"\n')
        # The reader's endpoints with a reader's token, /metrics with a metrics token, the
        # FHIR door with an ingest token: a schema-valid Bundle may still be refused (its
        # entries are FHIR's, which JSON Schema does not say), so not every one is accepted.
        for role, scope, paths, *checks in (
            ("reader", "--exclude-path-regex", "^/(metrics|fhir)"),
            ("metrics", "--include-path", "/metrics"),
            (
                "ingest",
                "--include-path-regex",
                "^/fhir",
                "--exclude-checks",
                "positive_data_acceptance",
            ),
        ):
            run = subprocess.run(
                [
                    *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(config)),
                    *("run", str(schema), "--url", url, "--checks", "all"),
                    *(scope, paths, *checks, "--generation-database", "none", "--no-color"),
                ],
                env={**os.environ, "M3T_API_TEST_TOKEN": tokens[role]},
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
            # The FHIR door refuses most generated Bundles, which schemathesis warns of.
            expected = "mostly rejected generated data" if role == "ingest" else "No issues found"
            assert expected in run.stdout, run.stdout[-6000:]
