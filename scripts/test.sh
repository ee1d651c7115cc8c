#!/usr/bin/env bash
# Every test: unit, property, integration and CLI tests of the workspace, then a short fuzz run
# of each cargo-fuzz target. Set OCELOT_FUZZ_SECONDS=0 to skip fuzzing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

cargo build --workspace --all-targets --quiet
cargo test --workspace --no-fail-fast

fuzz_seconds="${OCELOT_FUZZ_SECONDS:-30}"
if [ "$fuzz_seconds" -gt 0 ] && [ -d fuzz ]; then
  if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --quiet
  fi
  # Only stable Rust is installed; cargo-fuzz needs nightly flags, which RUSTC_BOOTSTRAP allows.
  for target in $(cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz list); do
    echo "fuzz: $target for ${fuzz_seconds}s"
    (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- -max_total_time="$fuzz_seconds" -rss_limit_mb=4096 2>&1 | tail -n 3)
  done
fi
