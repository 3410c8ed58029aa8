# The README's two commands: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup system-deps demo lint test services-up services-down clean

setup: system-deps $(STAMP)

# Debian packages: the Redis server, Java for Kafka, Maven to fetch the Kafka jars, and kcat
# (librdkafka's command-line client: the tests' independent producer and consumer; they run it
# on confluent-kafka's librdkafka, as Debian's 2.0 cannot sign in to Kafka 4 with SCRAM).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	command -v mvn >/dev/null || missing="$$missing maven"; \
	command -v kcat >/dev/null || missing="$$missing kcat"; \
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

services-up: setup
	$(BIN)/m3t services up

services-down:
	$(BIN)/m3t services down

clean: services-down
	rm -rf .m3t
