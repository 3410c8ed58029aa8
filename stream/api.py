"""The HTTP query API: current risk per admission, the top-risk list, active alerts
(``stream.alerts_api``), the model card, health and metrics; and the FHIR door
(``stream.fhir_api``: ``POST /fhir``, for ``ingest`` tokens).

Risk scores are patient data. Every endpoint but ``/healthz`` needs a bearer token from the
token store (``stream.api_tokens``) whose role the endpoint serves: ``reader`` for scores,
``metrics`` for ``/metrics``; ``/model-card`` (the served model's card, JSON or markdown)
is a reader's too; any token may read ``/openapi.json`` (no ``/docs``). Each read
of a score is a line in the audit log (``stream.audit``). A token may make
``settings.api.rate_limit_per_minute`` requests a minute, and a client address
``FAILED_AUTHS_PER_MINUTE`` failed authentications; past either the answer is 429 with
``Retry-After``. The API logs in to Redis as the ``reader`` role, which reads scores and
metrics keys by name only (no SCAN or KEYS). The ward pages (``stream.ward``) are served
beside it, behind a login session.
"""

from __future__ import annotations

import ipaddress
import json
from contextlib import asynccontextmanager
from typing import Any, Literal

import redis
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import BaseModel

from m3t.clients import redis_client
from m3t.settings import Settings
from stream import fhir_api
from stream.alerts import AlertStore
from stream.alerts_api import alerts_router
from stream.api_tokens import ApiRole, ApiToken, TokenStore
from stream.audit import AuditLog
from stream.metrics import RedisWorkerCollector, RiskCollector
from stream.rate_limit import RateLimiter, retry_after
from stream.scores import RiskScore, ScoreStore
from stream.ward import ward_router
from trainer.model_card import CARD_JSON, CARD_MD, find_card

FAILED_AUTHS_PER_MINUTE = 30
MAX_HADM_ID = 2**63 - 1  # the event contract's bound


class Problem(BaseModel):
    """Why a request was not answered."""

    detail: str


class Health(BaseModel):
    status: str


def _problem(description: str, headers: dict[str, str] | None = None) -> dict:
    # The schema inline, not as a "model": FastAPI would file a model's under the route's own
    # media type, text/plain for /metrics, where errors are JSON all the same.
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": Problem.model_json_schema()}},
    }
    if headers:
        response["headers"] = {
            name: {"description": text, "required": True, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return response


UNAUTHENTICATED = {
    401: _problem(
        "No bearer token, or not a valid one",
        {"WWW-Authenticate": "the scheme to authenticate with (Bearer)"},
    )
}
FORBIDDEN = {403: _problem("The token's role may not use this endpoint")}
RATE_LIMITED = {
    429: _problem(
        "Too many requests for this token, or failed authentications from this address",
        {"Retry-After": "seconds to wait before the next request"},
    )
}
UNAVAILABLE = {503: _problem("Redis is unavailable")}
NOT_FOUND = {404: _problem("No current score for this admission")}
NO_CARD = {404: _problem("No model card published for the served model")}
MODEL_CARD = {
    200: {
        "description": "The model card of the served version (`m3t export publish` writes it)",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/markdown": {"schema": {"type": "string"}},
        },
    }
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def bind_refusals(settings: Settings, host: str) -> list[str]:
    """Why the API must not listen on ``host`` (empty: it may): beyond loopback it needs TLS
    and no development token."""
    if is_loopback(host):
        return []
    refusals = []
    if not (settings.api.tls_certfile and settings.api.tls_keyfile):
        refusals.append("it serves plain HTTP: set M3T_API__TLS_CERTFILE and M3T_API__TLS_KEYFILE")
    if TokenStore(settings).development() is not None:
        refusals.append(
            "the development token is registered: `m3t api token revoke development`, "
            "then `m3t api token add NAME --role reader` for each client"
        )
    return refusals


class ApiCounters:
    """The API's own figures for /metrics; labels never carry a token or an admission."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "m3t_api_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=registry,
        )
        self.audit_lines = Counter(
            "m3t_api_audit_lines", "lines written to the audit log", registry=registry
        )
        self.refusals = Counter(
            "m3t_api_refusals",
            "requests refused: unauthenticated (401) or forbidden for the token's role (403)",
            ["reason"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "m3t_api_rate_limited",
            "requests answered 429, by the limit they met (token or address)",
            ["limit"],
            registry=registry,
        )


def create_app(settings: Settings) -> FastAPI:
    client = redis_client(settings, role="reader")
    store = ScoreStore(client)
    tokens = TokenStore(settings)
    audit = AuditLog(settings.logs_dir / "audit.log")
    per_token = RateLimiter(settings.api.rate_limit_per_minute)
    # A feed posts as often as its hospital emits, far more than a person reads.
    per_feed = RateLimiter(settings.api.ingest_rate_limit_per_minute)
    per_address = RateLimiter(FAILED_AUTHS_PER_MINUTE)
    registry = CollectorRegistry()
    registry.register(RedisWorkerCollector(client))
    registry.register(RiskCollector(client))
    counters = ApiCounters(registry)
    bearer = HTTPBearer(
        auto_error=False,
        scheme_name="bearerToken",
        description="A token from `m3t api token add NAME --role reader|metrics|ingest`.",
    )

    def too_many(limit: str, wait: float) -> HTTPException:
        counters.rate_limited.labels(limit).inc()
        return HTTPException(
            429, f"too many requests ({limit})", headers={"Retry-After": retry_after(wait)}
        )

    def spend(token: ApiToken) -> None:
        """One of ``token``'s requests, or 429 past its rate limit."""
        wait = (per_feed if token.role == "ingest" else per_token).take(token.name)
        if wait is not None:
            raise too_many("token", wait)

    def caller(role: ApiRole | None):
        """A dependency giving the request's token, if it is valid, within its rate limit and
        of ``role`` (None: any role)."""

        def authorized(
            request: Request,
            credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
        ) -> ApiToken:
            address = request.client.host if request.client else "unknown"
            wait = per_address.wait(address)
            if wait is not None:
                raise too_many("address", wait)
            token = tokens.find(credentials.credentials) if credentials else None
            if token is None:
                per_address.take(address)
                counters.refusals.labels("unauthenticated").inc()
                raise HTTPException(
                    401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
                )
            spend(token)
            if role is not None and token.role != role:
                counters.refusals.labels("forbidden").inc()
                raise HTTPException(403, f"a {token.role} token may not use this endpoint")
            return token

        return authorized

    def read(token: ApiToken, endpoint: str, admissions: list[int], status: int) -> None:
        audit.read(token.name, token.role, endpoint, admissions, status)
        counters.audit_lines.inc()

    fhir_routes, close_fhir = fhir_api.routes(settings, caller)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        audit.close()
        client.close()
        close_fhir()

    app = FastAPI(
        title="m3t-stream risk API",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, behind a token
        lifespan=lifespan,
    )

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            counters.requests.labels(getattr(route, "path", "unmatched"), str(status)).inc()

    @app.exception_handler(redis.exceptions.ConnectionError)
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def redis_unavailable(request: Request, exc: Exception):
        return JSONResponse({"detail": "redis unavailable"}, status_code=503)

    @app.get("/healthz", response_model=Health, responses=UNAVAILABLE)
    def healthz():
        """Whether the API can reach Redis (no token needed)."""
        client.ping()
        return Health(status="ok")

    @app.get(
        "/admissions/{hadm_id}/risk",
        response_model=RiskScore,
        responses={**UNAUTHENTICATED, **FORBIDDEN, **NOT_FOUND, **RATE_LIMITED, **UNAVAILABLE},
    )
    def admission_risk(
        hadm_id: int = Path(ge=0, le=MAX_HADM_ID),
        token: ApiToken = Depends(caller("reader")),
    ):
        """An admission's current score: remaining length of stay, expected discharge and
        mortality risk."""
        score = store.get(hadm_id)
        read(token, "/admissions/{hadm_id}/risk", [hadm_id], 404 if score is None else 200)
        if score is None:
            raise HTTPException(404, "no current score for this admission")
        return score

    @app.get(
        "/risk/top",
        response_model=list[RiskScore],
        responses={**UNAUTHENTICATED, **FORBIDDEN, **RATE_LIMITED, **UNAVAILABLE},
    )
    def top(
        n: int = Query(20, ge=1, le=1000),
        token: ApiToken = Depends(caller("reader")),
    ):
        """Current inpatients ranked by mortality risk, highest first."""
        scores = store.top(n)
        read(token, "/risk/top", [s.hadm_id for s in scores], 200)
        return scores

    app.include_router(
        alerts_router(
            AlertStore(client),
            caller("reader"),
            read,
            {**UNAUTHENTICATED, **FORBIDDEN, **RATE_LIMITED, **UNAVAILABLE},
        )
    )

    @app.get(
        "/model-card",
        response_class=JSONResponse,
        responses={**MODEL_CARD, **UNAUTHENTICATED, **FORBIDDEN, **NO_CARD, **RATE_LIMITED},
    )
    def model_card(
        form: Literal["json", "markdown"] = Query("json", alias="format"),
        token: ApiToken = Depends(caller("reader")),
    ):
        """The served model's card: data, intended use, evaluation, known limits."""
        folder = find_card(
            settings.model_repo, settings.triton.model_name, settings.triton.model_version
        )
        if folder is None:
            raise HTTPException(404, "no model card published for the served model")
        if form == "markdown":
            return PlainTextResponse((folder / CARD_MD).read_text(), media_type="text/markdown")
        return JSONResponse(json.loads((folder / CARD_JSON).read_text()))

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={
            200: {
                "description": "Prometheus text exposition",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            **UNAUTHENTICATED,
            **FORBIDDEN,
            **RATE_LIMITED,
            **UNAVAILABLE,
        },
    )
    def metrics(token: ApiToken = Depends(caller("metrics"))):
        """The API's counters and every live stream worker's, for Prometheus."""
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # The ward pages: a login session instead of a bearer token (docs/ward.md).
    app.include_router(ward_router(settings, client, tokens, read, per_address, spend))
    app.include_router(fhir_routes, responses={**UNAUTHENTICATED, **FORBIDDEN, **RATE_LIMITED})

    @app.get("/openapi.json", responses={**UNAUTHENTICATED, **RATE_LIMITED})
    def openapi(token: ApiToken = Depends(caller(None))) -> dict[str, Any]:
        """This API's OpenAPI document."""
        return app.openapi()

    return app
