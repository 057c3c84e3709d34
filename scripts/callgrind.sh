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
#   runtime:       the same minus that of `bench_overhead publish` (the
#                  same messages published, no runtime), i.e. the
#                  consumer loop, pipeline, store and acks per message.
# Both are whole-process totals, so neither depends on inlining (collecting
# only inside some functions would lose whatever the compiler inlined into
# their callers).
#
#   KEEP=dir scripts/callgrind.sh   # also keeps the 12,000-message profiles
#                                   # (dir/cg.<mode>) for callgrind_annotate --inclusive=yes
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
  # The same target directory: dependencies are not built again (the
  # workspace's own crates are).
  cleanup() { git worktree remove --force "$tmp/src"; rm -rf "$tmp"; }
fi
trap cleanup EXIT

(cd "$src" && CARGO_TARGET_DIR=$target cargo build -q --release --no-default-features --example bench_overhead)
out=$(mktemp -d)
bin=$out/bench_overhead
cp "$target/release/examples/bench_overhead" "$bin"

# Total instructions (Ir) of one run.
count() { # mode messages
  local file=$out/cg.$1.$2
  valgrind -q --tool=callgrind --callgrind-out-file="$file" "$bin" "$1" "$2" >/dev/null
  awk '/^summary:/ { print $2 }' "$file"
}

echo "revision: ${rev:-$(git rev-parse --short HEAD)$( [ -n "$(git status --porcelain)" ] && echo ' (+ uncommitted)')}"
per_msg() { # mode
  local a b
  a=$(count "$1" 2000); b=$(count "$1" 12000)
  echo $(((b - a) / 10000))
}
base=$(per_msg publish)
for mode in single batch; do
  whole=$(per_msg "$mode")
  printf '%-6s  whole process %7d instr/msg   runtime (minus publishing, %d) %7d instr/msg\n' \
    "$mode" "$whole" "$base" $((whole - base))
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP" && cp "$out/cg.$mode.12000" "$KEEP/cg.$mode"
  fi
done
rm -rf "$out"
