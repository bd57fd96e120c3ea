#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages banger needs at run time and for its tests. Idempotent:
# only missing packages are installed.
set -euo pipefail
pkgs=(
  e2fsprogs          # mkfs.ext4 for work, upper and image disks
  qemu-system-x86    # the VMM where Firecracker or hardware KVM is missing
  mmdebstrap         # builds the default Debian image
  openssh-client     # ssh, ssh-keygen
  nftables           # NAT rules
  iproute2           # bridge and taps
  kmod               # depmod: the module indexes of --nested guests (modprobe inside them)
  gpgv               # verifies the Debian archive's signature
  debian-archive-keyring
  ca-certificates
  # for `banger kernel build` (the kernel's own build needs these besides gcc and make)
  gcc make flex bison bc libelf-dev libssl-dev xz-utils
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
