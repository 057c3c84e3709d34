#!/usr/bin/env bash
# Instructions per message of the runtime itself (in-memory broker, memory
# store, a handler that does nothing), counted by valgrind's callgrind: stable
# where time is not on a shared machine.
#
#   scripts/callgrind.sh            # this checkout
#   scripts/callgrind.sh <git-rev>  # another revision, with this checkout's
#                                   # examples/bench_overhead.rs, for before/after
#
# For each mode (single: ack = "auto", 16 in flight; batch: ack = "batch" of
# 64) it runs examples/bench_overhead at 2,000 and 12,000 messages and prints
#   whole process: (I(12000) - I(2000)) / 10000, publishing included;
#   consumer loop: the same, collecting only inside idem_runtime::consumer
#                  (the loop and its tasks: fetch, pipeline, store, acks).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }

rev=${1:-}
src=$PWD
target=${CARGO_TARGET_DIR:-$PWD/target}
cleanup() { :; }
if [ -n "$rev" ]; then
  tmp=$(mktemp -d)
  git worktree add -q --detach "$tmp/src" "$rev"
  cp examples/bench_overhead.rs "$tmp/src/examples/"
  src=$tmp/src
  target=$tmp/target
  cleanup() { git worktree remove --force "$tmp/src"; rm -rf "$tmp"; }
fi
trap cleanup EXIT

(cd "$src" && CARGO_TARGET_DIR=$target cargo build -q --release --no-default-features --example bench_overhead)
bin=$target/release/examples/bench_overhead
out=$(mktemp -d)

# Total instructions (Ir) of one run.
count() { # mode messages [toggle]
  local file=$out/cg.$1.$2.${3:+loop}
  valgrind -q --tool=callgrind --callgrind-out-file="$file" ${3:+--toggle-collect="$3"} \
    "$bin" "$1" "$2" >/dev/null
  awk '/^summary:/ { print $2 }' "$file"
}

echo "revision: ${rev:-$(git rev-parse --short HEAD)$( [ -n "$(git status --porcelain)" ] && echo ' (+ uncommitted)')}"
for mode in single batch; do
  whole_a=$(count "$mode" 2000); whole_b=$(count "$mode" 12000)
  loop_a=$(count "$mode" 2000 '*idem_runtime::consumer::*')
  loop_b=$(count "$mode" 12000 '*idem_runtime::consumer::*')
  printf '%-6s  whole process %7d instr/msg   consumer loop %7d instr/msg\n' "$mode" \
    $(((whole_b - whole_a) / 10000)) $(((loop_b - loop_a) / 10000))
done
rm -rf "$out"
