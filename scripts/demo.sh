#!/usr/bin/env bash
# The main job on the embedded default: the founding talk's demo on a virtual node. `ocelot lab`
# builds the pods of examples/seed-demo in network namespaces it creates (and removes), runs the
# real AF_XDP dataplane on them, and probes with real traffic: first every pod pair over every
# declared port as a matrix, then the probe file. Needs root (network namespaces, XDP).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  exec sudo --preserve-env=PATH,CARGO_HOME,RUSTUP_HOME "$0" "$@"
fi
scripts/setup.sh
cargo build --release --quiet --bin ocelot --bin ocelotctl
echo "== seed demo on a virtual node: every pod pair over every declared port, from real traffic =="
target/release/ocelot lab --manifests examples/seed-demo
echo
echo "== seed demo: probes (examples/seed-demo/probes.jsonl), from real traffic =="
target/release/ocelot lab --manifests examples/seed-demo --probes examples/seed-demo/probes.jsonl
