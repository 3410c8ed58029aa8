"""One-off set-up of clusters the project did not start (deploy/docker-compose.yml's init
jobs): ``python -m m3t.services.cluster_init kafka|redis``; and the secrets that compose file
mounts: ``python -m m3t.services.cluster_init secrets deploy/secrets``.

``kafka``: once the brokers answer, the roles' SCRAM users, the topics (replicated as the
settings say) and each role's ACLs. ``redis``: once every node answers, the slots on the
first three startup nodes and a replica of each on the others, unless already made.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from m3t.services.process import ServiceError, wait_until
from m3t.settings import Settings, get_settings


def init_kafka(settings) -> None:
    from m3t import kafka

    def answers() -> bool:
        try:
            return kafka.brokers(settings) >= settings.kafka.replicas[0]
        except Exception:  # not up yet
            return False

    if not wait_until(answers, 300, 1.0):
        raise ServiceError(f"Kafka at {settings.kafka.bootstrap_servers} did not answer")
    if kafka.authenticates(settings):
        kafka.ensure_users(settings)
    kafka.ensure_topics(settings)


def init_redis(settings) -> None:
    from m3t.services.redis_cluster import RedisCluster

    cluster = RedisCluster(settings)
    if not wait_until(cluster.answers, 300, 1.0):
        raise ServiceError(f"the Redis nodes at {settings.redis.url} did not answer")
    if cluster.known_nodes() < len(settings.redis.startup_nodes):
        cluster.create()
    if not wait_until(lambda: cluster.state()[0], 120, 0.5):
        raise ServiceError(f"the Redis Cluster did not become ready: {cluster.state()[1]}")


def write_secrets(folder: Path) -> None:
    """Everything deploy/docker-compose.yml mounts from ``folder``: the CA and the brokers',
    Redis's and the API's certificates, the users' generated passwords (where the app reads
    them: ``folder`` is its state folder's ``secrets``), Redis's ACL file, and Kafka's admin
    credential as StorageTool and the brokers take it. Existing passwords are kept."""
    from m3t import tls
    from m3t.credentials import login, write_secret
    from m3t.services.kafka_broker import AdminCredential, _escaped, _quoted
    from m3t.services.kafka_cluster import _new_cluster_id
    from m3t.services.redis_cluster import CLIENT_RULES
    from m3t.services.redis_server import ACL_RULES

    folder = folder.resolve()
    settings = Settings(state_dir=folder.parent, cluster=True)
    assert settings.secrets_dir == folder
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copy(tls.ca_file(settings), folder / "ca.crt")
    kafka_hosts = [f"kafka-{i}" for i in range(3)]
    cert, key = tls.server_certificate(settings, "kafka", kafka_hosts, client=True)
    write_secret(folder / "kafka-keystore.pem", key.read_text() + cert.read_text())
    cert, key = tls.server_certificate(settings, "api", ["api", "localhost"])
    shutil.copy(cert, folder / "api.crt")
    write_secret(folder / "api.key", key.read_bytes())

    username, password = login(settings, "kafka", "admin")
    jaas = (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f"username={_quoted(username)} password={_quoted(password)};"
    )
    write_secret(folder / "kafka-admin.jaas", _escaped(jaas))
    write_secret(folder / "kafka-super-users", f"User:{username};User:CN=kafka")
    write_secret(folder / "kafka-admin-scram", AdminCredential(settings).storage_tool_argument())
    if not (folder / "kafka-cluster-id").exists():
        write_secret(folder / "kafka-cluster-id", _new_cluster_id())

    lines = ["user default off resetpass ~* &* +@all"]
    for role, rules in ACL_RULES.items():
        name, secret = login(settings, "redis", role)
        extra = "" if role == "admin" else CLIENT_RULES
        lines.append(f"user {name} reset on >{secret} {rules}{extra}")
    write_secret(folder / "redis-users.acl", "\n".join(lines) + "\n")
    admin_password = login(settings, "redis", "admin")[1]
    write_secret(folder / "redis-masterauth.conf", f"masterauth {admin_password}\n")
    for role in ("stream", "producer", "reader"):
        login(settings, "kafka", role)  # made now, for the images to read


def main(kind: str, *args: str) -> None:
    if kind == "secrets":
        write_secrets(Path(args[0]))
        return
    {"kafka": init_kafka, "redis": init_redis}[kind](get_settings())


if __name__ == "__main__":
    main(*sys.argv[1:])
