"""The project's local services: Redis, Kafka and Triton, started and stopped together."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from m3t.services.kafka_broker import KafkaBroker
from m3t.services.process import Health, ManagedService, ServiceError
from m3t.services.redis_server import RedisServer
from m3t.services.triton_server import TritonServer
from m3t.settings import Settings

SERVICES: dict[str, type[ManagedService]] = {
    "redis": RedisServer,
    "kafka": KafkaBroker,
    "triton": TritonServer,
}

__all__ = ["SERVICES", "Health", "ServiceError", "up", "down", "status"]


def _select(settings: Settings, names: list[str] | None) -> list[ManagedService]:
    unknown = set(names or []) - set(SERVICES)
    if unknown:
        raise ServiceError(
            f"unknown service(s): {', '.join(sorted(unknown))}; known: {', '.join(SERVICES)}"
        )
    return [SERVICES[n](settings) for n in (names or SERVICES)]


def up(settings: Settings, names: list[str] | None = None) -> list[Health]:
    """Start what is not running (in parallel); raise ServiceError naming every failure."""
    services = _select(settings, names)
    with ThreadPoolExecutor(len(services)) as pool:
        futures = [pool.submit(s.up) for s in services]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise ServiceError("\n".join(str(e) for e in errors))
    return [f.result() for f in futures]


def down(settings: Settings, names: list[str] | None = None) -> dict[str, bool]:
    """Stop services; returns which were running."""
    return {s.name: s.down() for s in reversed(_select(settings, names))}


def status(settings: Settings, names: list[str] | None = None) -> list[Health]:
    return [s.health() for s in _select(settings, names)]
