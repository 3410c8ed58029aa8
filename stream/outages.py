"""Outages of Redis or Triton: waited out with backoff, consumption paused, nothing committed.

Anything else that fails is a bug and stops the worker uncommitted, so its events are
redelivered to the next one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis
from tritonclient.utils import InferenceServerException

from stream.kafka_io import KafkaSource
from stream.models import OUTAGE_STATUSES

log = logging.getLogger(__name__)

REDIS_OUTAGES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
# Redis answering but refusing writes (out of memory, a failed save to disk, a read-only
# replica, a cluster without a primary): no event's fault, so waited out like a server down.
REDIS_REFUSALS = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.MasterDownError,
)
REFUSAL_CODES = ("OOM", "MISCONF", "READONLY", "NOREPLICAS", "MASTERDOWN", "CLUSTERDOWN", "BUSY")


def is_outage(exc: BaseException) -> bool:
    """Redis or Triton unreachable, or Redis refusing writes: worth waiting out."""
    if isinstance(exc, REDIS_OUTAGES + REDIS_REFUSALS):
        return True
    if isinstance(exc, redis.exceptions.ResponseError):
        # A script's error carries the refusal inside: "... -OOM command not allowed ..."
        text = str(exc)
        return any(text.startswith(code + " ") or f"-{code} " in text for code in REFUSAL_CODES)
    return isinstance(exc, InferenceServerException) and exc.status() in OUTAGE_STATUSES


class Retrier:
    """Runs a step until it succeeds, backing off while it fails with an outage.

    Consumption is paused meanwhile (polls keep the group membership alive) and nothing is
    committed, so a crash during an outage loses nothing: the events are redelivered.

    Args:
        source: the consumer to pause.
        backoff_s: the first wait and the longest, doubling in between.
        give_up_on_stop: once ``stop`` is set (SIGTERM), raise instead of waiting on: the
            uncommitted events are redelivered.
        on_retry: called before each wait (the worker counts retries).
    """

    def __init__(
        self,
        source: KafkaSource,
        backoff_s: tuple[float, float] = (0.2, 5.0),
        give_up_on_stop: bool = True,
        on_retry: Callable[[], None] = lambda: None,
    ):
        self.source = source
        self.backoff_s = backoff_s
        self.give_up_on_stop = give_up_on_stop
        self.on_retry = on_retry

    def run(self, what: str, step: Callable[[], None], stop: threading.Event) -> None:
        delay = self.backoff_s[0]
        paused = False
        while True:
            try:
                step()
                break
            except Exception as exc:
                if not is_outage(exc) or (stop.is_set() and self.give_up_on_stop):
                    raise
                log.warning("%s failed (%s); retrying in %.1fs", what, type(exc).__name__, delay)
                self.on_retry()
                if not paused:
                    self.source.pause()
                    paused = True
                stop.wait(delay)
                self.source.keep_alive()
                delay = min(delay * 2, self.backoff_s[1])
        if paused:
            self.source.resume()
