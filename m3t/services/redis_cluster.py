"""A local Redis Cluster: 3 primaries and a replica of each, on loopback.

Each node is a ``RedisServer`` (same ACL users, TLS and append-only file) with cluster mode
on, its own port, cluster-bus port and folder (``<state_dir>/redis-<n>``). The first start
creates the cluster with ``redis-cli --cluster create`` (the first three nodes own the
slots, the others replicate them); later starts find it in each node's ``nodes.conf``.
A primary that stops answering for ``NODE_TIMEOUT_MS`` is replaced by its replica.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from m3t import tls
from m3t.clients import redis_node
from m3t.credentials import login
from m3t.services.process import Health, NodeGroup, ServiceError, in_parallel, wait_until
from m3t.services.redis_server import RedisServer
from m3t.settings import Settings

NODES = 6  # 3 primaries, a replica each
NODE_TIMEOUT_MS = 2000
# What a cluster client asks of any node besides the data: the slots' owners, and the
# command table (redis-py reads it to find each command's keys); and WAIT, with which a
# writer knows its writes reached a replica (m3t.clients.replicated).
CLIENT_RULES = " +cluster|slots +cluster|shards +cluster|nodes +cluster|info +command +asking +wait"


class RedisNode(RedisServer):
    """One of the cluster's nodes (``index`` 0 to 5)."""

    def __init__(self, settings: Settings, index: int):
        self.name = f"redis-{index}"
        super().__init__(settings)
        self.index = index

    @property
    def port(self) -> int:
        return self.settings.redis.cluster_ports[self.index]

    @property
    def address(self) -> str:
        return f"redis://{self.settings.redis.host}:{self.port}"

    def ports(self):
        host, cfg = self.settings.redis.host, self.settings.redis
        return [(host, self.port), (host, cfg.cluster_bus_ports[self.index])]

    def cluster_lines(self) -> list[str]:
        # A replica signs in to its primary as the admin (the file is the owner's only).
        username, password = login(self.settings, "redis", "admin")
        lines = [
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            f"cluster-port {self.settings.redis.cluster_bus_ports[self.index]}",
            f"cluster-node-timeout {NODE_TIMEOUT_MS}",
            f"masteruser {username}",
            f"masterauth {password}",
        ]
        if self.settings.redis.tls:  # the bus and replication over TLS too
            lines += ["tls-cluster yes", "tls-replication yes"]
        return lines

    def extra_rules(self, role: str) -> str:
        return "" if role == "admin" else CLIENT_RULES


class RedisCluster(NodeGroup):
    """The six nodes started, checked and stopped as one service named ``redis``."""

    name = "redis"

    def __init__(self, settings: Settings):
        cfg = settings.redis
        if len(cfg.startup_nodes) != NODES or len(cfg.cluster_bus_ports) != NODES:
            raise ServiceError(
                f"the Redis Cluster made here has {NODES} nodes: redis.cluster_ports (or "
                f"cluster_nodes) and redis.cluster_bus_ports need {NODES} each"
            )
        self.settings = settings
        self.nodes = [RedisNode(settings, i) for i in range(NODES)]

    @property
    def address(self) -> str:
        return self.settings.redis.url

    def up(self) -> Health:
        in_parallel(self.nodes, lambda node: node.up())
        if self.known_nodes() < NODES:
            self.create()
        if not wait_until(lambda: self.state()[0], 60, 0.25):
            raise ServiceError(f"the Redis Cluster did not become ready: {self.state()[1]}")
        return self.health()

    def create(self) -> None:
        """Assign the slots to the first three nodes and a replica to each."""
        cli = shutil.which("redis-cli")
        if cli is None:
            raise ServiceError("redis-cli is missing: run `make setup` (Debian's redis-tools)")
        cfg = self.settings.redis
        username, password = login(self.settings, "redis", "admin")
        command = [cli, "--user", username, "--cluster", "create"]
        command += [f"{host}:{port}" for host, port in cfg.startup_nodes]
        command += ["--cluster-replicas", "1", "--cluster-yes"]
        if cfg.tls:
            command += ["--tls", "--cacert", str(cfg.ca_file or tls.ca_file(self.settings))]
        made = subprocess.run(  # the password in the environment, not on the command line
            command, capture_output=True, text=True, env={**os.environ, "REDISCLI_AUTH": password}
        )
        if made.returncode != 0:
            raise ServiceError(f"redis-cli --cluster create failed:\n{made.stdout[-2000:]}")

    def _info(self, index: int) -> dict[str, str]:
        host, port = self.settings.redis.startup_nodes[index]
        client = redis_node(self.settings, port, host=host)
        try:
            return client.cluster("info")
        finally:
            client.close()

    def known_nodes(self) -> int:
        return int(self._info(0).get("cluster_known_nodes", 0))

    def answers(self) -> bool:
        """Whether every node answers (the cluster made or not)."""
        try:
            return all(self._info(n) for n in range(len(self.settings.redis.startup_nodes)))
        except Exception:  # not up yet
            return False

    def state(self) -> tuple[bool, str]:
        """Whether every live node sees all slots served, and a short detail."""
        problems, primaries = [], 0
        local = not self.settings.redis.cluster_nodes  # nodes this project started
        for node in self.nodes:
            if local and node.pid() is None:
                problems.append(f"{node.name} down")
                continue
            try:
                info = self._info(node.index)
            except Exception as exc:  # a node that does not answer is a finding, not a crash
                problems.append(f"{node.name}: {type(exc).__name__}")
                continue
            if info.get("cluster_state") != "ok":
                problems.append(f"{node.name}: cluster_state {info.get('cluster_state')}")
            primaries = max(primaries, int(info.get("cluster_size", 0)))
        ok = not problems and primaries == NODES // 2
        return ok, f"{primaries} primaries" + "".join(f"; {p}" for p in problems)

    def health(self) -> Health:
        pids = [node.pid() for node in self.nodes]
        running = [pid for pid in pids if pid is not None]
        if not running:
            return Health(self.name, self.address, False, None, "not running")
        ok, detail = self.state()
        return Health(self.name, self.address, ok, running[0], f"{len(running)} nodes, {detail}")
