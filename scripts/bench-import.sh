#!/usr/bin/env bash
# Import speed on a 24-layer, d_model 1024 Llama (~1.4 GB of fp32 initializers): memc's
# load + import + verify, against reading the file and against `onnx.load` on the same file,
# in the same run. The model is generated (random weights) into scratch/, never committed.
#   scripts/bench-import.sh [MODEL.onnx]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-scratch/llama24.onnx}
if [ ! -f "$MODEL" ]; then
  scripts/setup.sh --python
  mkdir -p "$(dirname "$MODEL")"
  python3 scripts/gen-big-llama.py "$MODEL"
fi
cargo build --release -q -p memc
ls -l "$MODEL"
echo "== read the file (cat > /dev/null), warm page cache"
cat "$MODEL" > /dev/null
/usr/bin/time -f "cat: %e s" cat "$MODEL" > /dev/null
echo "== memc compile --report-json (load + import + verify), 3 runs"
for _ in 1 2 3; do
  /usr/bin/time -f "memc: %e s wall, %M KB max RSS" target/release/memc compile "$MODEL" --shape input_ids=1x128 --time-passes --report-json /tmp/memc-bench-import.json
done
echo "== python onnx.load (protobuf parse, copies every initializer), same file"
python3 - "$MODEL" <<'PY'
import sys, time, onnx
t = time.perf_counter(); m = onnx.load(sys.argv[1]); dt = time.perf_counter() - t
print(f"onnx.load: {dt:.3f} s, {len(m.graph.node)} nodes, {len(m.graph.initializer)} initializers")
PY
