#!/usr/bin/env bash
# banger's test suite: installs what the tests need, builds the workspace and the static guest
# agent, then runs every test (real-guest tests boot VMs under QEMU and need root; they print
# SKIP otherwise). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
# busybox-static: the tiny image the guest agent's boot tests run as their init.
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed" || {
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends busybox-static >/dev/null
}
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked -p banger-agent --target x86_64-unknown-linux-gnu
cargo build --workspace --all-targets --locked
# A real guest kernel (Debian's cloud kernel, signature-checked) for the QEMU backend's and the
# guest agent's own boot tests; the daemon's tests provision theirs through banger itself.
kdir="${BANGER_TEST_KERNEL_DIR:-/var/tmp/banger-test-kernel}"
if [ ! -f "$kdir/vmlinux" ]; then
  rm -rf "$kdir"
  cargo run --release --locked -q -p banger-kernel --example pull -- "$kdir" >/dev/null ||
    echo "SKIP: could not pull a test kernel into $kdir; kernel-dependent backend tests will skip"
fi
if [ -f "$kdir/vmlinux" ]; then
  export BANGER_TEST_KERNEL_DIR="$kdir" BANGER_TEST_KERNEL="$kdir/vmlinux" BANGER_TEST_BUSYBOX=/bin/busybox
fi
# --nocapture: tests that cannot run here print "SKIP: <reason>", and CI should show it.
cargo test --workspace --locked -- --test-threads="${BANGER_TEST_THREADS:-2}" --nocapture
