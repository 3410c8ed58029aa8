#!/bin/bash
# A Kafka node of deploy/docker-compose.yml: server.properties from the KAFKA_* variables (as
# the image's own script makes it), the admin's SCRAM sign-in from the secrets, and on first
# start a format that writes the admin's credential (only a signed-in admin makes users).
set -euo pipefail
props=/tmp/server.properties
env | grep '^KAFKA_' | grep -v '^KAFKA_HEAP_OPTS=' | while IFS='=' read -r name value; do
  echo "$(echo "${name#KAFKA_}" | tr '[:upper:]_' '[:lower:].')=${value}"
done >"$props"
{
  echo "log.dirs=/var/lib/kafka/data"
  echo "listener.name.client.scram-sha-512.sasl.jaas.config=$(cat /secrets/kafka-admin.jaas)"
  echo "super.users=$(cat /secrets/kafka-super-users)"
} >>"$props"
if [ ! -f /var/lib/kafka/data/meta.properties ]; then
  /opt/kafka/bin/kafka-storage.sh format -t "$(cat /secrets/kafka-cluster-id)" -c "$props" \
    --add-scram "$(cat /secrets/kafka-admin-scram)"
fi
exec /opt/kafka/bin/kafka-server-start.sh "$props"
