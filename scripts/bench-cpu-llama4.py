"""CPU training step of a 4-layer, d_model 256 Llama (4 heads, 2 KV heads, d_ffn 704, vocab
32000), batch 4 x seq 128: memc's emitted executable against PyTorch eager on the same weights,
data and thread count (1), in the same run.

    python3 scripts/bench-cpu-llama4.py [--steps 6]

Generates scratch/llama4x256.onnx with scripts/gen-big-llama.py when missing, compiles it with
`memc compile --train --optimizer adamw -o scratch/llama4x256` (release build) and runs
`scratch/llama4x256 train`. memc's time is the median `step_ms` after the first step;
MEMC_PROFILE=1 is set so the executable also prints where its time goes.
"""
import argparse, json, os, statistics, subprocess, sys, time

import numpy as np
import torch

sys.path.insert(0, "scripts")
ARGS = ["--layers", "4", "--hidden", "256", "--heads", "4", "--kv-heads", "2", "--ffn", "704", "--vocab", "32000"]
ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=6)
a = ap.parse_args()
if not os.path.exists("scratch/llama4x256.onnx"):
    subprocess.run([sys.executable, "scripts/gen-big-llama.py", "scratch/llama4x256.onnx", *ARGS], check=True)
ids = np.random.default_rng(0).integers(0, 32000, (4, 128)).astype(np.int64)
np.save("scratch/ids4x128.npy", ids)
t0 = time.perf_counter()
subprocess.run(["target/release/memc", "compile", "scratch/llama4x256.onnx", "--shape", "input_ids=4x128",
                "--train", "--optimizer", "adamw", "-o", "scratch/llama4x256"], check=True)
compile_s = time.perf_counter() - t0
out = subprocess.run(["scratch/llama4x256", "train", "--data", "scratch/ids4x128.npy",
                      "--steps", str(a.steps), "--lr", "1e-3"],
                     capture_output=True, text=True, check=True, env={**os.environ, "MEMC_PROFILE": "1"})
lines = [json.loads(l) for l in out.stdout.splitlines()]
memc_ms = statistics.median(l["step_ms"] for l in lines[1:])
import importlib.util
spec = importlib.util.spec_from_file_location("gen", "scripts/gen-big-llama.py")
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)
torch.set_num_threads(1)
model = gen.build(0, 4, 256, 4, 2, 704, 32000).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
x = torch.from_numpy(ids)
times, losses = [], []
for _ in range(a.steps):
    t = time.perf_counter()
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad()
    times.append((time.perf_counter() - t) * 1e3)
    losses.append(loss.item())
torch_ms = statistics.median(times[1:])
print(f"memc compile -o: {compile_s:.1f} s")
print(f"memc executable: {memc_ms:.1f} ms/step (losses {[round(l['loss'], 4) for l in lines]})")
print(f"PyTorch eager, 1 thread: {torch_ms:.1f} ms/step (losses {[round(v, 4) for v in losses]})")
print(f"ratio memc / PyTorch: {memc_ms / torch_ms:.2f}")
print(out.stderr.strip())
