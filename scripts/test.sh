#!/usr/bin/env bash
# memc's test suite. Installs build dependencies first (scripts/setup.sh), then:
#   scripts/test.sh          the full tier (CI): every workspace test (unit, property, text-case
#                            snapshot, CLI and end-to-end tests against onnxruntime's and
#                            PyTorch's fixtures, emitted executables)
#   scripts/test.sh fast     the fast tier for frequent runs (a few minutes once built): the
#                            library crates' unit tests and every pass's text cases
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
case "${1:-full}" in
  fast)
    cargo test -p memc-ir -p memc-passes -p memc-runtime --lib --tests -- --test-threads 2
    cargo test -p memc-tests --test passes -- --test-threads 2
    ;;
  full)
    cargo build --workspace --all-targets
    cargo test --workspace -- --test-threads 2
    ;;
  *)
    echo "usage: scripts/test.sh [fast|full]" >&2
    exit 2
    ;;
esac
