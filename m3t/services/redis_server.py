"""A real Redis server (Debian's ``redis-server``) on loopback, with the project's ACL users."""

from __future__ import annotations

import shutil

from m3t.clients import redis_client
from m3t.credentials import login
from m3t.services.process import ManagedService, ServiceError


class RedisServer(ManagedService):
    name = "redis"
    start_timeout_s = 20.0

    @property
    def address(self) -> str:
        return self.settings.redis.url

    def ports(self):
        return [(self.settings.redis.host, self.settings.redis.port)]

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
        conf.touch(mode=0o600)  # it holds the ACL users' passwords
        conf.chmod(0o600)
        conf.write_text(
            "\n".join(
                [
                    f"bind {cfg.host}",
                    f"port {cfg.port}",
                    "protected-mode yes",
                    f"dir {data}",
                    "daemonize no",
                    # Features and scores are rebuilt from Kafka; the AOF makes restarts cheap.
                    "appendonly yes",
                    "appendfsync everysec",
                    f"auto-aof-rewrite-min-size {cfg.aof_rewrite_min_size}",
                    'save ""',
                    *self._acl_lines(),
                    "",
                ]
            )
        )
        return [binary, str(conf)], {}

    def _acl_lines(self) -> list[str]:
        def user(role: str, rules: str) -> str:
            name, password = login(self.settings, "redis", role)
            return f"user {name} on >{password} resetchannels {rules}"

        return [
            "user default off",
            user("admin", "~* &* +@all"),
            user("stream", "~m3t:* +@all"),
            # The query side reads scores and features, and can write nothing.
            user("reader", "~m3t:* -@all +@read +@connection +fcall_ro"),
        ]

    def ready(self):
        client = redis_client(self.settings, role="admin")
        try:
            return bool(client.ping()), "PONG"
        finally:
            client.close()
