"""The HTTP query API: current risk per admission, the top-risk list, health and metrics.

Risk scores are patient data: every endpoint but ``/healthz`` needs the bearer token (the
settings', or the one generated into the state folder: ``m3t.credentials``), and the API
logs in to Redis as the read-only ACL user.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict

from fastapi import Depends, FastAPI, HTTPException, Query, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from m3t.clients import redis_client
from m3t.credentials import api_token
from m3t.settings import Settings
from stream.metrics import RedisWorkerCollector
from stream.scores import ScoreStore


def create_app(settings: Settings) -> FastAPI:
    client = redis_client(settings, role="reader")
    store = ScoreStore(client)
    registry = CollectorRegistry()
    registry.register(RedisWorkerCollector(client))
    expected = api_token(settings).encode()
    bearer = HTTPBearer(auto_error=False)

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None or not secrets.compare_digest(
            credentials.credentials.encode(), expected
        ):
            raise HTTPException(
                401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )

    app = FastAPI(title="m3t-stream risk API", version="1")

    @app.get("/healthz")
    def healthz():
        try:
            client.ping()
        except Exception:
            raise HTTPException(503, "redis unavailable") from None
        return {"status": "ok"}

    @app.get("/admissions/{hadm_id}/risk", dependencies=[Depends(authorized)])
    def admission_risk(hadm_id: int):
        score = store.get(hadm_id)
        if score is None:
            raise HTTPException(404, f"no score for admission {hadm_id}")
        return asdict(score)

    @app.get("/risk/top", dependencies=[Depends(authorized)])
    def top(n: int = Query(20, ge=1, le=1000)):
        return [asdict(s) for s in store.top(n)]

    @app.get("/metrics", dependencies=[Depends(authorized)])
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
