"""``m3t security check``: the effective security posture of an installation.

Each check looks at the running services and the files on disk, not at the code's
intentions: an unauthenticated Redis PING, a plaintext Kafka client, an unkeyed Triton
repository call, what each ACL user may run (``ACL DRYRUN``), the modes of the secrets.
A finding is ``ok``, ``open`` (something anyone could use; the command exits 1) or
``info`` (a fact to know, such as TLS off on loopback).
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal

from m3t.credentials import login
from m3t.settings import Settings

Status = Literal["ok", "open", "info"]


@dataclass(frozen=True)
class Finding:
    area: str
    check: str
    status: Status
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


# Commands each Redis role must be refused: (role, command).
REDIS_REFUSALS = [
    ("reader", ["FLUSHALL"]),
    ("reader", ["CONFIG", "GET", "maxmemory"]),
    ("reader", ["CLIENT", "KILL", "ID", "1"]),
    ("reader", ["KEYS", "*"]),
    ("reader", ["SCAN", "0"]),
    ("reader", ["GET", "m3t:v1-0-0:3:{1}:m"]),  # feature state
    ("reader", ["HSET", "m3t:score:{1}", "mortality_prob", "1"]),
    ("stream", ["FLUSHALL"]),
    ("stream", ["CONFIG", "SET", "appendonly", "no"]),
    ("stream", ["ACL", "SETUSER", "x"]),
    ("stream", ["KEYS", "*"]),
    ("stream", ["SET", "outside-m3t", "1"]),
    ("alerts", ["FLUSHALL"]),
    ("alerts", ["KEYS", "*"]),
    ("alerts", ["GET", "m3t:v1-0-0:3:{1}:m"]),  # feature state
    ("alerts", ["HSET", "m3t:score:{1}", "mortality_prob", "1"]),
]


def check(settings: Settings) -> list[Finding]:
    """Every finding, area by area; an area whose service is down says so and is ``open``
    (an unverified posture is not a safe one)."""
    findings: list[Finding] = []
    for area, checks in AREAS.items():
        try:
            for finding in checks(settings):  # those found before a failure are kept
                findings.append(finding)
        except Exception as exc:  # a service down or misconfigured: reported, not raised
            findings.append(Finding(area, "reachable", "open", f"{type(exc).__name__}: {exc}"))
    return findings


def secrets(settings: Settings) -> Iterator[Finding]:
    folder = settings.secrets_dir
    if not folder.exists():
        yield Finding("secrets", "folder", "info", f"{folder} does not exist yet")
        return
    exposed = []
    for path in [folder, *sorted(folder.rglob("*"))]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077 or path.stat().st_uid != os.getuid():
            exposed.append(path)
            yield Finding("secrets", str(path.relative_to(folder.parent)), "open", f"mode {mode:o}")
    if not exposed:
        yield Finding("secrets", "modes", "ok", "owner-only folders and files")


def redis_posture(settings: Settings) -> Iterator[Finding]:
    from m3t.clients import redis_client

    cfg = settings.redis
    yield _unauthenticated_redis(settings)
    admin = redis_client(settings, role="admin")
    try:
        users = {line.split()[1]: line for line in admin.acl_list()}
        default = users.get("default", "")
        yield Finding(
            "redis",
            "default user",
            "ok" if " off " in f"{default} " else "open",
            "off" if " off " in f"{default} " else default or "missing",
        )
        passwordless = [name for name, line in users.items() if "nopass" in line.split()]
        yield Finding(
            "redis",
            "passwords",
            "open" if passwordless else "ok",
            f"no password: {', '.join(passwordless)}" if passwordless else "every user has one",
        )
        for role, command in REDIS_REFUSALS:
            name = login(settings, "redis", role)[0]
            reply = admin.execute_command("ACL", "DRYRUN", name, *command)
            allowed = reply in (b"OK", "OK")
            yield Finding(
                "redis",
                f"{role} {' '.join(command[:2])}",
                "open" if allowed else "ok",
                "allowed" if allowed else "refused",
            )
        for name, line in sorted(users.items()):
            rules = " ".join(w for w in line.split()[2:] if w[0] not in "#>")  # no hashes
            yield Finding("redis", f"user {name}", "info", rules)
    finally:
        admin.close()
    yield _transport("redis", cfg.host, cfg.tls)


def _unauthenticated_redis(settings: Settings) -> Finding:
    cfg = settings.redis
    if cfg.tls:
        return Finding("redis", "unauthenticated PING", "info", "TLS port: checked by DRYRUN")
    with socket.create_connection((cfg.host, cfg.port), timeout=3) as conn:
        conn.sendall(b"PING\r\n")
        reply = conn.recv(256).decode(errors="replace").strip()
    refused = reply.startswith("-NOAUTH")
    return Finding("redis", "unauthenticated PING", "ok" if refused else "open", reply[:80])


def kafka_posture(settings: Settings) -> Iterator[Finding]:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    cfg = settings.kafka
    secure = cfg.security_protocol == "SASL_SSL"
    yield Finding(
        "kafka",
        "security protocol",
        "ok" if secure else ("info" if cfg.security_protocol != "PLAINTEXT" else "open"),
        cfg.security_protocol,
    )
    for label, port in (("listener", cfg.port), ("controller", cfg.controller_port)):
        plaintext = AdminClient(
            {
                "bootstrap.servers": f"{cfg.host}:{port}",
                "security.protocol": "PLAINTEXT",
                "log_level": 0,  # its refusals are the expected outcome
            }
        )
        try:
            plaintext.list_topics(timeout=3)
            answered = True
        except KafkaException:
            answered = False
        yield Finding(
            "kafka",
            f"plaintext client on the {label}",
            "open" if answered else "ok",
            "answered" if answered else "refused",
        )
    yield from _kafka_authorization(settings)


def _kafka_authorization(settings: Settings) -> Iterator[Finding]:
    from m3t import kafka

    client = kafka.admin(settings)  # the admin's, held until its futures resolve
    bindings = kafka.acls(client, timeout_s=10)
    wildcard = [b for b in bindings if b.principal in ("User:*",) or b.name == "*"]
    yield Finding(
        "kafka",
        "ACLs",
        "open" if wildcard or not bindings else "ok",
        f"{len(bindings)} bindings" + (f", {len(wildcard)} for everyone" if wildcard else ""),
    )
    principals = sorted({b.principal for b in bindings})
    yield Finding("kafka", "principals", "info", ", ".join(principals) or "none")


def triton_posture(settings: Settings) -> Iterator[Finding]:
    from tritonclient.utils import InferenceServerException

    from m3t.clients import triton_admin_headers, triton_client

    client = triton_client(settings)
    try:
        try:
            client.get_model_repository_index(client_timeout=5)
            unkeyed = True
        except InferenceServerException:
            unkeyed = False
        yield Finding(
            "triton",
            "model repository without the key",
            "open" if unkeyed else "ok",
            "answered" if unkeyed else "refused",
        )
        client.get_model_repository_index(headers=triton_admin_headers(settings), client_timeout=5)
        yield Finding("triton", "model repository with the key", "ok", "answered")
    finally:
        client.close()
    yield _transport("triton", settings.triton.host, False)


def _transport(area: str, host: str, encrypted: bool) -> Finding:
    if encrypted:
        return Finding(area, "TLS", "ok", "on")
    from stream.api import is_loopback

    if is_loopback(host):
        return Finding(area, "TLS", "info", f"off, on loopback ({host})")
    return Finding(area, "TLS", "open", f"off, listening on {host}")


def api_posture(settings: Settings) -> Iterator[Finding]:
    from stream.api import bind_refusals
    from stream.api_tokens import TokenStore

    host = settings.api.host
    refusals = bind_refusals(settings, host)
    for reason in refusals:
        yield Finding("api", f"listening on {host}", "open", reason)
    if not refusals:
        yield Finding(
            "api", f"listening on {host}", "ok", "loopback, or TLS without the development token"
        )
    tokens = TokenStore(settings).tokens()
    roles = sorted({t.role for t in tokens})
    yield Finding(
        "api",
        "tokens",
        "info",
        f"{len(tokens)} ({', '.join(roles) or 'none'})"
        + (", the development token among them" if any(t.development for t in tokens) else ""),
    )


AREAS: dict[str, Callable[[Settings], Iterator[Finding]]] = {
    "secrets": secrets,
    "redis": redis_posture,
    "kafka": kafka_posture,
    "triton": triton_posture,
    "api": api_posture,
}
