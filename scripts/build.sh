#!/usr/bin/env bash
# Builds banger: the host binaries, and the guest agent as a static binary (it runs as /init
# inside every VM, with no libraries there). PROFILE=release|debug (default release).
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${PROFILE:-release}"
flag=(); [ "$profile" = release ] && flag=(--release)
cargo build "${flag[@]}" --locked -p banger-cli -p banger-daemon -p banger-helper
# --target keeps crt-static off build scripts and proc-macros.
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked -p banger-agent --target x86_64-unknown-linux-gnu
