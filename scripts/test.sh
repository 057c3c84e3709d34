#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit + integration + trybuild UI
# tests, doctests, docs, and the quickstart's own exactly-once verification.
set -euo pipefail
cd "$(dirname "$0")/.."

# Server-backed tests fail (never skip) without their servers: make sure
# they are up (starts or installs what is missing; see the script).
./scripts/services.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (all targets, all features, -D warnings)"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
echo "== cargo test (unit, integration, trybuild UI, doctests)"
cargo test --workspace --all-features --locked
echo "== trybuild with default features (a store whose feature is off)"
cargo test --locked --test ui_features_off
echo "== cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps --locked
echo "== quickstart"
cargo run --locked --example quickstart
