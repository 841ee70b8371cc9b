"""CPU training-step time: memc's emitted executable against PyTorch eager on the same model,
batch and thread count (1), in the same run. Prints a table.

    python3 scripts/bench-cpu-step.py [--steps 30]

memc's figure is the median `step_ms` after the first step of `OUT train`, where OUT comes from
`memc compile MODEL --train --optimizer adamw -o OUT` (release build); PyTorch's is the median
of forward + backward + AdamW steps on the same weights (examples/export.py's build) with
torch.set_num_threads(1). BERT's attention mask and token types are held fixed (`--input`).
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time

import numpy as np
import torch

sys.path.insert(0, "examples")
import export  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=30)
a = ap.parse_args()
torch.set_num_threads(1)
rows = []
tmp = tempfile.mkdtemp(prefix="memc-bench-")
for family in ["llama", "gpt2", "qwen2", "bert"]:
    name = f"{family}-dynamo"
    inputs = f"examples/models/{name}/inputs"
    ids = np.load(f"{inputs}/input_ids.npy")
    exe = os.path.join(tmp, name)
    subprocess.run(["target/release/memc", "compile", f"examples/models/{name}.onnx", "--shape",
                    f"input_ids={ids.shape[0]}x{ids.shape[1]}", "--train", "--optimizer", "adamw", "-o", exe]
                   + sum([["--shape", f"{n}={ids.shape[0]}x{ids.shape[1]}"] for n in ["attention_mask", "token_type_ids"] if family == "bert"], []),
                   check=True, capture_output=True)
    fixed = sum([["--input", f"{n}={inputs}/{n}.npy"] for n in ["attention_mask", "token_type_ids"] if family == "bert"], [])
    out = subprocess.run([exe, "train", "--data", f"{inputs}/input_ids.npy", "--steps", str(a.steps),
                          "--lr", "1e-3", *fixed], capture_output=True, text=True, check=True)
    memc_ms = statistics.median(json.loads(l)["step_ms"] for l in out.stdout.splitlines()[1:])
    model = export.build(family, "sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    x = torch.from_numpy(ids)
    extra = [torch.from_numpy(np.load(f"{inputs}/{n}.npy")) for n in ["token_type_ids", "attention_mask"]] if family == "bert" else []
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        logits = model(x, *extra)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append((time.perf_counter() - t) * 1e3)
    torch_ms = statistics.median(times[1:])
    rows.append((name, memc_ms, torch_ms))
print(f"{'model':<14} {'memc exe ms':>12} {'torch eager ms':>15} {'ratio':>7}")
for n, m, t in rows:
    print(f"{n:<14} {m:>12.3f} {t:>15.3f} {m / t:>7.2f}")
