"""Clients for the project's services, built from Settings (the only place that knows how)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

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


class LuaScript:
    """A Lua script queued into pipelines by EVALSHA alone (see ``run_scripts``)."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # the name Redis gives it

    def __call__(self, pipe, keys, args) -> None:
        pipe.evalsha(self.sha, len(keys), *keys, *args)


def run_scripts(client, queue: Callable[[object], None], *scripts: LuaScript) -> list:
    """Queue commands with ``queue(pipe)`` into a pipeline and execute it.

    redis-py's own Script asks the server SCRIPT EXISTS before every pipeline that uses it,
    a round trip each time (with its per-call overhead, a pipeline of 20 calls took 35%
    longer). Here scripts are loaded only when the server answers NOSCRIPT (its script cache
    is empty after a restart); then none of them ran, and the pipeline is sent again. So a
    pipeline given here holds only script calls.
    """
    try:
        return _execute(client, queue)
    except redis.exceptions.NoScriptError:
        for script in scripts:
            client.script_load(script.source)
    return _execute(client, queue)


def _execute(client, queue: Callable[[object], None]) -> list:
    with client.pipeline(transaction=False) as pipe:
        queue(pipe)
        return pipe.execute()


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
