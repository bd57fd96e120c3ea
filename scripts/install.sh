#!/usr/bin/env bash
# Builds banger and installs its binaries into ~/.local/bin (or $BANGER_PREFIX/bin).
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${BANGER_PREFIX:-$HOME/.local}"
cargo build --release --locked -p banger-cli -p banger-daemon
install -d "$prefix/bin"
install -m 0755 target/release/banger target/release/bangerd "$prefix/bin/"
echo "installed banger and bangerd into $prefix/bin"
