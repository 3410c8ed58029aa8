"""A real Redis server (Debian's ``redis-server``) on loopback, with the project's ACL users."""

from __future__ import annotations

import shutil

from m3t.clients import redis_client
from m3t.credentials import reader_password
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
        cfg = self.settings.redis
        lines = []
        if cfg.username and cfg.username != "default":
            lines.append(f"user {cfg.username} on >{cfg.password.get_secret_value()} ~* &* +@all")
            lines.append("user default off")
        elif cfg.password.get_secret_value():
            lines.append(f"user default on >{cfg.password.get_secret_value()} ~* &* +@all")
        else:
            lines.append("user default on nopass ~* &* +@all")
        # The query API reads scores and features, and can write nothing.
        lines.append(
            f"user {cfg.reader_username} on >{reader_password(self.settings)} "
            "~m3t:* resetchannels -@all +@read +@connection +fcall_ro"
        )
        return lines

    def ready(self):
        client = redis_client(self.settings)
        try:
            return bool(client.ping()), "PONG"
        finally:
            client.close()
