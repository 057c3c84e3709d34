#!/usr/bin/env bash
# Makes sure the servers the test suite talks to are up: PostgreSQL, MariaDB,
# Redis, RabbitMQ, NATS (JetStream) and a Kafka-compatible broker (tansu). For each
# one: if it answers, nothing is done; if it is installed but stopped, it is
# started; if it is not installed, it is installed (Debian's packages; tansu
# with cargo install) and started. Exits non-zero when a server
# still does not answer: the server-backed tests must fail, never skip.
#
# Addresses come from the same env vars the tests read (defaults in brackets):
# DATABASE_URL [postgres://postgres@127.0.0.1:5432/postgres], MYSQL_URL
# [mysql://root@127.0.0.1:3306/test], REDIS_URL
# [redis://127.0.0.1:6379], AMQP_URL [amqp://guest:guest@127.0.0.1:5672/%2f],
# NATS_URL [nats://127.0.0.1:4222], KAFKA_BROKERS [127.0.0.1:9092]. Only local
# default ports are started here.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
APT_UPDATED=0

say() { echo "== services: $*"; }

port_open() { # host port
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && exec 3>&- 3<&- 2>/dev/null
}

wait_port() { # name host port seconds
  local i
  for ((i = 0; i < $4 * 10; i++)); do
    if port_open "$2" "$3"; then return 0; fi
    sleep 0.1
  done
  echo "!! $1 does not answer on $2:$3 after $4 s" >&2
  return 1
}

apt_install() {
  if [ "$APT_UPDATED" -eq 0 ]; then
    $SUDO apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@"
}

ensure_postgres() {
  if port_open 127.0.0.1 5432; then say "postgresql up"; return; fi
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    say "installing postgresql"
    apt_install postgresql postgresql-contrib
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -1)
  # Trust auth on loopback, as on our machines (tests connect as postgres).
  local hba="/etc/postgresql/$version/main/pg_hba.conf"
  if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    $SUDO sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nlocal all all trust' "$hba"
  fi
  say "starting postgresql $version"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_port postgresql 127.0.0.1 5432 30
}

# MariaDB (the mysql store runs on MariaDB >= 10.6): root without a password
# on loopback and a `test` database, as the tests expect.
ensure_mariadb() {
  if ! port_open 127.0.0.1 3306; then
    command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || {
      say "installing mariadb-server"
      apt_install mariadb-server
    }
    say "starting mariadb"
    $SUDO mkdir -p /run/mysqld
    $SUDO chown mysql:mysql /run/mysqld 2>/dev/null || true
    $SUDO start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    wait_port mariadb 127.0.0.1 3306 60
  else
    say "mariadb up"
  fi
  # Over TCP, root must log in without a password (Debian's root uses the
  # unix socket); through the socket as the system's root, set that up once.
  if ! mariadb -h127.0.0.1 -uroot -e "SELECT 1" >/dev/null 2>&1; then
    say "letting root in over TCP without a password"
    $SUDO mariadb -uroot -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket; FLUSH PRIVILEGES;"
  fi
  mariadb -h127.0.0.1 -uroot -e "CREATE DATABASE IF NOT EXISTS test" >/dev/null
}

ensure_redis() {
  if port_open 127.0.0.1 6379; then say "redis up"; return; fi
  command -v redis-server >/dev/null || { say "installing redis"; apt_install redis-server; }
  say "starting redis"
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port redis 127.0.0.1 6379 20
}

ensure_rabbitmq() {
  if port_open 127.0.0.1 5672; then say "rabbitmq up"; return; fi
  command -v rabbitmq-server >/dev/null || { say "installing rabbitmq"; apt_install rabbitmq-server; }
  say "starting rabbitmq"
  $SUDO rabbitmq-server -detached || true
  wait_port rabbitmq 127.0.0.1 5672 90
}

ensure_nats() {
  if port_open 127.0.0.1 4222; then say "nats up"; return; fi
  command -v nats-server >/dev/null || { say "installing nats-server"; apt_install nats-server; }
  say "starting nats-server with JetStream"
  $SUDO mkdir -p /var/lib/nats-server
  $SUDO start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  wait_port nats 127.0.0.1 4222 20
}

# Kafka: no Apache Kafka in the package registries we reach, so the tests run
# against tansu (a Kafka-compatible broker in Rust, from crates.io) with its
# in-memory storage. The first install compiles it (~17 min on 2 cores); its
# target dir is cached outside the repo so a rebuild is cheap, and the binary
# stays in ~/.cargo/bin. KAFKA_BROKERS [127.0.0.1:9092] names the broker.
TANSU_VERSION=0.6.0
ensure_kafka() {
  local brokers="${KAFKA_BROKERS:-127.0.0.1:9092}"
  local first="${brokers%%,*}"
  local host="${first%:*}" port="${first##*:}"
  if port_open "$host" "$port"; then say "kafka (tansu) up on $host:$port"; return; fi
  if [ "$host" != "127.0.0.1" ] && [ "$host" != "localhost" ]; then
    echo "!! KAFKA_BROKERS=$brokers does not answer and is not local: start it there" >&2
    return 1
  fi
  export PATH="$HOME/.cargo/bin:$PATH"
  if ! cargo install --list | grep -q "^tansu v$TANSU_VERSION:"; then
    say "installing tansu $TANSU_VERSION (cargo install; cold: ~17 min on 2 cores)"
    local started=$SECONDS
    CARGO_TARGET_DIR="${IDEM_CACHE_DIR:-$HOME/.cache/idem}/tansu-target" \
      cargo install --locked "tansu@$TANSU_VERSION" --features dynostore
    say "tansu installed in $((SECONDS - started)) s"
  fi
  say "starting tansu on 127.0.0.1:$port (memory storage)"
  mkdir -p "${IDEM_CACHE_DIR:-$HOME/.cache/idem}"
  nohup tansu broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ \
    >"${IDEM_CACHE_DIR:-$HOME/.cache/idem}/tansu.log" 2>&1 </dev/null &
  disown || true
  wait_port tansu 127.0.0.1 "$port" 30
}

ensure_postgres
ensure_mariadb
ensure_redis
ensure_rabbitmq
ensure_nats
ensure_kafka
