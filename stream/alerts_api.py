"""``GET /alerts``: the active alerts the page shows (silent rules' alerts are left out)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from stream.alerts import AlertStore


class Alert(BaseModel):
    hadm_id: Annotated[int, Field(description="The admission (MIMIC-IV hadm_id)")]
    ward: Annotated[str, Field(description="The ward whose rule raised it (empty: unknown)")]
    raised_at: Annotated[float, Field(description="Feature time (epoch s) of the raising score")]
    criteria: Annotated[
        list[str], Field(description="What held when raised: threshold, rise, top_k")
    ]
    mortality_prob: Annotated[float, Field(description="The latest score's mortality risk")]
    feature_time: Annotated[float, Field(description="Feature time of the latest score")]
    silent: Annotated[bool, Field(description="Always false here: silent alerts are not shown")]


def alerts_router(store: AlertStore, reader: Callable, read: Callable, responses: dict):
    """The route; ``reader``: the API's dependency for a reader's token, ``read(token,
    endpoint, admissions, status)``: its audit of a read."""
    router = APIRouter()

    @router.get("/alerts", response_model=list[Alert], responses=responses)
    def alerts(token=Depends(reader)):
        """Active, shown alerts of admissions not discharged, oldest raise first."""
        active = store.active()
        read(token, "/alerts", [a["hadm_id"] for a in active], 200)
        return active

    return router
