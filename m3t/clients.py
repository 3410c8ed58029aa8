"""Clients for the project's services, built from Settings (the only place that knows how)."""

from __future__ import annotations

import redis

from m3t.settings import Settings


def redis_client(settings: Settings, *, reader: bool = False) -> redis.Redis:
    """A Redis client; ``reader=True`` logs in as the read-only ACL user (query side)."""
    cfg = settings.redis
    if reader:
        username, password = cfg.reader_username, cfg.reader_password.get_secret_value()
    else:
        username, password = cfg.username, cfg.password.get_secret_value()
    return redis.Redis(
        host=cfg.host,
        port=cfg.port,
        db=cfg.db,
        username=username or None,
        password=password or None,
        socket_timeout=cfg.socket_timeout_s,
        socket_connect_timeout=cfg.socket_timeout_s,
    )


def triton_client(settings: Settings):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url=settings.triton.grpc_url)


def kafka_admin(settings: Settings):
    from kafka import KafkaAdminClient

    return KafkaAdminClient(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        client_id="m3t-admin",
        request_timeout_ms=10_000,
    )
