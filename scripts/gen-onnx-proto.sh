#!/usr/bin/env bash
# Regenerates frontend/src/proto.rs (prost 0.14 code, bytes fields as
# bytes::Bytes) from the vendored frontend/proto/onnx.proto.
#
# Usage:
#   scripts/gen-onnx-proto.sh              # regenerate from the committed proto
#   scripts/gen-onnx-proto.sh --from-pip   # first re-copy onnx.proto from the
#                                          # installed `onnx` Python package
#                                          # (pip install onnx==$ONNX_VERSION)
#
# Uses protoc from the protoc-bin-vendored crate; no system protoc needed.
set -euo pipefail

# ONNX release the vendored frontend/proto/onnx.proto was taken from.
ONNX_VERSION="1.23.2"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PROTO=frontend/proto/onnx.proto
OUT=frontend/src/proto.rs

if [[ "${1:-}" == "--from-pip" ]]; then
    PY="${PYTHON:-python3}"
    installed="$("$PY" -c 'import onnx; print(onnx.__version__)')"
    if [[ "$installed" != "$ONNX_VERSION" ]]; then
        echo "error: installed onnx is $installed, expected $ONNX_VERSION (update ONNX_VERSION in $0 to bump)" >&2
        exit 1
    fi
    src="$("$PY" -c 'import os, onnx; print(os.path.join(os.path.dirname(onnx.__file__), "onnx.proto"))')"
    cp "$src" "$PROTO"
    echo "copied $src -> $PROTO"
fi

cargo run --quiet --release \
    --manifest-path tools/onnx-proto-gen/Cargo.toml \
    --target-dir "$ROOT/target/proto-gen" \
    -- "$PROTO" "$OUT" "$ONNX_VERSION"
