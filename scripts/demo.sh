#!/usr/bin/env bash
# memc's main job on the embedded examples: import a real exported Llama, show what it recognises
# in one model of each of 16 Hugging Face families (the zoo), evaluate every example
# model (Llama, GPT-2, BERT, Qwen2 from both of PyTorch's ONNX exporters) against onnxruntime,
# compile the Llama's training step under each memory policy (remat none/auto/full, a 50%
# activation budget, Mixture-of-Channels, reversible MEFT layers) and print its memory table, then
# train it a few steps and compare the losses with PyTorch's; split a deeper Llama into pipeline
# stages and train it pipelined, in one process, one process per stage and as an executable;
# fine-tune GPT-2 on bundled prompt/response text (memc data, masked labels, a cosine schedule,
# gradient accumulation) and load the result with transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -q -p memc -p memc-runtime   # memc and libmemc_runtime.a (linked into executables)
MEMC=target/release/memc
OUT=${TMPDIR:-/tmp}/memc-demo
mkdir -p "$OUT"

echo "== memc compile examples/models/llama-dynamo.onnx --shape input_ids=2x16 --report"
$MEMC compile examples/models/llama-dynamo.onnx --shape input_ids=2x16 --report --report-json "$OUT/llama-dynamo.json"
echo "   (report JSON: $OUT/llama-dynamo.json; textual IR: add --emit ir)"
echo

# One model of each family of the zoo (examples/zoo, scripts/export-zoo.py): what memc
# recognises in each, layer by layer, straight from the exporter's ops.
for family in llama mistral qwen2 qwen3 phi3 gemma gemma2 gpt2 gptneox opt bert roberta phi gptbigcode stablelm olmo; do
  model=examples/zoo/$family-eager-torchscript.onnx
  shapes=(--shape input_ids=2x16)
  case $family in
    bert) shapes+=(--shape attention_mask=2x16 --shape token_type_ids=2x16) ;;
    roberta) shapes+=(--shape attention_mask=2x16) ;;
  esac
  echo "== memc compile $model ${shapes[*]} --report   (layers)"
  $MEMC compile "$model" "${shapes[@]}" --report | sed -n '/^layers:/,/^memory plan/p' | grep -E '^(layers|  layer 0|  not)'
done
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
echo "== memc eval examples/models/llama-dynamo.onnx ... --backend cpu   (kernels generated through MLIR and LLVM)"
$MEMC eval examples/models/llama-dynamo.onnx --input input_ids=examples/models/llama-dynamo/inputs/input_ids.npy \
  --out "$OUT/llama-dynamo-cpu" --check examples/models/llama-dynamo/ref --backend cpu | grep -E '^check'

for policy in "--remat none" "--remat auto" "--remat full" "--activation-budget 0.5" "--moc-k 0.25" "--reversible meft1"; do
  tag=$(echo "$policy" | tr -d ' -.')
  echo
  echo "== memc compile examples/models/llama-dynamo.onnx --shape input_ids=2x128 --train --optimizer adamw $policy --report"
  $MEMC compile examples/models/llama-dynamo.onnx --shape input_ids=2x128 --train --optimizer adamw $policy \
    --report --report-json "$OUT/llama-train-$tag.json" --plot "$OUT/llama-train-$tag.svg" | sed -n '/^training:/,$p'
  echo "   (plot: $OUT/llama-train-$tag.svg)"
done

echo
echo "== memc plan examples/models/llama-dynamo.onnx --global-batch 8x128 --memory 5MB   (the fastest step that fits: levers searched, arenas exact, times from this machine's measured kernels)"
$MEMC plan examples/models/llama-dynamo.onnx --global-batch 8x128 --memory 5MB -o "$OUT/plan.json" --plot "$OUT/plan.svg"
$MEMC compile examples/models/llama-dynamo.onnx --plan "$OUT/plan.json" --report-json "$OUT/plan-report.json" >/dev/null
echo "   memc compile --plan $OUT/plan.json: arena $(python3 -c "import json; print(json.load(open('$OUT/plan-report.json'))['cpu_backend']['arena_bytes'])") bytes (the plan's, exactly; front: $OUT/plan.svg)"

echo
DATA=examples/models/llama-dynamo/inputs/input_ids.npy
echo "== memc compile examples/models/llama-dynamo.onnx --shape input_ids=2x16 --train --optimizer adamw --weights examples/models/llama-hf -o $OUT/llama"
echo "   (the Hugging Face checkpoint examples/models/llama-hf bound to the exported graph's parameters)"
$MEMC compile examples/models/llama-dynamo.onnx --shape input_ids=2x16 --train --optimizer adamw \
  --weights examples/models/llama-hf -o "$OUT/llama"
"$OUT/llama" info
rm -rf "$OUT/llama-ft" "$OUT/llama-ft2"
echo "== $OUT/llama train --data $DATA --steps 5 --lr 1e-3 --save $OUT/llama-ft"
"$OUT/llama" train --data $DATA --steps 5 --lr 1e-3 --save "$OUT/llama-ft"
echo "   $(ls "$OUT/llama-ft" | tr '\n' ' ')(a Hugging Face model directory)"
echo "== $OUT/llama train --data $DATA --steps 2 --lr 1e-3 --resume $OUT/llama-ft --save $OUT/llama-ft2"
"$OUT/llama" train --data $DATA --steps 2 --lr 1e-3 --resume "$OUT/llama-ft" --save "$OUT/llama-ft2"
if python3 -c "import torch, transformers" 2>/dev/null; then
  echo "== python3 scripts/hf-roundtrip.py $OUT/llama-ft2 examples/models/llama-dynamo.onnx $DATA"
  python3 scripts/hf-roundtrip.py "$OUT/llama-ft2" examples/models/llama-dynamo.onnx $DATA --memc "$MEMC" 2>/dev/null
fi
echo "== memc compile examples/models/llama-dynamo.onnx --shape input_ids=2x16 -o $OUT/llama-infer; $OUT/llama-infer infer ..."
$MEMC compile examples/models/llama-dynamo.onnx --shape input_ids=2x16 -o "$OUT/llama-infer"
"$OUT/llama-infer" infer --input input_ids=$DATA --out "$OUT/llama-infer-out"

echo
for backend in ref cpu; do
  echo "== memc train examples/models/llama-dynamo.onnx --data examples/models/llama-dynamo/inputs/input_ids.npy --steps 5 --optimizer adamw --lr 1e-3 --backend $backend"
  $MEMC train examples/models/llama-dynamo.onnx --data examples/models/llama-dynamo/inputs/input_ids.npy --steps 5 --optimizer adamw --lr 1e-3 --backend $backend
done
echo "== memc train examples/models/llama-dynamo.onnx --data $DATA --steps 5 --reversible meft1 --rev-check --lr 1e-2 --backend cpu   (adapters only; drift per layer)"
$MEMC train examples/models/llama-dynamo.onnx --data $DATA --steps 5 --reversible meft1 --rev-check --lr 1e-2 --backend cpu
echo "   PyTorch (examples/models/llama-dynamo/train_ref.json, adamw):"
python3 -c 'import json; print("  ", [round(x, 6) for x in json.load(open("examples/models/llama-dynamo/train_ref.json"))["adamw"]])'

echo
DEPTH=examples/models/depth/llama-L8.onnx
echo "== memc schedule --stages 4 --microbatches 16 --schedule v-half --svg $OUT/v-half.svg"
$MEMC schedule --stages 4 --microbatches 16 --schedule v-half --svg "$OUT/v-half.svg"
echo "== memc compile $DEPTH --shape input_ids=2x32 --train --pipeline-stages 4 --microbatches 8 --schedule v-min --report   (stage split, per-device memory)"
$MEMC compile $DEPTH --shape input_ids=2x32 --train --pipeline-stages 4 --microbatches 8 --schedule v-min --report | grep -E '^(pipeline|  device)'
# Token ids (i * 37 + 11) mod 128 as an int64 [8, 32] .npy, written with the standard library only.
python3 - "$OUT/ids8x32.npy" <<'PY'
import struct, sys
header = "{'descr': '<i8', 'fortran_order': False, 'shape': (8, 32), }"
header += " " * (63 - (10 + len(header)) % 64) + "\n"
with open(sys.argv[1], "wb") as f:
    f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
    f.write(struct.pack("<256q", *[(i * 37 + 11) % 128 for i in range(256)]))
PY
MPIRUN="mpirun --allow-run-as-root --oversubscribe"
echo "== memc train $DEPTH --data $OUT/ids8x32.npy --shape input_ids=8x32 --steps 3 --lr 1e-2   (plain, then pipelined: 2 stages x 4 microbatches, zb-h1; then one process per stage under mpirun)"
$MEMC train $DEPTH --data "$OUT/ids8x32.npy" --shape input_ids=8x32 --steps 3 --lr 1e-2
$MEMC train $DEPTH --data "$OUT/ids8x32.npy" --shape input_ids=8x32 --steps 3 --lr 1e-2 --pipeline-stages 2 --microbatches 4 --schedule zb-h1
$MPIRUN -n 2 $MEMC train $DEPTH --data "$OUT/ids8x32.npy" --shape input_ids=8x32 --steps 3 --lr 1e-2 --pipeline-stages 2 --microbatches 4 --schedule zb-h1
echo "== memc compile $DEPTH --shape input_ids=8x32 --train --pipeline-stages 2 --microbatches 4 --schedule v-half -o $OUT/piped   (each pass its own program; one thread per stage)"
$MEMC compile $DEPTH --shape input_ids=8x32 --train --pipeline-stages 2 --microbatches 4 --schedule v-half -o "$OUT/piped"
"$OUT/piped" info | grep -E '^pipeline'
"$OUT/piped" train --data "$OUT/ids8x32.npy" --steps 3 --lr 1e-2
echo "== the same executable as one process per stage (mpirun -n 2; each rank holds only its stage's weights and optimizer state; rank 0 reports)"
$MPIRUN -n 2 "$OUT/piped" train --data "$OUT/ids8x32.npy" --steps 3 --lr 1e-2 --threads 1
echo "== pipeline x data parallel: 2 stages x 2 replicas on 4 ranks, optimizer state sharded across replicas (ZeRO-1)"
$MEMC compile $DEPTH --shape input_ids=8x32 --train --optimizer adamw --pipeline-stages 2 --microbatches 2 --data-parallel 2 --schedule v-half -o "$OUT/piped-dp"
"$OUT/piped-dp" info | grep -E '^(pipeline|planned)'
$MPIRUN -n 4 "$OUT/piped-dp" train --data "$OUT/ids8x32.npy" --steps 3 --lr 1e-2 --threads 1

echo
echo "== fine-tuning on text: memc data (a Hugging Face tokenizer.json) -> labels with the prompts masked -> GPT-2 fine-tuned from its checkpoint -> transformers loads it"
$MEMC data --tokenizer examples/data/tokenizer.json --text examples/data/sft.jsonl --seq 32 --out "$OUT/sft"
$MEMC train examples/models/gpt2-dynamo.onnx --weights examples/models/gpt2-hf --shape input_ids=8x32 --backend cpu \
  --steps 6 --lr 3e-3 --lr-schedule cosine --warmup-steps 1 --grad-accum 2 \
  --data "$OUT/sft/input_ids.npy" --labels "$OUT/sft/labels.npy" --attention-mask "$OUT/sft/attention_mask.npy" \
  --save "$OUT/tuned"
if python3 -c "import transformers" 2>/dev/null; then
  python3 -c "import sys, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); print('   transformers loads', sys.argv[1], '->', type(m).__name__)" "$OUT/tuned"
fi

echo
echo "== memc toolchain   (MLIR 19, LLVM 19 for x86-64 and NVPTX, the CUDA driver)"
$MEMC toolchain
