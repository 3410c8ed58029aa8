"""A real Redis server (Debian's ``redis-server``) on loopback, with the project's ACL users."""

from __future__ import annotations

import shutil

from m3t import tls
from m3t.clients import redis_node
from m3t.credentials import login, write_secret
from m3t.services.process import ManagedService, ServiceError

# What each role may run, on which keys. The stream's commands are those its code and its Lua
# scripts call; the query side reads only scores, their history, the ranking and the
# workers' metrics, and holds no @connection command (CLIENT KILL or PAUSE would stall the
# writers). redis-py's CLIENT SETINFO on connect may be refused: it ignores the error.
ACL_RULES = {
    "admin": "~* &* +@all",
    "stream": " ".join(
        [
            "resetchannels ~m3t:*",
            "+ping +select +get +set +append +mget +exists +expire",
            "+hget +hmget +hgetall +hset +hdel",
            "+zadd +zrem +zscan +zrevrange +xadd +xrevrange +xdel",
            "+evalsha +script|load +script|exists +multi +exec",
        ]
    ),
    "reader": " ".join(
        [
            "resetchannels",
            "%R~m3t:score:* %R~m3t:score-history:* %R~m3t:risk:* %R~m3t:metrics:*",
            "%R~m3t:alert:*",
            "+ping +select +get +mget +exists +hget +hmget +hgetall",
            "+zrange +zrevrange +zscore +zcard +xrange +xrevrange +xlen",
        ]
    ),
    # The alerting process: its own state and indexes, and whether a scored admission was
    # discharged (the score's hash, read only).
    "alerts": " ".join(
        [
            "resetchannels ~m3t:alert:* %R~m3t:score:*",
            "+ping +select +exists +expire +hget +hgetall +hset +hdel",
            "+zadd +zrem +zrange +zrevrange +zscore +sadd +srem +smembers",
            "+evalsha +script|load +script|exists",
        ]
    ),
}


class RedisServer(ManagedService):
    name = "redis"
    start_timeout_s = 20.0

    @property
    def address(self) -> str:
        return self.settings.redis.url

    @property
    def port(self) -> int:
        return self.settings.redis.port

    def ports(self):
        return [(self.settings.redis.host, self.port)]

    def prepare(self):
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceError(
                "redis-server is not installed: run `make setup` "
                "(it does `apt-get install -y redis-server`)"
            )
        cfg = self.settings.redis
        data = self.home / "data"
        data.mkdir(parents=True, exist_ok=True)
        conf = self.home / "redis.conf"
        write_secret(  # it holds the ACL users' passwords
            conf,
            "\n".join(
                [
                    f"bind {cfg.host}",
                    *self._listener_lines(),
                    "protected-mode yes",
                    f"dir {data}",
                    "daemonize no",
                    # Offsets are committed once Redis acknowledged: the AOF keeps those writes.
                    "appendonly yes",
                    f"appendfsync {cfg.appendfsync}",
                    f"auto-aof-rewrite-min-size {cfg.aof_rewrite_min_size}",
                    'save ""',
                    *self._acl_lines(),
                    *self.cluster_lines(),
                    "",
                ]
            ),
        )
        return [binary, str(conf)], {}

    def _listener_lines(self) -> list[str]:
        cfg = self.settings.redis
        if not cfg.tls:
            return [f"port {self.port}"]
        cert, key = tls.server_certificate(self.settings, "redis", [cfg.host, "localhost"])
        return [
            "port 0",  # TLS only
            f"tls-port {self.port}",
            f"tls-cert-file {cert}",
            f"tls-key-file {key}",
            f"tls-ca-cert-file {tls.ca_file(self.settings)}",
            "tls-auth-clients no",  # clients prove who they are with their ACL password
        ]

    def cluster_lines(self) -> list[str]:
        return []

    def _acl_lines(self) -> list[str]:
        # Nobody can sign in as default (off, no password), but Redis 7.0 replays the AOF's
        # MULTI/EXEC blocks (Lua scripts' effects) under its rules: without them a restart
        # drops every scripted write, refused as NOPERM.
        lines = ["user default off resetpass ~* &* +@all"]
        for role, rules in ACL_RULES.items():
            name, password = login(self.settings, "redis", role)
            lines.append(f"user {name} reset on >{password} {rules}{self.extra_rules(role)}")
        return lines

    def extra_rules(self, role: str) -> str:
        return ""

    def ready(self):
        client = redis_node(self.settings, self.port, role="admin")
        try:
            return bool(client.ping()), "PONG"
        finally:
            client.close()
