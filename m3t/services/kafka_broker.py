"""A real single-node Apache Kafka broker in KRaft mode, run from the Maven Central jars.

Maven resolves ``org.apache.kafka:kafka_2.13`` and its log4j2 runtime (deploy/kafka/pom.xml)
into ``<cache_dir>/kafka-<version>/jars`` once; the broker then runs as the distribution's
scripts run it: ``StorageTool format --standalone`` on first start, then ``kafka.Kafka``.
"""

from __future__ import annotations

import shutil
import subprocess

from m3t.services.process import ManagedService, ServiceError
from m3t.settings import PROJECT_ROOT

POM = PROJECT_ROOT / "deploy" / "kafka" / "pom.xml"

LOG4J2 = """\
status = warn
appender.file.type = Console
appender.file.name = STDOUT
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
"""


class KafkaBroker(ManagedService):
    name = "kafka"
    start_timeout_s = 90.0

    @property
    def address(self) -> str:
        return self.settings.kafka.bootstrap_servers

    def ports(self):
        cfg = self.settings.kafka
        return [(cfg.host, cfg.port), (cfg.host, cfg.controller_port)]

    @property
    def jars(self):
        return self.settings.cache_dir / f"kafka-{self.settings.kafka.kafka_version}" / "jars"

    def ensure_jars(self) -> None:
        if any(self.jars.glob("kafka_2.13-*.jar")):
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise ServiceError(
                "Maven (mvn) is missing: it fetches the Kafka jars; run `make setup`"
            )
        self.jars.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(POM),
                "dependency:copy-dependencies",
                f"-Dkafka.version={self.settings.kafka.kafka_version}",
                f"-DoutputDirectory={self.jars}",
                "-DincludeScope=runtime",
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            shutil.rmtree(self.jars, ignore_errors=True)
            raise ServiceError(
                f"could not fetch the Kafka jars with Maven:\n{result.stdout[-2000:]}"
            )

    def prepare(self):
        java = shutil.which("java")
        if java is None:
            raise ServiceError("Java is missing: the Kafka broker needs Java 17 or newer")
        self.ensure_jars()
        cfg = self.settings.kafka
        data = self.home / "data"
        props = self.home / "server.properties"
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.bootstrap.servers={cfg.host}:{cfg.controller_port}",
                    f"listeners=PLAINTEXT://{cfg.host}:{cfg.port},CONTROLLER://{cfg.host}:{cfg.controller_port}",
                    f"advertised.listeners=PLAINTEXT://{cfg.host}:{cfg.port},CONTROLLER://{cfg.host}:{cfg.controller_port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    "inter.broker.listener.name=PLAINTEXT",
                    f"log.dirs={data}",
                    f"num.partitions={cfg.partitions}",
                    "auto.create.topics.enable=false",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=4",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    # One node: no reason to delay the first consumer group's assignment.
                    "group.initial.rebalance.delay.ms=0",
                    "",
                ]
            )
        )
        log_config = self.home / "log4j2.properties"
        log_config.write_text(LOG4J2)
        classpath = f"{self.jars}/*"
        jvm = [
            java,
            f"-Xmx{cfg.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log_config}",
            "-cp",
            classpath,
        ]
        if not (data / "meta.properties").exists():
            cluster_id = (
                subprocess.run(
                    [*jvm, "kafka.tools.StorageTool", "random-uuid"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            formatted = subprocess.run(
                [
                    *jvm,
                    "kafka.tools.StorageTool",
                    "format",
                    "--standalone",
                    "-t",
                    cluster_id,
                    "-c",
                    str(props),
                ],
                capture_output=True,
                text=True,
            )
            if formatted.returncode != 0:
                raise ServiceError(f"Kafka storage format failed:\n{formatted.stdout[-2000:]}")
        return [*jvm, "kafka.Kafka", str(props)], {}

    def ready(self):
        from m3t import kafka

        count = kafka.brokers(self.settings)
        return bool(count), f"{count} broker(s)"

    def after_start(self) -> None:
        from m3t import kafka

        kafka.ensure_topics(self.settings)
