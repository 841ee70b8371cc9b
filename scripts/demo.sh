#!/usr/bin/env bash
# memc's main job on the embedded examples: import a real exported Llama, show its graph and
# report, then evaluate every example model (Llama, GPT-2, BERT, Qwen2 from both of PyTorch's
# ONNX exporters) and check the outputs against onnxruntime.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -q -p memc
MEMC=target/release/memc
OUT=${TMPDIR:-/tmp}/memc-demo
mkdir -p "$OUT"

echo "== memc compile examples/models/llama-dynamo.onnx --shape input_ids=2x16 --report"
$MEMC compile examples/models/llama-dynamo.onnx --shape input_ids=2x16 --report --report-json "$OUT/llama-dynamo.json"
echo "   (report JSON: $OUT/llama-dynamo.json; textual IR: add --emit ir)"
echo

for model in examples/models/*.onnx; do
  name=$(basename "$model" .onnx)
  inputs=()
  for f in "examples/models/$name/inputs/"*.npy; do
    inputs+=(--input "$(basename "$f" .npy)=$f")
  done
  echo "== memc eval $model ${inputs[*]} --check examples/models/$name/ref"
  $MEMC eval "$model" "${inputs[@]}" --out "$OUT/$name" --check "examples/models/$name/ref" | grep -E '^(graph|logits|check)'
done

echo
echo "== memc toolchain   (the MLIR/LLVM code generation path later releases build kernels on)"
$MEMC toolchain
