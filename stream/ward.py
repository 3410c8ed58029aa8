"""The ward pages served by the API: ``/ward``, current inpatients ranked by mortality risk and
updated live, and ``/ward/patient/{hadm_id}``, one admission's score history and reasons.

A person logs in by posting an API token (a ``reader``'s) to ``/ward/login`` and gets a signed
session cookie (``stream.ward_session``): HttpOnly, SameSite=Strict, Secure when the API
serves TLS, expiring after ``api.session_ttl_s``. Pages without a session redirect to the
login form; their data (``/ward/data/...``, ``/ward/events``) answer 401, and count against
the session's token's rate limit as the API's routes do (an event stream once, when it
opens; ``MAX_STREAMS`` at once per token). Login and logout refuse another site's form (an
``Origin`` that is not this host), and a login body over ``MAX_LOGIN_BYTES``.

The live view is a server-sent event stream: every ``api.ward_poll_s`` it reads the ranking
and the score hashes (``stream.scores``) and the active alerts (``stream.alerts.AlertStore``,
as ``GET /alerts`` reads them: silent rules' alerts are never shown) with the API's
read-only Redis user, and sends the rows and alerts when any changed. The optional score
fields of later writers (``ward``, ``reasons``, ``freshness``, ``previous_mortality_prob``)
are shown when present. The pages' scripts, styles and markup are this package's ``static/``
files: no framework, no CDN, charts drawn as inline SVG, and a Content-Security-Policy that
allows nothing from elsewhere.
"""

from __future__ import annotations

import asyncio
import html
import json
import time
from collections.abc import Callable
from importlib import resources
from urllib.parse import parse_qs, urlsplit

import redis
from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)

from m3t.settings import Settings
from stream.alerts import AlertStore
from stream.api_tokens import ApiToken, TokenStore
from stream.rate_limit import RateLimiter, retry_after
from stream.scores import HISTORY_KEY, SCORE_KEY, ScoreStore
from stream.ward_session import COOKIE, Session, Sessions

STATIC = resources.files("stream") / "static"
ASSETS = {"ward.js": "text/javascript", "patient.js": "text/javascript", "ward.css": "text/css"}
SPARK_POINTS = 24  # scores per row's sparkline
PATIENT_POINTS = 200  # scores on a patient's chart
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream
MAX_HADM_ID = 2**63 - 1
MAX_LOGIN_BYTES = 4096  # a login form holds one token
MAX_STREAMS = 8  # live views open at once per token: a few tabs, not a flood of pollers
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # nothing to other sites; our forms carry their Origin
    "Cache-Control": "no-store",
}

# (token, endpoint, admissions, status): the API's audit line for a read of scores.
AuditRead = Callable[[ApiToken, str, list[int], int], None]


def _number(text: str | None) -> float | None:
    try:
        return None if text in (None, "") else float(text)
    except ValueError:
        return None


def _json(text: str | None, kind: type) -> object | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, kind) else None


def row_from_fields(hadm_id: int, raw: dict[bytes, bytes]) -> dict | None:
    """A score hash (or history entry) as the pages show it; None without a score."""
    f = {k.decode(): v.decode() for k, v in raw.items()}
    if "mortality_prob" not in f or "los_remaining_days" not in f:
        return None
    reasons = _json(f.get("reasons"), list)
    return {
        "hadm_id": hadm_id,
        "mortality_prob": _number(f["mortality_prob"]),
        "los_remaining_days": _number(f["los_remaining_days"]),
        "expected_discharge": _number(f.get("expected_discharge")),
        "feature_time": _number(f.get("feature_time")),
        "scored_at": _number(f.get("scored_at")),
        "model": f.get("model", ""),
        "ward": f.get("ward", ""),
        "previous_mortality_prob": _number(f.get("previous_mortality_prob")),
        "reasons": reasons[:5] if reasons is not None else None,
        "freshness": _json(f.get("freshness"), dict),
    }


class WardReader:
    """The pages' reads of scores, with the API's read-only Redis client (names only)."""

    def __init__(self, client: redis.Redis):
        self.client = client

    def ranked(self, n: int) -> list[dict]:
        """The top ``n`` current inpatients by mortality risk, highest first."""
        rows = (row_from_fields(h, fields) for h, fields in ScoreStore(self.client).top_fields(n))
        return [r for r in rows if r is not None]

    def sparklines(self, hadm_ids: list[int]) -> dict[int, list[float]]:
        """Each admission's latest mortality risks, oldest first."""
        with self.client.pipeline(transaction=False) as pipe:
            for hadm_id in hadm_ids:
                pipe.xrevrange(HISTORY_KEY.format(hadm_id=hadm_id), count=SPARK_POINTS)
            found = pipe.execute()
        return {
            h: [float(f[b"mortality_prob"]) for _, f in reversed(entries)]
            for h, entries in zip(hadm_ids, found)
        }

    def patient(self, hadm_id: int) -> tuple[dict | None, list[dict]]:
        """The current score and the history, oldest first (each entry as a row)."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(SCORE_KEY.format(hadm_id=hadm_id))
            pipe.xrevrange(HISTORY_KEY.format(hadm_id=hadm_id), count=PATIENT_POINTS)
            current, entries = pipe.execute()
        history = [row_from_fields(hadm_id, fields) for _, fields in reversed(entries)]
        return row_from_fields(hadm_id, current), [h for h in history if h is not None]


def _page(name: str, **values: str) -> str:
    text = (STATIC / name).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", html.escape(value))
    return text


def _html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers=SECURITY_HEADERS)


def ward_router(
    settings: Settings,
    client: redis.Redis,
    tokens: TokenStore,
    audit_read: AuditRead,
    per_address: RateLimiter,
    spend: Callable[[ApiToken], None],
) -> APIRouter:
    """The ward pages' routes (left out of the OpenAPI document: pages, not an API).
    ``spend`` takes one of a token's requests from its rate limit (the API's) or raises 429."""
    sessions = Sessions(settings, tokens)
    streams: dict[str, int] = {}  # token name: live views open
    reader = WardReader(client)
    alert_store = AlertStore(client)
    secure = bool(settings.api.tls_certfile and settings.api.tls_keyfile)
    poll_s = settings.api.ward_poll_s
    router = APIRouter(prefix="/ward", include_in_schema=False)

    def session_of(request: Request) -> Session | None:
        return sessions.check(request.cookies.get(COOKIE))

    def required(request: Request) -> Session:
        session = session_of(request)
        if session is None:
            raise HTTPException(401, "log in at /ward/login")
        spend(session.token)
        return session

    def same_site(request: Request) -> None:
        """Another site's page may post a form here, never with this host as its Origin
        (a page that hides its origin sends "null")."""
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            raise HTTPException(403, "a form from another site")

    async def form_of(request: Request) -> dict[str, list[str]]:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BYTES:
                raise HTTPException(413, "a login form is one token")
        return parse_qs(body.decode(errors="replace"))

    def to_login() -> RedirectResponse:
        return RedirectResponse("/ward/login", status_code=303)

    @router.get("/login")
    def login_form():
        return _html(_page("login.html", error=""))

    @router.post("/login")
    async def login(request: Request):
        same_site(request)
        address = request.client.host if request.client else "unknown"
        wait = per_address.wait(address)
        if wait is not None:
            raise HTTPException(
                429, "too many failed logins", headers={"Retry-After": retry_after(wait)}
            )
        form = await form_of(request)
        token = tokens.find(form.get("token", [""])[0].strip())
        if token is None:
            per_address.take(address)
            return _html(_page("login.html", error="Not a valid token."), 401)
        if token.role != "reader":
            return _html(_page("login.html", error=f"A {token.role} token cannot log in."), 403)
        response = RedirectResponse("/ward", status_code=303)
        response.set_cookie(
            COOKIE,
            sessions.issue(token),
            max_age=sessions.ttl_s,
            path="/ward",
            secure=secure,
            httponly=True,
            samesite="strict",
        )
        return response

    @router.post("/logout")
    def logout(request: Request):
        same_site(request)
        response = to_login()
        response.delete_cookie(COOKIE, path="/ward", secure=secure, httponly=True)
        return response

    @router.get("")
    def ward_page(request: Request):
        return to_login() if session_of(request) is None else _html(_page("ward.html"))

    @router.get("/patient/{hadm_id}")
    def patient_page(request: Request, hadm_id: int = Path(ge=0, le=MAX_HADM_ID)):
        if session_of(request) is None:
            return to_login()
        return _html(_page("patient.html", hadm_id=str(hadm_id)))

    @router.get("/static/{name}")
    def asset(name: str):
        if name not in ASSETS:
            raise HTTPException(404, "no such file")
        headers = {**SECURITY_HEADERS, "Cache-Control": "max-age=300"}
        return Response((STATIC / name).read_bytes(), media_type=ASSETS[name], headers=headers)

    def snapshot(n: int, ward: str, sparks: dict[int, tuple]) -> dict:
        """The ranked rows (of ``ward``, if given) with their sparklines and active alerts,
        the active alerts (of ``ward``), and every ward seen; ``sparks`` caches each
        admission's (scored_at, sparkline) between reads."""
        rows = reader.ranked(n)
        active = alert_store.active()
        alerted = {a["hadm_id"]: a for a in active}
        stale = [
            r["hadm_id"] for r in rows if sparks.get(r["hadm_id"], (None,))[0] != r["scored_at"]
        ]
        if stale:
            read = reader.sparklines(stale)
            by_id = {r["hadm_id"]: r for r in rows}
            sparks.update({h: (by_id[h]["scored_at"], points) for h, points in read.items()})
        shown = [r for r in rows if not ward or r["ward"] == ward]
        for r in shown:
            r["sparkline"] = sparks[r["hadm_id"]][1]
            alert = alerted.get(r["hadm_id"])
            r["alert"] = alert and {k: alert[k] for k in ("raised_at", "criteria", "ward")}
        return {
            "rows": shown,
            "alerts": [a for a in active if not ward or a["ward"] == ward],
            "wards": sorted({r["ward"] for r in rows if r["ward"]}),
        }

    def audited(data: dict) -> list[int]:
        """The admissions a snapshot shows: its rows' and its alerts'."""
        ids = [r["hadm_id"] for r in data["rows"]] + [a["hadm_id"] for a in data["alerts"]]
        return list(dict.fromkeys(ids))

    @router.get("/data/rows")
    def rows(
        request: Request, n: int = Query(100, ge=1, le=1000), ward: str = Query("", max_length=64)
    ):
        session = required(request)
        data = snapshot(n, ward, {})
        audit_read(session.token, "/ward/data/rows", audited(data), 200)
        return JSONResponse(data, headers=SECURITY_HEADERS)

    @router.get("/data/patient/{hadm_id}")
    def patient(request: Request, hadm_id: int = Path(ge=0, le=MAX_HADM_ID)):
        session = required(request)
        current, history = reader.patient(hadm_id)
        status = 404 if current is None else 200
        audit_read(session.token, "/ward/data/patient/{hadm_id}", [hadm_id], status)
        if current is None:
            raise HTTPException(404, "no current score for this admission")
        data = {"score": current, "history": history, "alert": alert_store.latest(hadm_id)}
        return JSONResponse(data, headers=SECURITY_HEADERS)

    @router.get("/events")
    async def events(
        request: Request, n: int = Query(100, ge=1, le=1000), ward: str = Query("", max_length=64)
    ):
        name = required(request).token.name
        if streams.get(name, 0) >= MAX_STREAMS:
            raise HTTPException(429, f"at most {MAX_STREAMS} live views at once")
        cookie = request.cookies.get(COOKIE)

        async def stream():  # counted once it runs: a stream never started holds no place
            streams[name] = streams.get(name, 0) + 1
            try:
                async for part in views():
                    yield part
            finally:
                streams[name] -= 1

        async def views():
            sparks: dict[int, tuple] = {}
            sent: dict[int, object] = {}  # admission -> (scored_at, alert raise) last sent
            last, quiet_since = None, time.monotonic()
            while not await request.is_disconnected():
                session = sessions.check(cookie)
                if session is None:
                    yield "event: expired\ndata: {}\n\n"
                    return
                data = await asyncio.to_thread(snapshot, n, ward, sparks)
                payload = json.dumps(data, separators=(",", ":"))
                if payload != last:
                    raises = {a["hadm_id"]: a["raised_at"] for a in data["alerts"]}
                    shown = {h: (None, raises.get(h)) for h in raises}
                    shown |= {
                        r["hadm_id"]: (r["scored_at"], raises.get(r["hadm_id"]))
                        for r in data["rows"]
                    }
                    changed = [h for h, at in shown.items() if sent.get(h) != at]
                    audit_read(session.token, "/ward/events", changed, 200)
                    last, sent, quiet_since = payload, shown, time.monotonic()
                    yield f"event: rows\ndata: {payload}\n\n"
                elif time.monotonic() - quiet_since > KEEPALIVE_S:
                    quiet_since = time.monotonic()
                    yield ": keepalive\n\n"
                await asyncio.sleep(poll_s)

        headers = {**SECURITY_HEADERS, "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    return router
