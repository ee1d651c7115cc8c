#!/usr/bin/env bash
# The main job on the embedded default: the founding talk's demo, its policy verdicts as a
# matrix and for the probe file, answered by the compiled tables.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet --bin ocelotctl
echo "== seed demo: every pod pair over every declared port =="
target/release/ocelotctl policy verdicts --manifests examples/seed-demo
echo
echo "== seed demo: probes (examples/seed-demo/probes.jsonl) =="
target/release/ocelotctl policy verdicts --manifests examples/seed-demo --probes examples/seed-demo/probes.jsonl
