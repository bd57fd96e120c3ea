#!/usr/bin/env bash
# banger's test suite: installs what the tests need, builds the workspace and the static guest
# agent, then runs every test (real-guest tests boot VMs under QEMU and need root; they print
# SKIP otherwise). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh
# Test-only packages: busybox-static (the tiny image the guest agent's boot tests run as their
# init, and the Alpine-style OCI image's userland), musl-tools (that image's musl program),
# docker-registry (the local OCI registry the pull tests push to; its own service is not wanted).
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
test_pkgs=()
for p in busybox-static musl-tools docker-registry; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || test_pkgs+=("$p")
done
if ((${#test_pkgs[@]})); then
  echo "installing: ${test_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${test_pkgs[@]}" >/dev/null
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
fi
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
