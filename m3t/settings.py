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

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


Role = Literal["admin", "stream", "producer", "reader"]
"""Who a client acts for: ``admin`` (services, topics, pruning), ``stream`` (the worker),
``producer`` (replay and feeds: events in), ``reader`` (the query side: scores out)."""


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

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"


class KafkaSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 19092
    controller_port: int = 19093
    partitions: int = 4
    topic_events: str = "m3t.admission-events"
    topic_dead_letter: str = "m3t.dead-letter"
    topic_scores: str = "risk-scores"
    consumer_group: str = "m3t-stream"
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
    # How long each topic keeps records: events long enough to rebuild a stay's features.
    retention_events_ms: int = 90 * 86_400_000
    retention_scores_ms: int = 7 * 86_400_000
    retention_dead_letter_ms: int = 30 * 86_400_000
    heap: str = "512m"
    # A stream worker's fetches: the broker answers once fetch_min_bytes are ready, or after
    # fetch_wait_max_ms. A short wait lets a fetch gather several events under load instead
    # of one per produce request, and a backlog fills the bytes at once; the price is an
    # empty fetch every few ms while idle (benchmarks/README.md has the figures).
    fetch_wait_max_ms: int = 5
    fetch_min_bytes: int = 1_000_000

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def topics(self) -> tuple[str, ...]:
        return (self.topic_events, self.topic_dead_letter, self.topic_scores)


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

    redis: RedisSettings = Field(default_factory=RedisSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)

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
