#!/usr/bin/env python3
"""Gradient accumulation at a realistic size: memory per optimizer step and step time, memc
against PyTorch eager doing the same accumulation, in one run.

    python3 scripts/bench-grad-accum.py [--model 8x512] [--batch 16x256] [--ks 1,2,4] [--steps 3]

For the 8-layer d_model 512 Llama (`scripts/gen-big-llama.py`, vocab 32000, random weights,
generated into scratch/ when missing) it compiles the AdamW fp32 training executable for the
whole batch (`memc compile --train --optimizer adamw -o`, release build) and, for each K > 1,
with `--grad-accum K` (the program for one microbatch, with a gradient sum per weight),
reads each one's planned bytes from `OUT info` (its arena), then alternates memc's executable and PyTorch eager (the same
shapes, all cores; for K > 1 K microbatches, each loss divided by K, one `opt.step()`) one
step block at a time. Times are medians of the steps after the first; peak RSS is each
process's `ru_maxrss`. The losses of every K must equal K = 1's within 1e-5.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import importlib.util  # noqa: E402

spec = importlib.util.spec_from_file_location("real", os.path.join(os.path.dirname(__file__), "bench-cpu-real.py"))
real = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real)

TORCH_ACCUM = r"""
import importlib.util, json, resource, statistics, sys, time
import numpy as np, torch
spec = importlib.util.spec_from_file_location("gen", "scripts/gen-big-llama.py")
gen = importlib.util.module_from_spec(spec); spec.loader.exec_module(gen)
layers, hidden, heads, kv, ffn, steps, ids, k = sys.argv[1:]
model = gen.build(0, int(layers), int(hidden), int(heads), int(kv), int(ffn), 32000).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
x = torch.from_numpy(np.load(ids)); k = int(k)
times = []
for _ in range(int(steps)):
    t = time.perf_counter()
    for part in x.chunk(k):
        logits = model(part)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), part[:, 1:].reshape(-1)) / k
        loss.backward()
    opt.step(); opt.zero_grad()
    times.append((time.perf_counter() - t) * 1e3)
print(json.dumps({"ms": statistics.median(times[1:]), "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def planned(info):
    """The executable's planned bytes: its arena."""
    for line in info.splitlines():
        if line.startswith("arena_bytes:"):
            return int(line.split()[1])
    raise SystemExit(f"no plan in OUT info:\n{info}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="8x512")
    ap.add_argument("--batch", default="16x256")
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    gen, _ = real.MODELS[args.model]
    rows, seq = map(int, args.batch.split("x"))
    onnx = f"scratch/llama{args.model}.onnx"
    if not os.path.exists(onnx):
        subprocess.run([sys.executable, "scripts/gen-big-llama.py", onnx, *gen, "--vocab", "32000"], check=True)
    ids = f"scratch/ids{args.batch}.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 32000, (rows, seq)).astype(np.int64))
    memc = "target/release/memc"
    ks = [int(k) for k in args.ks.split(",")]
    exes = {}
    for k in ks:
        exe = f"scratch/accum{args.model}-k{k}"
        extra = ["--grad-accum", str(k)] if k > 1 else []
        subprocess.run([memc, "compile", onnx, "--shape", f"input_ids={rows}x{seq}", "--train",
                        "--optimizer", "adamw", *extra, "-o", exe], check=True, capture_output=True)
        info = subprocess.run([exe, "info"], check=True, capture_output=True, text=True).stdout
        exes[k] = (exe, planned(info))
    print(f"Llama {args.model}, batch {rows} x {seq}, AdamW fp32, {args.steps} steps each")
    print("| K | memc planned bytes | vs K=1 | memc ms/step | memc peak RSS | PyTorch ms/step | PyTorch peak RSS | time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    base_losses = None
    for k in ks:
        exe, plan = exes[k]
        out, rss = real.measured([exe, "train", "--data", ids, "--steps", str(args.steps), "--lr", "1e-3"])
        lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
        losses = [l["loss"] for l in lines]
        if base_losses is None:
            base_losses = losses
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, base_losses))
        assert worst <= 1e-5, (k, losses, base_losses)
        ms = sorted(l["step_ms"] for l in lines[1:])[len(lines[1:]) // 2]
        t = json.loads(subprocess.run([sys.executable, "-c", TORCH_ACCUM, *real.gen_args(gen), str(args.steps), ids, str(k)],
                                      check=True, capture_output=True, text=True).stdout)
        print(f"| {k} | {plan:,} | {plan / exes[ks[0]][1]:.2f} | {ms:.0f} | {rss:,} | {t['ms']:.0f} | {t['rss']:,} | {ms / t['ms']:.2f} |")


if __name__ == "__main__":
    main()
