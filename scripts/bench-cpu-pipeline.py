"""Pipelined training steps on the CPU: an 8-layer, d_model 256 Llama (4 heads, d_ffn 704, vocab
2048), batch 16 x seq 128, as one emitted executable per schedule (2 stages = 2 threads, 8
microbatches; threads, then one process per stage over loopback TCP) against the unpipelined
executable and PyTorch eager (1 and 2 threads), in the same run.

    python3 scripts/bench-cpu-pipeline.py [--steps 5] [--schedules 1f1b,zb-h1,v-half]

Generates scratch/llama8x256v2k.onnx with scripts/gen-big-llama.py when missing. Each
executable comes from `memc compile MODEL --shape input_ids=16x128 --train --optimizer adamw
[--pipeline-stages 2 --microbatches 8 --schedule S] -o OUT` (release build); its time is the
median `step_ms` after the first step, and with MEMC_PROFILE=1 a pipelined executable reports
each stage's time computing, waiting for the other stage and idle at the end (the measured
bubbles). The simulated bubble is `memc schedule`'s with unit costs.
"""
import argparse, importlib.util, json, os, re, statistics, subprocess, sys, tempfile, time

import numpy as np
import torch

ARGS = ["--layers", "8", "--hidden", "256", "--heads", "4", "--kv-heads", "4", "--ffn", "704", "--vocab", "2048"]
MODEL = "scratch/llama8x256v2k.onnx"
MEMC = "target/release/memc"
ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=5)
ap.add_argument("--schedules", default="1f1b,zb-h1,v-half")
a = ap.parse_args()
os.makedirs("scratch", exist_ok=True)
if not os.path.exists(MODEL):
    subprocess.run([sys.executable, "scripts/gen-big-llama.py", MODEL, *ARGS], check=True)
tmp = tempfile.mkdtemp(prefix="memc-pipe-bench-")
ids = np.random.default_rng(0).integers(0, 2048, (16, 128)).astype(np.int64)
data = os.path.join(tmp, "ids.npy")
np.save(data, ids)


def run(name, extra, ranks=0):
    exe = os.path.join(tmp, name)
    if not os.path.exists(exe):
        subprocess.run([MEMC, "compile", MODEL, "--shape", "input_ids=16x128", "--train", "--optimizer", "adamw",
                        "-o", exe, *extra], check=True, capture_output=True)
    cmd = [exe, "train", "--data", data, "--steps", str(a.steps), "--lr", "1e-3"]
    env = {**os.environ, "MEMC_PROFILE": "1"}
    if ranks:
        # One process per stage (torchrun's environment); rank 0 reports.
        port = str(29600 + os.getpid() % 1000)
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**env, "RANK": str(r), "WORLD_SIZE": str(ranks), "MASTER_PORT": port})
                 for r in range(ranks)]
        outs = [p.communicate() for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        stdout, stderr = outs[0][0], "".join(o[1] for o in outs)
    else:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        stdout, stderr = out.stdout, out.stderr
    lines = [json.loads(l) for l in stdout.splitlines()]
    idle = [float(x) for x in re.findall(r"device \d+: computing [0-9.]+ ms, waiting [0-9.]+ ms, done early by [0-9.]+ ms; idle ([0-9.]+)%", stderr)]
    if ranks:
        idle = [x for x in idle if x < 100.0]  # each rank reports its own stage
    return statistics.median(l["step_ms"] for l in lines[1:]), [l["loss"] for l in lines], lines[-1]["peak_bytes"], idle


rows = [("unpipelined executable", *run("plain", []), None)]
for s in a.schedules.split(","):
    sim = json.loads(subprocess.run([MEMC, "schedule", "--stages", "2", "--microbatches", "8", "--schedule", s, "--json"],
                                    capture_output=True, text=True, check=True).stdout)["bubble_rate"]
    rows.append((f"{s}, 2 stages x 8 microbatches", *run(s, ["--pipeline-stages", "2", "--microbatches", "8", "--schedule", s]), sim))
    rows.append((f"{s}, same, one process per stage", *run(s, [], ranks=2), sim))

spec = importlib.util.spec_from_file_location("gen", "scripts/gen-big-llama.py")
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)
torch_ms = {}
for threads in [1, 2]:
    torch.set_num_threads(threads)
    model = gen.build(0, 8, 256, 4, 4, 704, 2048).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    x = torch.from_numpy(ids)
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append((time.perf_counter() - t) * 1e3)
    torch_ms[threads] = statistics.median(times[1:])

base = rows[0][1]
print(f"| run | ms/step | vs unpipelined | vs PyTorch 1 thread | peak_bytes | stage idle (measured) | bubble (simulated, unit costs) | losses |")
print("|---|---:|---:|---:|---:|---|---:|---|")
for name, ms, losses, peak, idle, sim in rows:
    print(f"| {name} | {ms:.0f} | {ms / base:.2f} | {ms / torch_ms[1]:.2f} | {peak:,} | "
          f"{' / '.join(f'{i:.1f}%' for i in idle) or '-'} | {'-' if sim is None else f'{sim:.3f}'} | "
          f"{[round(l, 4) for l in losses]} |")
print(f"| PyTorch eager, 1 thread | {torch_ms[1]:.0f} | {torch_ms[1] / base:.2f} | 1.00 | | | | |")
print(f"| PyTorch eager, 2 threads | {torch_ms[2]:.0f} | {torch_ms[2] / base:.2f} | {torch_ms[2] / torch_ms[1]:.2f} | | | | |")
