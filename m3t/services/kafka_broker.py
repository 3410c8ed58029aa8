"""A real single-node Apache Kafka broker in KRaft mode, run from the Maven Central jars.

Maven resolves ``org.apache.kafka:kafka_2.13`` and its log4j2 runtime (deploy/kafka/pom.xml)
into ``<cache_dir>/kafka-<version>/jars`` once; the broker then runs as the distribution's
scripts run it: ``StorageTool format --standalone`` on first start, then ``kafka.Kafka``.

Clients sign in on the client listener as ``settings.kafka.security_protocol`` says (SCRAM
over TLS by default) and the StandardAuthorizer lets each role do what ``m3t.kafka.grants``
allows. The controller listener takes mutual TLS only: SCRAM cannot guard it, as the
credentials live in the metadata log the controller serves. One certificate from the local
CA (``m3t.tls``) serves both listeners and is the broker's identity to its controller; the
admin's SCRAM credential is written at format time, since only a signed-in admin can make
the other users.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import shutil
import subprocess

from m3t.credentials import login, write_secret
from m3t.services.process import ManagedService, ServiceError
from m3t.settings import PROJECT_ROOT
from m3t.tls import ca_file, server_certificate

log = logging.getLogger(__name__)

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

# The broker's certificate names it CN=kafka: its principal on the controller listener.
CERTIFICATE_NAME = "kafka"
BROKER_PRINCIPAL = f"User:CN={CERTIFICATE_NAME}"


class KafkaBroker(ManagedService):
    name = "kafka"
    start_timeout_s = 90.0

    @property
    def address(self) -> str:
        return self.settings.kafka.bootstrap_servers

    # One node, its own controller: the cluster's nodes (m3t.services.kafka_cluster) say
    # otherwise.
    node_id = 1

    @property
    def listener_ports(self) -> tuple[int, int]:
        """This node's client and controller ports."""
        return self.settings.kafka.port, self.settings.kafka.controller_port

    def ports(self):
        host = self.settings.kafka.host
        return [(host, port) for port in self.listener_ports]

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

    @property
    def data(self):
        return self.home / "data"

    @property
    def formatted_with(self):
        """Which admin credential the data folder was formatted with (SCRAM's stored key:
        enough to check a password, not to sign in); an older, plaintext install left none."""
        return self.home / "admin-credential.json"

    def prepare(self):
        java = shutil.which("java")
        if java is None:
            raise ServiceError("Java is missing: the Kafka broker needs Java 17 or newer")
        if not self.settings.kafka.sasl_mechanism.startswith("SCRAM-"):
            raise ServiceError(
                "the local Kafka broker's users are SCRAM users: set kafka.sasl_mechanism to "
                "SCRAM-SHA-512 or SCRAM-SHA-256 (PLAIN is for external clusters)"
            )
        self.ensure_jars()
        self.home.chmod(0o700)  # its data folder holds the events
        props = self.home / "server.properties"
        write_secret(props, self.server_properties())  # it holds the admin's password
        log_config = self.home / "log4j2.properties"
        log_config.write_text(LOG4J2)
        jvm = [
            java,
            f"-Xmx{self.settings.kafka.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log_config}",
            "-cp",
            f"{self.jars}/*",
        ]
        if (self.data / "meta.properties").exists() and not self.formatted_with.exists():
            # An older, plaintext install formatted it with no admin, and no one could sign
            # in to make the users: its topics are made again on start, events replayed.
            log.warning("%s has no admin credential: formatting it afresh", self.data)
            shutil.rmtree(self.data)
        if (self.data / "meta.properties").exists():
            self.check_admin()
        else:
            self.format(jvm, props)
        return [*jvm, "kafka.Kafka", str(props)], {}

    def server_properties(self) -> str:
        cfg = self.settings.kafka
        client_port, controller_port = self.listener_ports
        client = f"CLIENT://{cfg.host}:{client_port}"
        controller = f"CONTROLLER://{cfg.host}:{controller_port}"
        lines = [
            "process.roles=broker,controller",
            f"node.id={self.node_id}",
            *self.quorum_properties(),
            f"listeners={client},{controller}",
            f"advertised.listeners={client},{controller}",
            "controller.listener.names=CONTROLLER",
            f"listener.security.protocol.map=CONTROLLER:SSL,CLIENT:{cfg.security_protocol}",
            "inter.broker.listener.name=CLIENT",
            *self.tls_properties(),
            *(self.sasl_properties() if cfg.security_protocol.startswith("SASL") else []),
            f"log.dirs={self.data}",
            f"num.partitions={cfg.partitions}",
            "auto.create.topics.enable=false",
            "offsets.topic.num.partitions=4",
            *self.replication_properties(),
            # Local nodes start together: no reason to delay a group's first assignment.
            "group.initial.rebalance.delay.ms=0",
        ]
        return "\n".join(lines) + "\n"

    def quorum_properties(self) -> list[str]:
        return [
            f"controller.quorum.bootstrap.servers={self.settings.kafka.host}:"
            f"{self.listener_ports[1]}"
        ]

    def replication_properties(self) -> list[str]:
        """The internal topics' replicas, and the user topics' defaults."""
        factor, in_sync = self.settings.kafka.replicas
        return [
            f"default.replication.factor={factor}",
            f"min.insync.replicas={in_sync}",
            f"offsets.topic.replication.factor={factor}",
            f"transaction.state.log.replication.factor={factor}",
            f"transaction.state.log.min.isr={in_sync}",
            f"share.coordinator.state.topic.replication.factor={factor}",
            f"share.coordinator.state.topic.min.isr={in_sync}",
        ]

    def tls_properties(self) -> list[str]:
        """One PEM keystore (key, then certificate) for both listeners; the controller's
        listener asks its clients (this broker) for theirs."""
        hosts = [self.settings.kafka.host, "localhost"]
        cert, key = server_certificate(self.settings, CERTIFICATE_NAME, hosts, client=True)
        keystore = self.home / "keystore.pem"
        write_secret(keystore, key.read_text() + cert.read_text())
        return [
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={keystore}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={ca_file(self.settings)}",
            "listener.name.controller.ssl.client.auth=required",
        ]

    def sasl_properties(self) -> list[str]:
        """SCRAM on the client listener, which is also the inter-broker one (the broker
        signs in there as the admin), and ACLs, where none found means denied."""
        mechanism = self.settings.kafka.sasl_mechanism
        username, password = login(self.settings, "kafka", "admin")
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f"username={_quoted(username)} password={_quoted(password)};"
        )
        return [
            f"sasl.enabled.mechanisms={mechanism}",
            f"sasl.mechanism.inter.broker.protocol={mechanism}",
            f"listener.name.client.{mechanism.lower()}.sasl.jaas.config={_escaped(jaas)}",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            f"super.users=User:{username};{BROKER_PRINCIPAL}",
            "allow.everyone.if.no.acl.found=false",
        ]

    def format(self, jvm: list[str], props) -> None:
        """Format the data folder, with the admin's SCRAM credential in its metadata (only a
        signed-in admin can make users, so the first one is written here)."""
        credential = AdminCredential(self.settings)
        args = ["kafka.tools.StorageTool", "format", *self.format_quorum(), "-t"]
        args.append(self.cluster_id(jvm))
        args += ["-c", str(props), "--add-scram", credential.storage_tool_argument()]
        # The credential goes in an owner-only argument file, not on the command line.
        argfile = self.home / "format.args"
        write_secret(argfile, "\n".join(map(_quoted, args)) + "\n")
        try:
            formatted = subprocess.run([*jvm, f"@{argfile}"], capture_output=True, text=True)
        finally:
            argfile.unlink()
        if formatted.returncode != 0:
            raise ServiceError(f"Kafka storage format failed:\n{formatted.stdout[-2000:]}")
        write_secret(self.formatted_with, json.dumps(credential.verifier()))

    def cluster_id(self, jvm: list[str]) -> str:
        return new_cluster_id(jvm)

    def format_quorum(self) -> list[str]:
        """How StorageTool learns the controllers: this node is the only one."""
        return ["--standalone"]

    def check_admin(self) -> None:
        """The admin's credential must be the one the data folder was formatted with: no one
        could sign in to change it."""
        recorded = json.loads(self.formatted_with.read_text())
        if not AdminCredential.is_recorded(self.settings, recorded):
            raise ServiceError(
                "the Kafka admin's user, password or SCRAM mechanism is not the one "
                f"{self.data} was formatted with: set the earlier one again, or remove that "
                "folder to format it afresh (topics are made again; replay the events)"
            )

    def ready(self):
        from m3t import kafka

        count = kafka.brokers(self.settings)
        return bool(count), f"{count} broker(s)"

    def after_start(self) -> None:
        from m3t import kafka

        if kafka.authenticates(self.settings):
            kafka.ensure_users(self.settings)
        kafka.ensure_topics(self.settings)


class AdminCredential:
    """The admin's SCRAM credential (RFC 5802) from the settings: the salted password that
    StorageTool writes into a new data folder, and the stored key that later tells whether
    a password is still the same."""

    def __init__(self, settings, salt: bytes | None = None, iterations: int = 4096):
        self.mechanism = settings.kafka.sasl_mechanism  # SCRAM-SHA-512: hashed with sha512
        self.hash = self.mechanism.removeprefix("SCRAM-").replace("-", "").lower()
        self.username, password = login(settings, "kafka", "admin")
        self.salt, self.iterations = salt or os.urandom(32), iterations
        self.salted = hashlib.pbkdf2_hmac(self.hash, password.encode(), self.salt, iterations)

    def storage_tool_argument(self) -> str:
        """``--add-scram``'s value (in base64, which has no comma: StorageTool splits on it)."""
        return (
            f"{self.mechanism}=[name={self.username},iterations={self.iterations},"
            f"salt={_b64(self.salt)},saltedpassword={_b64(self.salted)}]"
        )

    def verifier(self) -> dict:
        client_key = hmac.new(self.salted, b"Client Key", self.hash).digest()
        return {
            "user": self.username,
            "mechanism": self.mechanism,
            "iterations": self.iterations,
            "salt": _b64(self.salt),
            "stored_key": _b64(hashlib.new(self.hash, client_key).digest()),
        }

    @classmethod
    def is_recorded(cls, settings, verifier: dict) -> bool:
        """Whether the settings' admin credential is the one ``verifier`` was made of."""
        salt = base64.b64decode(verifier["salt"])
        mine = cls(settings, salt, verifier["iterations"]).verifier()
        return hmac.compare_digest(json.dumps(mine), json.dumps(verifier))


def new_cluster_id(jvm: list[str]) -> str:
    """A new KRaft cluster id, from StorageTool."""
    made = subprocess.run(
        [*jvm, "kafka.tools.StorageTool", "random-uuid"], capture_output=True, text=True, check=True
    )
    return made.stdout.strip().splitlines()[-1]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _quoted(value: str) -> str:
    """A double-quoted string, as JAAS configs and Java's argument files read one."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _escaped(value: str) -> str:
    """A .properties value: its reader takes a backslash as an escape."""
    return value.replace("\\", "\\\\").replace("\n", "\\n")
