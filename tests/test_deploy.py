"""deploy/docker-compose.yml agrees with the settings' defaults: no container runtime runs
here, so its ports, topics and cluster shape are compared with ``Settings`` instead."""

from __future__ import annotations

import yaml

from m3t.settings import PROJECT_ROOT, Settings

COMPOSE = yaml.safe_load((PROJECT_ROOT / "deploy" / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DEFAULTS = Settings(cluster=True)
ENV = COMPOSE["x-m3t-env"]


def flags(command: list[str]) -> dict[str, str]:
    """``--name=value`` and ``--name value`` items of a command line, by name."""
    found = {}
    for item in command:
        if item.startswith("--"):
            name, _, value = item[2:].replace(" ", "=", 1).partition("=")
            found[name] = value
    return found


def test_the_apps_environment_names_the_default_topics_group_and_ports():
    kafka, triton, api = DEFAULTS.kafka, DEFAULTS.triton, DEFAULTS.api
    assert ENV["M3T_CLUSTER"] == "1"
    assert ENV["M3T_KAFKA__TOPIC_EVENTS"] == kafka.topic_events
    assert ENV["M3T_KAFKA__TOPIC_DEAD_LETTER"] == kafka.topic_dead_letter
    assert ENV["M3T_KAFKA__TOPIC_SCORES"] == kafka.topic_scores
    assert ENV["M3T_KAFKA__CONSUMER_GROUP"] == kafka.consumer_group
    assert int(ENV["M3T_KAFKA__PARTITIONS"]) == kafka.partitions
    assert (
        int(ENV["M3T_KAFKA__REPLICATION_FACTOR"]),
        int(ENV["M3T_KAFKA__MIN_INSYNC_REPLICAS"]),
    ) == (3, 2)
    assert kafka.replicas == (3, 2)
    assert int(ENV["M3T_TRITON__GRPC_PORT"]) == triton.grpc_port
    assert int(ENV["M3T_TRITON__HTTP_PORT"]) == triton.http_port
    assert ENV["M3T_TRITON__LAUNCHER"] == "external"
    assert int(ENV["M3T_API__PORT"]) == api.port
    # Every variable is one the settings read.
    env = {k: v for k, v in ENV.items() if k not in ("M3T_STATE_DIR", "M3T_MODEL_REPO")}
    Settings(**_as_settings(env))


def _as_settings(env: dict[str, str]) -> dict:
    """``M3T_GROUP__NAME`` variables as Settings' keyword arguments (unknown names fail)."""
    kwargs: dict = {}
    for name, value in env.items():
        group, _, field = name.removeprefix("M3T_").lower().partition("__")
        if field:
            kwargs.setdefault(group, {})[field] = value
        else:
            kwargs[group] = value
    return kwargs


def test_the_kafka_nodes_listen_on_the_cluster_ports_with_three_replicas():
    kafka = DEFAULTS.kafka
    voters = ",".join(
        f"{i + 1}@kafka-{i}:{port}" for i, port in enumerate(kafka.cluster_controller_ports)
    )
    bootstrap = []
    for i, (port, controller) in enumerate(
        zip(kafka.cluster_ports, kafka.cluster_controller_ports)
    ):
        node = SERVICES[f"kafka-{i}"]
        env = node["environment"]
        assert node["image"] == f"apache/kafka:{kafka.kafka_version}"
        assert env["KAFKA_NODE_ID"] == str(i + 1)
        assert env["KAFKA_LISTENERS"] == f"CLIENT://:{port},CONTROLLER://:{controller}"
        assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == voters
        assert env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].endswith(kafka.security_protocol)
        assert env["KAFKA_SASL_ENABLED_MECHANISMS"] == kafka.sasl_mechanism
        assert env["KAFKA_NUM_PARTITIONS"] == str(kafka.partitions)
        assert (env["KAFKA_DEFAULT_REPLICATION_FACTOR"], env["KAFKA_MIN_INSYNC_REPLICAS"]) == (
            "3",
            "2",
        )
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
        bootstrap.append(f"kafka-{i}:{port}")
    assert ENV["M3T_KAFKA__BOOTSTRAP"] == ",".join(bootstrap)


def test_the_redis_cluster_has_six_nodes_on_the_cluster_ports():
    redis = DEFAULTS.redis
    nodes = []
    for i, (port, bus) in enumerate(zip(redis.cluster_ports, redis.cluster_bus_ports)):
        command = flags(SERVICES[f"redis-{i}"]["command"])
        assert command["port"] == str(port) and command["cluster-port"] == str(bus)
        assert command["cluster-enabled"] == "yes" and command["appendonly"] == "yes"
        assert command["appendfsync"] == redis.appendfsync
        assert command["masteruser"] == redis.admin_username
        nodes.append(f"redis-{i}:{port}")
    assert ENV["M3T_REDIS__CLUSTER_NODES"] == ",".join(nodes)
    assert (
        len(Settings(redis={"cluster_nodes": ENV["M3T_REDIS__CLUSTER_NODES"]}).redis.startup_nodes)
        == 6
    )


def test_triton_serves_the_model_repo_on_the_settings_ports_with_a_gpu():
    triton = DEFAULTS.triton
    service = SERVICES["triton"]
    assert service["image"].startswith("nvcr.io/nvidia/tritonserver:")
    command = flags(service["command"])
    assert command["model-repository"] == "/models"
    assert (command["http-port"], command["grpc-port"], command["metrics-port"]) == tuple(
        str(p) for p in (triton.http_port, triton.grpc_port, triton.metrics_port)
    )
    assert "../model_repo:/models:ro" in service["volumes"]
    published = {p.split(":")[0] for p in service["ports"]}
    assert published == {str(triton.http_port), str(triton.grpc_port), str(triton.metrics_port)}
    device = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_workers_and_the_api_run_the_projects_commands():
    worker, api = SERVICES["worker"], SERVICES["api"]
    assert worker["command"] == ["m3t", "stream", "run"]
    assert "replicas" in worker["deploy"]
    assert api["command"][:3] == ["m3t", "stream", "api"]
    assert flags(api["command"])["port"] == str(DEFAULTS.api.port)
    assert api["ports"] == [f"{DEFAULTS.api.port}:{DEFAULTS.api.port}"]
    assert api["environment"]["M3T_API__TLS_CERTFILE"]  # beyond loopback: TLS only
    for name in ("worker", "api", "kafka-init", "redis-init"):
        assert SERVICES[name]["environment"]["M3T_CLUSTER"] == "1"
    assert SERVICES["kafka-init"]["command"][-1] == "kafka"
    assert SERVICES["redis-init"]["command"][-1] == "redis"


def test_the_secrets_the_compose_file_mounts_are_all_written(tmp_path):
    import re

    from m3t.services.cluster_init import write_secrets

    folder = tmp_path / "secrets"
    write_secrets(folder)
    text = (PROJECT_ROOT / "deploy" / "docker-compose.yml").read_text()
    text += (PROJECT_ROOT / "deploy" / "kafka-start.sh").read_text()
    named = set(re.findall(r"secrets/([a-z0-9.-]+)", text))
    assert {"ca.crt", "kafka-keystore.pem", "redis-users.acl", "api.key"} <= named
    assert not {name for name in named if not (folder / name).is_file()}
    users = (folder / "redis-users.acl").read_text().splitlines()
    assert [line.split()[1] for line in users] == [
        "default",
        "m3t-admin",
        "m3t-stream",
        "m3t-reader",
        "m3t-alerts",
    ]
    assert all("+wait" in line for line in users[2:])  # cluster clients' rules
