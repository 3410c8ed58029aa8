"""A local 3-node Kafka cluster in KRaft mode: each node a broker and a controller.

Each node is a ``KafkaBroker`` (same jars, same SASL/TLS listeners, same admin credential
written at format time) with its own node id, ports and folder (``<state_dir>/kafka-<n>``);
the three controllers form a static quorum (``controller.quorum.voters``), formatted with
one cluster id. Topics get three replicas, two of which must have a write
(``min.insync.replicas``), so one node may die with nothing acknowledged lost.
"""

from __future__ import annotations

import base64
import uuid

from m3t.services.kafka_broker import KafkaBroker
from m3t.services.process import Health, NodeGroup, ServiceError, in_parallel
from m3t.settings import Settings

NODES = 3


def _new_cluster_id() -> str:
    """What StorageTool's random-uuid gives: 16 random bytes in URL-safe base64."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka's tools would read it as an option
            return text


class KafkaNode(KafkaBroker):
    """One of the cluster's nodes (``index`` 0, 1 or 2; node id ``index + 1``)."""

    def __init__(self, settings: Settings, index: int, cluster_id: str = ""):
        self.name = f"kafka-{index}"
        super().__init__(settings)
        self.index = index
        self.node_id = index + 1
        self._cluster_id = cluster_id

    @property
    def address(self) -> str:
        return f"{self.settings.kafka.host}:{self.listener_ports[0]}"

    @property
    def listener_ports(self) -> tuple[int, int]:
        cfg = self.settings.kafka
        return cfg.cluster_ports[self.index], cfg.cluster_controller_ports[self.index]

    def quorum_properties(self) -> list[str]:
        cfg = self.settings.kafka
        voters = ",".join(
            f"{n + 1}@{cfg.host}:{port}" for n, port in enumerate(cfg.cluster_controller_ports)
        )
        return [f"controller.quorum.voters={voters}"]

    def cluster_id(self, jvm) -> str:
        return self._cluster_id

    def format_quorum(self) -> list[str]:
        return []  # the static voters in server.properties

    def ready(self):
        from m3t import kafka

        mine = self.settings.model_copy(
            update={"kafka": self.settings.kafka.model_copy(update={"bootstrap": self.address})}
        )
        ids = kafka.admin(mine).list_topics(timeout=3).brokers
        return self.node_id in ids, f"node {self.node_id}: {len(ids)} broker(s) registered"

    def after_start(self) -> None:
        """Users and topics wait for the whole cluster (``KafkaCluster.up``)."""


class KafkaCluster(NodeGroup):
    """The three nodes started, checked and stopped as one service named ``kafka``."""

    name = "kafka"

    def __init__(self, settings: Settings):
        cfg = settings.kafka
        if len(cfg.cluster_ports) != NODES or len(cfg.cluster_controller_ports) != NODES:
            raise ServiceError(
                f"the local Kafka cluster has {NODES} nodes: kafka.cluster_ports and "
                f"kafka.cluster_controller_ports need {NODES} ports each"
            )
        self.settings = settings
        self.id_file = settings.state_dir / "kafka-cluster-id"
        cluster_id = self.id_file.read_text().strip() if self.id_file.exists() else ""
        self.nodes = [KafkaNode(settings, i, cluster_id) for i in range(NODES)]

    @property
    def address(self) -> str:
        return self.settings.kafka.bootstrap_servers

    def up(self) -> Health:
        if not self.id_file.exists():  # one id for the three nodes' storage
            self.id_file.parent.mkdir(parents=True, exist_ok=True)
            self.id_file.write_text(_new_cluster_id())
        cluster_id = self.id_file.read_text().strip()
        for node in self.nodes:
            node._cluster_id = cluster_id
        self.nodes[0].ensure_jars()  # once, before three nodes would fetch them
        # Together: a node is ready only once a quorum of controllers elected a leader.
        in_parallel(self.nodes, lambda node: node.up())
        KafkaBroker.after_start(self.nodes[0])  # users, topics and grants, cluster-wide
        return self.health()

    def health(self) -> Health:
        healths = [node.health() for node in self.nodes]
        healthy = sum(h.healthy for h in healths)
        pids = [h.pid for h in healths if h.pid is not None]
        detail = f"{healthy}/{NODES} nodes healthy" + "".join(
            f"; {h.name}: {h.detail}" for h in healths if not h.healthy
        )
        return Health(self.name, self.address, healthy == NODES, pids[0] if pids else None, detail)
