#!/usr/bin/env python3
"""Pipeline × data-parallel layouts of one Llama: each rank's planned bytes and step times.

    python3 scripts/bench-pipeline-ranks.py [--model 8x512] [--shape 8x256] [--steps 4]
                                            [--layouts 2x1,1x2,2x2] [--schedule 1f1b]
                                            [--plan-only] [--torch]

The Llama comes from `scripts/bench-cpu-real.py`'s table (`scripts/gen-big-llama.py`, vocab
32000, random weights, generated into scratch/ when missing). For the single program (`memc
compile --train --optimizer adamw -o`, release build) and each layout P×D (`--pipeline-stages P
--data-parallel D`, 2P microbatches of the whole batch shared out to the replicas) it compiles the executable and
reads `OUT info`: the single program's arena and each rank's planned bytes (weights, optimizer
state, gradient sums, working arenas). Unless `--plan-only`, it then trains each for `--steps`
steps on the same random ids, the single program in one process on all cores, a layout under
`mpirun --oversubscribe -n P·D` with `--threads 1` per rank, and prints the median step time of
the steps after the first (rank 0's `step_ms`), each rank's allocated bytes (its first line on
stderr, which must equal the plan) and the last loss; with `--torch` also PyTorch eager's step on
all cores (the same model's shapes, data and loss). Markdown tables go to stdout.
"""
import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)
spec = importlib.util.spec_from_file_location("real", "scripts/bench-cpu-real.py")
real = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real)

MEMC = "target/release/memc"
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "mpi_yield_when_idle", "1"]
PLANNED = re.compile(r"planned, (?:one process|rank (\d+) \(stage (\d+), replica (\d+)\)): (\d+) bytes "
                     r"\(weights (\d+), optimizer state (\d+), gradient sums (\d+), working (\d+)\)")
ALLOCATED = re.compile(r"rank (\d+) \(stage \d+ of replica \d+\): (\d+) bytes allocated, (\d+) planned")


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: {r.stderr[-2000:]}")
    return r


def microbatches(p, d):
    """2P microbatches of the whole batch, shared out to the D replicas (at least one each)."""
    return max(1, 2 * p // d)


def compile_exe(onnx, shape, out, layout=None, schedule="1f1b"):
    cmd = [MEMC, "compile", onnx, "--shape", f"input_ids={shape}", "--train", "--optimizer", "adamw",
           "-o", out]
    if layout:
        p, d = layout
        cmd += ["--pipeline-stages", str(p), "--microbatches", str(microbatches(p, d)),
                "--data-parallel", str(d), "--schedule", schedule]
    run(cmd)
    return run([out, "info"]).stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="8x512")
    ap.add_argument("--shape", default="8x256")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--layouts", default="1x1,2x1,1x2,2x2")
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--plan-only", action="store_true")
    ap.add_argument("--torch", action="store_true")
    a = ap.parse_args()
    args, _ = real.MODELS[a.model]
    onnx = f"scratch/llama{a.model}.onnx"
    if not os.path.exists(onnx):
        run([sys.executable, "scripts/gen-big-llama.py", onnx, *args, "--vocab", "32000"])
    run(["cargo", "build", "--release", "-q", "-p", "memc", "-p", "memc-runtime"])
    out = f"scratch/pipe-bench-{a.model}"
    os.makedirs(out, exist_ok=True)
    rows, seq = map(int, a.shape.split("x"))
    ids = f"{out}/ids.npy"
    import numpy as np
    data = np.random.default_rng(0).integers(0, 32000, (rows * (a.steps + 1), seq), dtype=np.int64)
    np.save(ids, data)
    # PyTorch's step takes its whole file as the batch: the first batch's rows.
    torch_ids = f"{out}/ids-one-batch.npy"
    np.save(torch_ids, data[:rows])

    single = f"{out}/single"
    info = compile_exe(onnx, a.shape, single)
    arena = int(re.search(r"arena_bytes: (\d+)", info).group(1))
    layouts = [tuple(map(int, l.split("x"))) for l in a.layouts.split(",")]
    plans = {}
    print(f"## {a.model} Llama, batch {a.shape}, AdamW, schedule {a.schedule}\n")
    print(f"Single program: arena {arena:,} bytes.\n")
    print("| layout | microbatches per replica | rank | stage, replica | total | weights | optimizer state | gradient sums | working arenas | total / single program |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for p, d in layouts:
        exe = f"{out}/p{p}d{d}"
        info = compile_exe(onnx, a.shape, exe, (p, d), a.schedule)
        plans[(p, d)] = []
        for m in PLANNED.finditer(info):
            if m.group(1) is None and p * d > 1:
                continue
            rank = int(m.group(1) or 0)
            if any(r == rank for r, _ in plans[(p, d)]):
                continue
            total, w, s, g, work = map(int, m.groups()[3:])
            plans[(p, d)].append((rank, total))
            where = f"{m.group(2)}, {m.group(3)}" if m.group(1) else "all, one process"
            print(f"| P={p} × D={d} | {microbatches(p, d)} | {rank} | {where} | {total:,} | {w:,} | {s:,} | "
                  f"{g:,} | {work:,} | {total / arena:.2f} |")
    if a.plan_only:
        return
    print("\n| run | processes × threads | step ms (median after the first) | rank 0 bytes | last loss |")
    print("|---|---|---|---|---|")

    def steps(lines):
        return statistics.median(l["step_ms"] for l in lines[1:]), lines[-1]["loss"], lines[0]["peak_bytes"]

    r = run([single, "train", "--data", ids, "--steps", str(a.steps), "--lr", "1e-3"])
    ms, loss, peak = steps([json.loads(l) for l in r.stdout.splitlines()])
    print(f"| single program | 1 × {os.cpu_count()} | {ms:.0f} | {peak:,} | {loss} |")
    if a.torch:
        t = run([sys.executable, "-c", real.TORCH_STEP, *real.gen_args(args), str(a.steps), torch_ids, "0"])
        tj = json.loads(t.stdout)
        print(f"| PyTorch eager | 1 × {tj['threads']} | {tj['ms']:.0f} | (peak RSS {tj['rss']:,}) | |")
    for p, d in layouts:
        exe = f"{out}/p{p}d{d}"
        n = p * d
        cmd = ([exe] if n == 1 else MPIRUN + ["-n", str(n), exe]) + [
            "train", "--data", ids, "--steps", str(a.steps), "--lr", "1e-3"]
        if n > 1:
            cmd += ["--threads", "1"]
        r = run(cmd)
        ms, loss, peak = steps([json.loads(l) for l in r.stdout.splitlines()])
        alloc = {int(m.group(1)): (int(m.group(2)), int(m.group(3))) for m in ALLOCATED.finditer(r.stderr)}
        for rank, total in plans[(p, d)]:
            if n > 1 and alloc.get(rank) != (total, total):
                sys.exit(f"P={p} D={d} rank {rank}: allocated {alloc.get(rank)}, planned {total}")
        threads = "1" if n > 1 else str(os.cpu_count())
        print(f"| P={p} × D={d} | {n} × {threads} | {ms:.0f} | {peak:,} | {loss} |")


if __name__ == "__main__":
    main()
