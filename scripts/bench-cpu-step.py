"""CPU training-step time: memc's cpu backend against PyTorch eager on the same model, batch and
thread count (1), in the same run. Prints a table.

    python3 scripts/bench-cpu-step.py [--steps 30]

memc's figure is the median `step_ms` of `memc train --backend cpu` after the first step (which
includes JIT compilation); PyTorch's is the median of forward + backward + AdamW steps on the
same weights (examples/export.py's build) with torch.set_num_threads(1).
"""
import argparse, json, statistics, subprocess, sys, time

import numpy as np
import torch

sys.path.insert(0, "examples")
import export  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=30)
a = ap.parse_args()
torch.set_num_threads(1)
rows = []
for family in ["llama", "gpt2", "qwen2"]:
    name = f"{family}-dynamo"
    ids = np.load(f"examples/models/{name}/inputs/input_ids.npy")
    out = subprocess.run(["target/release/memc", "train", f"examples/models/{name}.onnx", "--data",
                          f"examples/models/{name}/inputs/input_ids.npy", "--steps", str(a.steps),
                          "--optimizer", "adamw", "--lr", "1e-3", "--backend", "cpu"],
                         capture_output=True, text=True, check=True)
    memc_ms = statistics.median(json.loads(l)["step_ms"] for l in out.stdout.splitlines()[1:])
    model = export.build(family, "sdpa").train()
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
    torch_ms = statistics.median(times[1:])
    rows.append((name, memc_ms, torch_ms))
print(f"{'model':<14} {'memc cpu ms':>12} {'torch eager ms':>15} {'ratio':>7}")
for n, m, t in rows:
    print(f"{n:<14} {m:>12.3f} {t:>15.3f} {m / t:>7.2f}")
