#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test ocelot: the C/BPF toolchain the
# AF_XDP crates build with (libxdp-sys also needs libpcap-dev), iproute2, nftables, ping and
# ethtool for the namespace tests. Idempotent and quiet when everything is already there.
set -euo pipefail

packages=(clang llvm linux-libc-dev libelf-dev zlib1g-dev m4 pkg-config iproute2 nftables make libpcap-dev iputils-ping ethtool)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
