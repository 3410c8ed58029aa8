"""kcat, an independent Kafka client for tests, signed in as a role through its properties
file (``-F``): the password stays off kcat's command line.

Debian's kcat links librdkafka 2.0, whose SCRAM client cannot sign in to Kafka 4 (it sends
the server's nonce back with its own appended twice; fixed in librdkafka 2.6.1,
confluentinc/librdkafka#4895). kcat is run on the librdkafka that confluent-kafka bundles.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import confluent_kafka

from m3t.kafka import properties_file
from m3t.settings import Role, Settings

KCAT = shutil.which("kcat")


def kcat(settings: Settings, role: Role | None, *args: str, **options):
    """Run kcat as ``role`` (``None``: with no settings at all) with ``args``; ``options``
    are ``subprocess.run``'s."""
    assert KCAT, "kcat is missing: make setup installs it"
    config = ["-F", str(properties_file(settings, role))] if role else []
    env = {**os.environ, **options.pop("env", {}), "LD_LIBRARY_PATH": str(_librdkafka(settings))}
    return subprocess.run([KCAT, *config, *args], env=env, **options)


def _librdkafka(settings: Settings) -> Path:
    """A folder where confluent-kafka's librdkafka goes by the name kcat links to."""
    bundled = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    [library] = bundled.glob("librdkafka*.so*")
    folder = settings.state_dir / "kcat-librdkafka"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "librdkafka.so.1"
    if not link.exists():
        link.symlink_to(library)
    return folder
