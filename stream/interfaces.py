"""What the stream worker needs of its feature store and its model, declared on its side."""

from __future__ import annotations

from typing import Protocol


class FeatureSource(Protocol):
    def apply(self, events: list) -> list | None:
        """Apply events idempotently (an event seen before changes nothing); returns the
        events refused, each as (event, reason)."""

    def inputs(self, hadm_ids: list[int]) -> tuple[dict, list[float]]:
        """Model inputs for these admissions, and each one's feature time (epoch s)."""


class Scorer(Protocol):
    model: str

    def score(self, inputs: dict) -> tuple[list[float], list[float]]:
        """Length of stay (days) and mortality probability per admission."""
