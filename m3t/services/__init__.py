"""The project's local services: Redis, Kafka and Triton, started and stopped together."""

from __future__ import annotations

from m3t.services.kafka_broker import KafkaBroker
from m3t.services.kafka_cluster import KafkaCluster
from m3t.services.process import Health, ManagedService, ServiceError, in_parallel
from m3t.services.redis_cluster import RedisCluster
from m3t.services.redis_server import RedisServer
from m3t.services.triton_server import TritonServer
from m3t.settings import Settings

SERVICES: dict[str, type[ManagedService]] = {
    "redis": RedisServer,
    "kafka": KafkaBroker,
    "triton": TritonServer,
}

# With ``settings.cluster``: a 3-node Kafka cluster and a Redis Cluster of 3 primaries and
# 3 replicas, each started, checked and stopped as one service.
CLUSTERS = {"redis": RedisCluster, "kafka": KafkaCluster}

__all__ = ["SERVICES", "Health", "ServiceError", "select", "up", "down", "status"]


def select(settings: Settings, names: list[str] | None = None) -> list:
    """The services named (default: all), each a node or, with ``settings.cluster``, a
    cluster of them."""
    unknown = set(names or []) - set(SERVICES)
    if unknown:
        raise ServiceError(
            f"unknown service(s): {', '.join(sorted(unknown))}; known: {', '.join(SERVICES)}"
        )
    kinds = {**SERVICES, **(CLUSTERS if settings.cluster else {})}
    return [kinds[n](settings) for n in (names or SERVICES)]


def up(settings: Settings, names: list[str] | None = None) -> list[Health]:
    """Start what is not running (in parallel); raise ServiceError naming every failure."""
    return in_parallel(select(settings, names), lambda service: service.up())


def down(settings: Settings, names: list[str] | None = None) -> dict[str, bool]:
    """Stop services; returns which were running."""
    return {s.name: s.down() for s in reversed(select(settings, names))}


def status(settings: Settings, names: list[str] | None = None) -> list[Health]:
    return [s.health() for s in select(settings, names)]
