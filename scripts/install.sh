#!/usr/bin/env bash
# Installs banger on this machine and runs a first sandbox. Run as root: this quick setup runs
# the daemon as root; `banger system install --owner USER` afterwards splits it into an
# unprivileged daemon and the root helper (systemd units).
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
install -m 0755 target/release/banger target/release/bangerd target/release/banger-helper "$prefix/bin/"
install -m 0755 target/x86_64-unknown-linux-gnu/release/banger-agent "$prefix/lib/banger/"
echo "installed banger, bangerd and banger-helper in $prefix/bin, the guest agent in $prefix/lib/banger"
echo "(least privilege: banger system install --owner USER runs bangerd as USER and only banger-helper as root)"
exec "$prefix/bin/banger" vm run --rm -- uname -a
