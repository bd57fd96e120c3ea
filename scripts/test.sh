#!/usr/bin/env bash
# banger's test suite: installs what the tests need, builds the workspace and the static guest
# agent, then runs every test (real-guest tests boot VMs under QEMU and need root; they print
# SKIP otherwise). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked -p banger-agent --target x86_64-unknown-linux-gnu
cargo build --workspace --all-targets --locked
# --nocapture: tests that cannot run here print "SKIP: <reason>", and CI should show it.
cargo test --workspace --locked -- --test-threads="${BANGER_TEST_THREADS:-2}" --nocapture
