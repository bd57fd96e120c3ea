#!/usr/bin/env bash
# banger's test suite: installs what the tests need (Debian/Ubuntu packages), builds the
# workspace and the static guest agent, then runs every test. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=(e2fsprogs)
missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

cargo build --workspace --all-targets --locked
cargo test --workspace --locked -- --test-threads="${BANGER_TEST_THREADS:-2}"
