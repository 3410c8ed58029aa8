"""All of m3t-stream's settings, in one place.

Values come from the constructor (tests), then ``M3T_*`` environment variables, then the
defaults below, which point at the local services that ``m3t services up`` starts.
Nested groups use a double underscore: ``M3T_KAFKA__HOST``, ``M3T_REDIS__PORT``,
``M3T_TRITON__GRPC_PORT``. Nothing else in the code reads the environment.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


TRUE = ("1", "true", "yes", "on")

Role = Literal["admin", "stream", "producer", "reader", "alerts"]
"""Who a client acts for: ``admin`` (services, topics, pruning), ``stream`` (the worker),
``producer`` (replay and feeds: events in), ``reader`` (the query side: scores out),
``alerts`` (the alerting process: scores in, alerts out)."""


class RedisSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 16379
    db: int = 0
    # One ACL user per role (the default user is off). An empty password is generated into
    # the state folder (m3t.credentials); set them for an external server.
    username: str = "m3t-stream"
    password: SecretStr = SecretStr("")
    reader_username: str = "m3t-reader"
    reader_password: SecretStr = SecretStr("")
    admin_username: str = "m3t-admin"
    admin_password: SecretStr = SecretStr("")
    alerts_username: str = "m3t-alerts"
    alerts_password: SecretStr = SecretStr("")
    # TLS to Redis; the CA that signed the server's certificate (empty: the local CA).
    tls: bool = False
    ca_file: Path | None = None
    socket_timeout_s: float = 5.0
    # "always": a write is on disk before Redis acknowledges it, so a killed Redis loses
    # nothing the worker has committed past in Kafka. Under "everysec" Redis may acknowledge
    # writes it has not yet written while a slow fsync runs, and lose them if killed.
    appendfsync: Literal["always", "everysec"] = "always"
    # Redis rewrites its append-only file once it doubled and reached this size: each
    # rewrite forks and writes the whole data set, so at Redis's default (64mb) a busy
    # stream rewrote often enough to set its p99 latency.
    aof_rewrite_min_size: str = "1gb"
    # A Redis Cluster: the local one (`M3T_CLUSTER`: 3 primaries on the first three
    # cluster ports, a replica each on the others, their cluster buses on the bus ports), or
    # an external one's startup nodes ("host:port,host:port"), which also selects it.
    cluster: bool = False
    cluster_ports: tuple[int, ...] = (16380, 16381, 16382, 16383, 16384, 16385)
    cluster_bus_ports: tuple[int, ...] = (16390, 16391, 16392, 16393, 16394, 16395)
    cluster_nodes: str = ""

    @property
    def is_cluster(self) -> bool:
        return self.cluster or bool(self.cluster_nodes)

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """The Redis Cluster nodes a client first asks for the slots' owners."""
        if self.cluster_nodes:
            pairs = (node.strip().rsplit(":", 1) for node in self.cluster_nodes.split(","))
            return [(host, int(port)) for host, port in pairs]
        return [(self.host, port) for port in self.cluster_ports]

    @property
    def url(self) -> str:
        if self.is_cluster:
            return ",".join(f"redis://{host}:{port}" for host, port in self.startup_nodes)
        return f"redis://{self.host}:{self.port}/{self.db}"


class KafkaSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 19092
    controller_port: int = 19093
    partitions: int = 4
    topic_events: str = "m3t.admission-events"
    topic_dead_letter: str = "m3t.dead-letter"
    topic_scores: str = "risk-scores"
    topic_alerts: str = "risk-alerts"
    consumer_group: str = "m3t-stream"
    alerts_group: str = "m3t-alerts"
    kafka_version: str = "4.3.1"
    # SASL/SCRAM over TLS, a SCRAM user per role (empty passwords are generated), and the CA
    # that signed the brokers' certificates (empty: the local CA `m3t services up` makes).
    security_protocol: Literal["SASL_SSL", "SSL", "SASL_PLAINTEXT", "PLAINTEXT"] = "SASL_SSL"
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    ca_file: Path | None = None
    username: str = "m3t-stream"
    password: SecretStr = SecretStr("")
    producer_username: str = "m3t-producer"
    producer_password: SecretStr = SecretStr("")
    reader_username: str = "m3t-reader"
    reader_password: SecretStr = SecretStr("")
    admin_username: str = "m3t-admin"
    admin_password: SecretStr = SecretStr("")
    alerts_username: str = "m3t-alerts"
    alerts_password: SecretStr = SecretStr("")
    # How long each topic keeps records: events long enough to rebuild a stay's features.
    retention_events_ms: int = 90 * 86_400_000
    retention_scores_ms: int = 7 * 86_400_000
    retention_dead_letter_ms: int = 30 * 86_400_000
    retention_alerts_ms: int = 30 * 86_400_000
    heap: str = "512m"
    # A stream worker's fetches: the broker answers once fetch_min_bytes are ready, or after
    # fetch_wait_max_ms. Answered at the first byte, an idle worker's fetch waits at the
    # broker instead of coming back empty every few ms (benchmarks/README.md has the figures).
    fetch_wait_max_ms: int = 500
    fetch_min_bytes: int = 1
    # A worker fetches again only once it has taken what the last fetch brought, looking
    # every this many ms: what piles up while it is busy comes in one fetch.
    fetch_queue_backoff_ms: int = 2
    # A Kafka cluster: the local one (`M3T_CLUSTER`: 3 KRaft nodes, each broker and
    # controller, on these ports), or an external one's bootstrap servers ("host:port,...").
    cluster: bool = False
    cluster_ports: tuple[int, ...] = (19094, 19095, 19096)
    cluster_controller_ports: tuple[int, ...] = (19097, 19098, 19099)
    bootstrap: str = ""
    # The topics' replicas and the least in sync for a write (0: 3 and 2 on the local
    # cluster, else 1 and 1); set them for an external cluster.
    replication_factor: int = 0
    min_insync_replicas: int = 0

    @property
    def bootstrap_servers(self) -> str:
        if self.bootstrap:
            return self.bootstrap
        if self.cluster:
            return ",".join(f"{self.host}:{port}" for port in self.cluster_ports)
        return f"{self.host}:{self.port}"

    @property
    def replicas(self) -> tuple[int, int]:
        """The topics' replication factor and min.insync.replicas."""
        local = (3, 2) if self.cluster else (1, 1)
        return (self.replication_factor or local[0], self.min_insync_replicas or local[1])

    @property
    def topics(self) -> tuple[str, ...]:
        return (self.topic_events, self.topic_dead_letter, self.topic_scores, self.topic_alerts)


class TritonSettings(BaseModel):
    host: str = "127.0.0.1"
    http_port: int = 18000
    grpc_port: int = 18001
    metrics_port: int = 18002
    # "bundled": the CPU server from nvidia-pytriton, started by `m3t services up`;
    # "external": a server you run (NVIDIA's Triton container on GPU hosts).
    launcher: Literal["bundled", "external"] = "bundled"
    model_name: str = "m3t_lm"
    model_version: str = ""  # empty: the latest version Triton has loaded
    timeout_s: float = 10.0
    # Loading and unloading models needs this key (empty: generated); inference does not.
    admin_key: SecretStr = SecretStr("")
    # Chest X-rays in the cached scoring path: "triton" sends each image's bytes to the
    # m3t_cxr_embed ensemble (Triton's DALI backend, `m3t export dali`); "worker" decodes
    # with the worker's own DALI pipeline; "auto" uses Triton's where it is loaded.
    cxr_pipeline: Literal["auto", "triton", "worker"] = "auto"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"


class ApiSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 18080
    # Served over TLS with this certificate and key; required to bind beyond loopback.
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    # Requests per minute one token may make; more are answered 429.
    rate_limit_per_minute: int = 600
    # Requests a minute of each ingest token (POST /fhir): a feed, not a person.
    ingest_rate_limit_per_minute: int = 60_000
    # The ward pages (/ward): how long a login lasts, and how often their live view reads
    # the ranking from Redis (a score reaches the browser within about this time).
    session_ttl_s: int = 8 * 3600
    ward_poll_s: float = 0.25


class StreamSettings(BaseModel):
    # Larger events are dead-lettered unparsed (a note is at most 100,000 characters).
    max_event_bytes: int = 512 * 1024
    # How far an event may be dated after its Kafka timestamp. Empty: no limit, for replays
    # of de-identified data whose dates are shifted into the future; set it for a live feed.
    max_event_lead_s: float | None = None
    # Events dated before their admission, or this long after it, are dead-lettered.
    max_stay_days: float = 400.0
    # Dead letters carry the event's reason, place and hash; its bytes only when asked.
    dead_letter_payload: bool = False
    # Most admissions in one scoring batch, and how long a change may wait for a batch to
    # fill while events keep coming. 0: scored at once when no batch is in flight, what
    # comes meanwhile makes the next batch (lowest latency; batches still grow with load).
    max_batch: int = 256
    max_wait_ms: int = 0
    # Each score comes with its data freshness, and its reasons (the cached scorer's
    # m3t_explain) just after it is written, on a thread off the scoring path.
    explanations: bool = True
    # A score this close to the previous one keeps that one's reasons (new ones cost ~12 scores).
    explain_min_change: float = 0.01
    # Most of its time the reasons' thread spends explaining (it sleeps the rest), so reasons
    # fall behind under a load the machine cannot explain, never the scores.
    explain_share: float = Field(0.5, gt=0.0, le=1.0)


class IngestSettings(BaseModel):
    # The HL7 v2 MLLP listener (m3t ingest mllp); 2575 is HL7's port, in the project's range.
    mllp_host: str = "127.0.0.1"
    mllp_port: int = 12575
    # A larger frame is refused and its connection closed.
    mllp_max_frame_bytes: int = 1024 * 1024
    # A connection silent this long, or a frame unfinished this long, is closed.
    mllp_idle_timeout_s: float = 60.0
    # No ACK unless Kafka acknowledged a message's records within this time (the sender resends).
    mllp_kafka_timeout_s: float = 10.0
    # POST /fhir: a larger Bundle is refused (413); no answer but 503 unless Kafka
    # acknowledged a Bundle's events within this time (the sender resends).
    fhir_max_bundle_bytes: int = 8 * 1024 * 1024
    fhir_kafka_timeout_s: float = 10.0


class AlertRule(BaseModel):
    """When a ward's patient alerts (``stream.alert_rules``): any criterion set raises it; it
    clears once none holds even with ``hysteresis`` taken off each line."""

    model_config = {"frozen": True}
    # Raise at this mortality probability or above; clear below threshold - hysteresis.
    threshold: float | None = 0.5
    # Raise when the probability rose this much above its lowest within window_h hours.
    rise: float | None = None
    window_h: float = 24.0
    # Raise when among the ward's k highest current probabilities.
    top_k: int | None = None
    hysteresis: float = 0.05
    # No new alert sooner than this after the last one was raised (by feature time).
    min_interval_h: float = 6.0
    # Recorded (Redis, the alerts topic) but not shown: to validate a rule before using it.
    silent: bool = False

    @model_validator(mode="after")
    def _can_fire_and_clear(self) -> AlertRule:
        """A rule that could never raise, or never clear, is refused where it is read."""
        if self.threshold is None and self.rise is None and self.top_k is None:
            raise ValueError("an alert rule needs a threshold, a rise or a top_k")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError("threshold is a probability in (0, 1], not a percentage")
        if self.rise is not None and not 0.0 < self.rise <= 1.0:
            raise ValueError("rise is a probability difference in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k is at least 1")
        if not 0.0 <= self.hysteresis < min(v for v in (self.threshold, self.rise, 1.0) if v):
            raise ValueError("hysteresis must be below the threshold and the rise")
        if self.window_h <= 0 or self.min_interval_h < 0:
            raise ValueError("window_h must be positive and min_interval_h not negative")
        return self


class AlertSettings(BaseModel):
    # Rules per ward (the score's careunit); "" is the default, for any other or no ward.
    rules: dict[str, AlertRule] = Field(default_factory=lambda: {"": AlertRule()})

    def rule(self, ward: str) -> AlertRule:
        return self.rules.get(ward) or self.rules.get("") or AlertRule()


class ImageSettings(BaseModel):
    # X-ray URIs resolve only under these folders (empty: the state and data folders).
    roots: tuple[Path, ...] = ()
    max_bytes: int = 64 * 1024 * 1024
    # A read that stalls this long (a FIFO, a hung network mount) fails instead of blocking.
    read_timeout_s: float = 5.0
    # DICOM headers are checked before any pixel is decoded.
    max_side: int = 8192
    max_frames: int = 4
    # A missing file may still be on its way: retried this long, then scored as absent.
    missing_retry_s: float = 600.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="M3T_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    state_dir: Path = PROJECT_ROOT / ".m3t"
    data_dir: Path = PROJECT_ROOT.parent / "shared" / "data"
    model_repo: Path = PROJECT_ROOT / "model_repo"
    # Jars and other downloads that outlive a clone's state directory.
    cache_dir: Path = Path.home() / ".cache" / "m3t"
    # Run and use the local clusters (`m3t services up --cluster`): Kafka's and Redis's
    # ``cluster`` settings follow it.
    cluster: bool = False

    redis: RedisSettings = Field(default_factory=RedisSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)

    @model_validator(mode="before")
    @classmethod
    def _clusters_follow(cls, data):
        """``cluster`` sets Kafka's and Redis's ``cluster`` (M3T_CLUSTER=1 is all it takes)."""
        if not isinstance(data, dict) or str(data.get("cluster", "")).lower() not in TRUE:
            return data
        data = dict(data)
        for group in ("kafka", "redis"):
            given = data.get(group) or {}
            if isinstance(given, BaseModel):
                given = dict(given)
            data[group] = {**given, "cluster": True}
        return data

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / "secrets"

    @property
    def image_roots(self) -> tuple[Path, ...]:
        return self.images.roots or (self.state_dir, self.data_dir)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
