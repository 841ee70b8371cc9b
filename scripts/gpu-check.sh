#!/usr/bin/env bash
# memc's GPU checks and benchmarks (issue 5), in one script, in two phases:
#
#   scripts/gpu-check.sh prepare   # here, no GPU needed: builds memc (release) and compiles
#                                  # every executable the checks run into gpu-bundle/, stripped and
#                                  # packed as gpu-bundle.tar.xz (< 64 MiB: no LLVM, no large
#                                  # weights; the big models use --random-weights)
#   scripts/gpu-check.sh           # on the GPU machine (the device tool, carry
#                                  # ["gpu-bundle.tar.xz"]): unpacks it, then
#                                  # prints one table; finishes in well under 8 minutes
#
# The run phase needs only the bundle, a CUDA driver, Python with numpy, and PyTorch for the
# baselines. It checks every example executable (and two zoo models: soft-capped, windowed
# attention) on the cuda backend against the cpu backend
# (training losses over 3 AdamW steps, inference outputs), measures the fused elementwise
# kernels' bandwidth against torch's device-to-device copy, and benchmarks a bf16 training
# step (forward + backward + AdamW) of a 12-layer d_model 768 Llama at batch 8 x seq 1024
# against PyTorch eager and torch.compile in the same run. Pipelined steps (2 stages, data
# parallel, both) train on the cuda backend like the cpu backend, in one process and under
# mpirun when the machine has it.
set -euo pipefail
cd "$(dirname "$0")/.."
B=gpu-bundle
# The example executables checked cuda against cpu: the four example families, and zoo models
# whose attention kernels have soft-capping and sliding windows (Gemma 2, Mistral).
MODELS="models/llama-dynamo models/gpt2-dynamo models/qwen2-dynamo models/bert-dynamo zoo/gemma2-eager-torchscript zoo/mistral-eager-torchscript"

if [ "${1:-}" = "prepare" ]; then
  scripts/setup.sh
  cargo build --release -q -p memc -p memc-runtime
  M=target/release/memc
  rm -rf "$B"
  mkdir -p "$B/data" scratch
  for src in $MODELS; do
    name=$(basename "$src")
    shapes=(--shape input_ids=2x16)
    [ "$name" = bert-dynamo ] && shapes+=(--shape attention_mask=2x16 --shape token_type_ids=2x16)
    $M compile "examples/$src.onnx" "${shapes[@]}" --target all -o "$B/$name-infer" 2>/dev/null
    $M compile "examples/$src.onnx" "${shapes[@]}" --train --optimizer adamw --clip-grad-norm 1.0 \
      --target all -o "$B/$name-train" 2>/dev/null
    cp -r "examples/$src/inputs" "$B/data/$name"
  done
  [ -f scratch/eltwise.onnx ] || python3 scripts/gen-elementwise.py scratch/eltwise.onnx
  $M compile scratch/eltwise.onnx --target all -o "$B/eltwise" 2>/dev/null
  rm "$B/eltwise.safetensors"
  [ -f scratch/llama12x768.onnx ] || python3 scripts/gen-big-llama.py scratch/llama12x768.onnx \
    --layers 12 --hidden 768 --heads 12 --kv-heads 12 --ffn 2048 --vocab 32000
  $M compile scratch/llama12x768.onnx --shape input_ids=8x1024 --train --optimizer adamw --dtype bf16 \
    --target all -o "$B/llama12-bf16"
  rm "$B/llama12-bf16.safetensors"
  # Remat policies (issue 7): per-layer checkpointing and auto at 50% of the no-remat bytes;
  # Mixture-of-Channels (issue 8): K 384 of 2048; reversible layers (issue 9): MEFT1 on the
  # first 2 layers (adapters only; deeper stacks drift too far in bf16, BENCHMARKS.md).
  for v in "full:--remat full" "b50:--activation-budget 0.5" "moc:--moc-k 384" "rev:--reversible meft1 --rev-layers 2"; do
    $M compile scratch/llama12x768.onnx --shape input_ids=8x1024 --train --optimizer adamw --dtype bf16 \
      ${v#*:} --target all -o "$B/llama12-bf16-${v%%:*}"
    rm "$B/llama12-bf16-${v%%:*}.safetensors"
  done
  # Pipelined steps (issue 22): each stage's passes on its own stream; in one process the
  # stages share the GPU, under mpirun each rank opens its GPU (here all the same one).
  for v in "llama:depth/llama-L4:v-half:2:1" "gpt2:gpt2-dynamo:zb-h1:2:1" "llama-dp:depth/llama-L4:1f1b:1:2" "llama-2x2:depth/llama-L4:1f1b:2:2"; do
    IFS=: read -r tag src sched p d <<< "$v"
    $M compile "examples/models/$src.onnx" --shape input_ids=8x16 --train --optimizer adamw \
      --pipeline-stages "$p" --data-parallel "$d" --microbatches 2 --schedule "$sched" \
      --target all -o "$B/pipe-$tag" 2>/dev/null
  done
  $M compile scratch/llama12x768.onnx --shape input_ids=8x1024 --train --optimizer adamw --dtype bf16 \
    --pipeline-stages 2 --microbatches 4 --schedule 1f1b --target all -o "$B/llama12-bf16-pipe2"
  rm "$B/llama12-bf16-pipe2.safetensors"
  python3 - "$B" <<'EOF'
import sys, numpy as np
b = sys.argv[1]
rng = np.random.default_rng(0)
np.save(f"{b}/data/ids8x1024.npy", rng.integers(0, 32000, (8, 1024)).astype(np.int64))
np.save(f"{b}/data/ids8x16-llama.npy", rng.integers(0, 128, (8, 16)).astype(np.int64))
np.save(f"{b}/data/ids8x16-gpt2.npy", rng.integers(0, 256, (8, 16)).astype(np.int64))
np.save(f"{b}/data/one.npy", np.ones(1, np.float32))
EOF
  cp scripts/bench-gpu-torch.py "$B/"
  # Symbols are a third of each executable; the executables share their runtime, which xz's
  # large window stores once (gzip: 32 MB, xz: 6 MB), so the bundle and the working tree fit
  # the 64 MiB a device call carries.
  find "$B" -maxdepth 1 -type f -perm -u+x -exec strip {} +
  tar -cf - "$B" | xz -9 -T0 > "$B.tar.xz"
  du -sh "$B" "$B.tar.xz"
  echo "now run on the GPU machine: scripts/gpu-check.sh (carry gpu-bundle.tar.xz)"
  exit 0
fi

if [ ! -d "$B" ] && [ -f "$B.tar.xz" ]; then
  tar -xJf "$B.tar.xz"
fi
if [ ! -d "$B" ]; then
  echo "gpu-check: $B/ is missing: run scripts/gpu-check.sh prepare first (on the build machine)" >&2
  exit 2
fi
if ! command -v nvidia-smi >/dev/null; then
  echo "gpu-check: no nvidia-smi: this is not a GPU machine" >&2
  exit 2
fi
# GPU_CHECK_OUT keeps each run's output and errors where the caller wants them.
T=${GPU_CHECK_OUT:-${TMPDIR:-/tmp}/memc-gpu-check}
# cuBLAS: the toolkit's or the one PyTorch's wheels bring, wherever the machine has it.
for lib in $(find /usr/local /opt /usr/lib -name 'libcublas.so.1[0-9]*' 2>/dev/null | sort -u); do
  LD_LIBRARY_PATH="$(dirname "$lib"):${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH
# Every run has a time limit, so that a hang costs one row of the table, not the whole run.
t() { timeout "$@"; }
rm -rf "$T"
mkdir -p "$T"
echo "== $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
status=0

echo "== cuda vs cpu: example executables"
for src in $MODELS; do
  name=$(basename "$src")
  d=$B/data/$name
  fixed=()
  [ "$name" = bert-dynamo ] && fixed=(--input "attention_mask=$d/attention_mask.npy" --input "token_type_ids=$d/token_type_ids.npy")
  inputs=(--input "input_ids=$d/input_ids.npy" "${fixed[@]}")
  for backend in cpu cuda; do
    if ! t 120 "$B/$name-train" train --data "$d/input_ids.npy" "${fixed[@]}" --steps 3 --backend $backend \
        > "$T/$name-train-$backend.jsonl" 2> "$T/$name-train-$backend.err"; then
      echo "   $name train --backend $backend FAILED: $(tail -1 "$T/$name-train-$backend.err")"
      status=1
    fi
    if ! t 60 "$B/$name-infer" infer "${inputs[@]}" --out "$T/$name-$backend" --backend $backend 2> "$T/$name-infer-$backend.err"; then
      echo "   $name infer --backend $backend FAILED: $(tail -1 "$T/$name-infer-$backend.err")"
      status=1
    fi
  done
  python3 - "$T" "$name" <<'EOF' || status=1
import json, sys, glob, os, numpy as np
t, name = sys.argv[1:]
def losses(b):
    p = f"{t}/{name}-train-{b}.jsonl"
    return [json.loads(l)["loss"] for l in open(p)] if os.path.exists(p) else []
cpu, cuda = losses("cpu"), losses("cuda")
worst = max((abs(a - b) / abs(b) for a, b in zip(cuda, cpu)), default=float("nan"))
out = []
for f in glob.glob(f"{t}/{name}-cpu/*.npy"):
    g = f.replace(f"{name}-cpu", f"{name}-cuda")
    if os.path.exists(g):
        a, b = np.load(g), np.load(f)
        out.append(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)))
inf = max(out, default=float("nan"))
ok = len(cuda) == 3 and worst <= 1e-4 and out and inf <= 1e-4
print(f"   {name:<14} training losses cuda vs cpu: max rel {worst:.2e}  inference outputs: max rel {inf:.2e}  {'ok' if ok else 'MISMATCH'}")
sys.exit(0 if ok else 1)
EOF
done

echo "== pipelined steps: cuda vs cpu (one process: the stages as streams of one GPU; mpirun: a GPU per rank)"
MPIRUN=()
if command -v mpirun >/dev/null; then
  MPIRUN=(mpirun --allow-run-as-root --oversubscribe)
fi
for v in llama:2:1 gpt2:2:1 llama-dp:1:2 llama-2x2:2:2; do
  IFS=: read -r tag p d <<< "$v"
  data="$B/data/ids8x16-${tag%%-*}.npy"
  runs=()
  [ "$d" = 1 ] && runs+=(cpu cuda)
  [ ${#MPIRUN[@]} -gt 0 ] && runs+=(mpi-cpu mpi-cuda)
  [ ${#runs[@]} -eq 0 ] && { echo "   pipe-$tag: needs mpirun (not on this machine)"; continue; }
  for r in "${runs[@]}"; do
    launch=()
    [ "${r#mpi-}" != "$r" ] && launch=("${MPIRUN[@]}" -n $((p * d)))
    if ! t 120 "${launch[@]}" "$B/pipe-$tag" train --data "$data" --steps 3 --lr 1e-2 --backend "${r#mpi-}" \
        > "$T/pipe-$tag-$r.jsonl" 2> "$T/pipe-$tag-$r.err"; then
      echo "   pipe-$tag $r FAILED: $(grep -m1 '^error' "$T/pipe-$tag-$r.err" || tail -1 "$T/pipe-$tag-$r.err")"
      status=1
    fi
  done
  python3 - "$T" "pipe-$tag" "${runs[*]}" <<'EOF' || status=1
import json, sys, os
t, name, runs = sys.argv[1], sys.argv[2], sys.argv[3].split()
def losses(r):
    p = f"{t}/{name}-{r}.jsonl"
    return [json.loads(l)["loss"] for l in open(p) if l.startswith("{")] if os.path.exists(p) else []
base = "cpu" if "cpu" in runs else "mpi-cpu"
want = losses(base)
rows, ok = [], len(want) == 3
for r in runs:
    got = losses(r)
    worst = max((abs(a - b) / abs(b) for a, b in zip(got, want)), default=float("nan"))
    ok = ok and len(got) == 3 and worst <= 1e-4
    rows.append(f"{r} {worst:.1e}")
print(f"   {name:<16} losses vs {base}: {', '.join(rows)}  {'ok' if ok else 'MISMATCH'}")
sys.exit(0 if ok else 1)
EOF
done
echo "== Llama 12 x d768 bf16, 2 pipeline stages (1F1B, 4 microbatches) as streams of one GPU"
if t 150 "$B/llama12-bf16-pipe2" train --random-weights 0 --data "$B/data/ids8x1024.npy" --steps 6 --backend cuda \
    > "$T/llama12-pipe2.jsonl" 2> "$T/llama12-pipe2.err"; then
  python3 - "$T/llama12-pipe2.jsonl" <<'EOF'
import json, statistics, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
ms = statistics.median(l["step_ms"] for l in lines[2:])
print(json.dumps({"mode": "memc pipelined 2 stages 1f1b", "step_ms": round(ms, 2), "tokens_per_s": round(8192 / ms * 1e3),
                  "loss": round(lines[-1]["loss"], 4)}))
EOF
else
  echo "   llama12 pipelined FAILED: $(tail -1 "$T/llama12-pipe2.err")"
  status=1
fi

echo "== fused elementwise bandwidth (y = silu(w*x) + w, 2^26 f32: 5 x 256 MiB moved per run)"
if MEMC_PROFILE=1 t 120 "$B/eltwise" infer --random-weights 0 --input "x=$B/data/one.npy" --out "$T/eltwise" \
    --backend cuda --repeat 20 2> "$T/eltwise.err"; then
  python3 - "$T/eltwise.err" <<'EOF'
import re, sys, torch
text = open(sys.argv[1]).read()
ms = float(re.search(r"fused elementwise\s+([\d.]+) ms", text).group(1))
calls = int(re.search(r"fused elementwise\s+[\d.]+ ms\s+[\d.]+%\s+(\d+) calls", text).group(1))
runs = calls / 2
gbs = 5 * 2**28 / (ms / runs / 1e3) / 1e9
x = torch.empty(2**28 // 4 * 2, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(20): y.copy_(x)
e.record(); torch.cuda.synchronize()
copy = 2 * x.numel() * 4 / (s.elapsed_time(e) / 20 / 1e3) / 1e9
print(f"   memc fused elementwise: {gbs:.0f} GB/s; torch copy: {copy:.0f} GB/s; ratio {gbs / copy:.2f} (goal >= 0.80)")
EOF
else
  echo "   eltwise FAILED: $(tail -1 "$T/eltwise.err")"
  status=1
fi

# The default compile, then the variants (full: --remat full; b50: --activation-budget 0.5;
# moc: --moc-k 384; rev: --reversible meft1 --rev-layers 2); one JSON line each, the default one
# followed by its kernel profile.
for v in "" full b50 moc rev; do
  exe="$B/llama12-bf16${v:+-$v}"
  echo "== Llama 12 x d768, batch 8 x seq 1024, bf16 (fp32 master weights), AdamW, memc ${v:-default}"
  if t 150 "$exe" train --random-weights 0 --data "$B/data/ids8x1024.npy" --steps 8 --backend cuda \
      > "$T/llama12$v.jsonl" 2> "$T/llama12$v.err"; then
    python3 - "$T/llama12$v.jsonl" "memc${v:+ $v}" <<'EOF'
import json, statistics, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
ms = statistics.median(l["step_ms"] for l in lines[2:])
print(json.dumps({"mode": sys.argv[2], "step_ms": round(ms, 2), "tokens_per_s": round(8192 / ms * 1e3),
                  "peak_bytes": lines[-1]["peak_bytes"], "loss": round(lines[-1]["loss"], 4)}))
EOF
    if [ -z "$v" ]; then
      MEMC_PROFILE=1 t 90 "$exe" train --random-weights 0 --data "$B/data/ids8x1024.npy" --steps 2 \
        --backend cuda 2>&1 >/dev/null | sed 's/^/   /' | head -14
    fi
  else
    echo "   memc llama12 ${v:-default} FAILED: $(tail -1 "$T/llama12$v.err")"
    status=1
  fi
done
t 240 python3 "$B/bench-gpu-torch.py" --steps 10 || status=1
exit $status
