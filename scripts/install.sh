#!/usr/bin/env bash
# Installs banger on this machine and runs a first sandbox. Run as root (until the privileged
# helper lands, the daemon needs root for the bridge, taps and NAT):
#   sudo ./scripts/install.sh
# Installs packages, builds, puts banger and bangerd in $PREFIX/bin (default /usr/local) and the
# guest agent in $PREFIX/lib/banger, then runs `banger vm run --rm -- uname -a`, which pulls the
# default kernel and builds the default image on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo ./scripts/install.sh)" >&2
  exit 1
fi
prefix="${PREFIX:-/usr/local}"
./scripts/deps.sh
./scripts/build.sh
install -d "$prefix/bin" "$prefix/lib/banger"
# A running daemon keeps the old binary; stop it first (VMs keep running).
if [ -x "$prefix/bin/banger" ]; then "$prefix/bin/banger" daemon stop >/dev/null 2>&1 || true; fi
install -m 0755 target/release/banger target/release/bangerd "$prefix/bin/"
install -m 0755 target/x86_64-unknown-linux-gnu/release/banger-agent "$prefix/lib/banger/"
echo "installed banger and bangerd in $prefix/bin, the guest agent in $prefix/lib/banger"
exec "$prefix/bin/banger" vm run --rm -- uname -a
