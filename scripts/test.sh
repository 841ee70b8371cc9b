#!/usr/bin/env bash
# memc's whole test suite: installs build dependencies (scripts/setup.sh), then runs every
# workspace test (unit, property, snapshot, CLI and end-to-end tests against onnxruntime).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads 2
