#!/usr/bin/env bash
# The benchmarks in one command: builds the bench examples (release), runs
# them against the local servers, writes CSV and logs to target/bench/ and
# the plots to docs/perf/*.png (scripts/plot.py, matplotlib in a venv under
# target/). docs/PERFORMANCE.md reads these.
#
#   scripts/bench.sh --quick   # a few minutes: fewer messages and rounds
#   scripts/bench.sh           # full: more rounds, the PostgreSQL soak too
#
# Each figure is a median of interleaved rounds; ratios (idem / hand loop /
# the store's own tool) are taken side by side in the same run, which is
# what a shared or loaded machine can still measure.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=full
QUICK=()
if [ "${1:-}" = "--quick" ]; then MODE=quick; QUICK=(--quick); fi
OUT=target/bench
mkdir -p "$OUT" docs/perf
rm -f "$OUT"/*.csv "$OUT"/*.txt
say() { echo "== bench ($MODE): $*"; }

scripts/services.sh

FEATURES=sqlite,postgres,mysql,redis,redis-streams,nats,rabbitmq,kafka
say "building"
cargo build --release --features "$FEATURES" \
  --example bench_stores --example bench_soak --example bench_brokers \
  --example bench_postgres --example bench_redis
BIN=target/release/examples

say "python venv (Powertools, matplotlib)"
if [ ! -x target/bench-venv/bin/python ]; then python3 -m venv target/bench-venv; fi
target/bench-venv/bin/pip install -q -r benches/requirements.txt
PY=target/bench-venv/bin/python

{
  echo "date: $(date -u +%FT%TZ)"
  echo "mode: $MODE"
  echo "commit: $(git rev-parse --short HEAD)"
  echo "cpus: $(nproc)"
  grep -m1 'model name' /proc/cpuinfo || true
  free -m | sed -n 2p
  echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "kernel: $(uname -r)"
  echo "rustc: $(rustc --version)"
  psql -h 127.0.0.1 -U postgres -Atc 'select version()' 2>/dev/null | head -1 || true
  redis-server --version 2>/dev/null || true
  mysql --version 2>/dev/null || true
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

say "store matrix and sweep (bench_stores)"
BENCH_CSV="$OUT/stores.csv" "$BIN/bench_stores" "${QUICK[@]}" 2>&1 | tee "$OUT/stores.txt" || say "bench_stores: a store failed (see above); going on"

say "Powertools (Python) on Redis, serial"
if [ "$MODE" = quick ]; then PT_N=2000; else PT_N=10000; fi
"$PY" -W ignore benches/powertools/idempotency_redis.py "$PT_N" "$OUT/powertools.csv" | tee "$OUT/powertools.txt"

say "end to end through the brokers (bench_brokers)"
# 50,000 messages: at 10,000 the batch stages last under a second and their
# start (subscription, first fetch) weighs on the rate. Kafka 10,000: tansu
# 0.6 (memory storage) stopped answering the producer at 20,000-50,000.
if [ "$MODE" = quick ]; then BR_N=2000; KAFKA_N=2000; else BR_N=50000; KAFKA_N=10000; fi
# One broker per call, each bounded: a broker that hangs does not stop the rest.
for broker in redis nats rabbitmq kafka; do
  n=$BR_N; if [ "$broker" = kafka ]; then n=$KAFKA_N; fi
  BENCH_CSV="$OUT/brokers.csv" timeout 600 "$BIN/bench_brokers" "$n" "$broker" 2>&1 \
    | grep -v 'lapin::' | tee -a "$OUT/brokers.txt" || say "bench_brokers $broker failed or timed out (see above)"
done

if [ "$MODE" = full ]; then
  say "PostgreSQL and Redis stores, idem vs the same commands by hand (bench_postgres, bench_redis)"
  "$BIN/bench_postgres" | tee "$OUT/bench_postgres.txt" || true
  "$BIN/bench_redis" | tee "$OUT/bench_redis.txt" || true
fi

say "soak: 1,000,000 messages, TTL purge on, memory store"
BENCH_CSV="$OUT/soak.csv" "$BIN/bench_soak" --store memory --messages 1000000 | tee "$OUT/soak.txt"
if [ "$MODE" = full ]; then
  say "soak: 1,000,000 messages, TTL purge on, PostgreSQL"
  BENCH_CSV="$OUT/soak.csv" "$BIN/bench_soak" --store postgres --messages 1000000 | tee -a "$OUT/soak.txt" || say "PostgreSQL soak failed or was not flat (see above)"
fi
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"

say "plots"
"$PY" scripts/plot.py "$OUT" docs/perf
say "done: $OUT/*.csv, $OUT/*.txt, docs/perf/*.png"
