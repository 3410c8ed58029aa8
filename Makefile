# The README's two commands: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup system-deps demo lint test test-cluster services-up services-down clean

setup: system-deps $(STAMP)

# Debian packages: the Redis server, Java for Kafka, Maven to fetch the Kafka jars, kcat
# (librdkafka's command-line client: the tests' independent producer and consumer; they run it
# on confluent-kafka's librdkafka, as Debian's 2.0 cannot sign in to Kafka 4 with SCRAM), and
# Chromium with its driver (the ward pages' browser tests).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	command -v mvn >/dev/null || missing="$$missing maven"; \
	command -v kcat >/dev/null || missing="$$missing kcat"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/m3t demo

# ruff: lint and formatting, as configured in pyproject.toml; a finding fails the tests.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

# The whole suite again on a 3-node Kafka cluster and a Redis Cluster (3 primaries, 3
# replicas) (docs/clusters.md), less the tests of a single node's own processes, ports and
# files (marked single_node); .ci/run runs it after `make test`, whose failover tests start
# clusters of their own.
CLUSTER_TESTS ?= tests
test-cluster: setup
	M3T_TEST_CLUSTER=1 $(BIN)/pytest -m "not single_node" \
		--deselect tests/test_cluster_failover.py $(CLUSTER_TESTS)

services-up: setup
	$(BIN)/m3t services up

services-down:
	$(BIN)/m3t services down

clean: services-down
	rm -rf .m3t
