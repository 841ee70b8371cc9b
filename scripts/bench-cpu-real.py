#!/usr/bin/env python3
"""The compiled training step at realistic sizes against PyTorch, interleaved in one run.

    python3 scripts/bench-cpu-real.py [--steps 5] [--models 4x256,8x512,12x768]
                                      [--ort] [--large] [--unfused] [--remat]

For each Llama (`scripts/gen-big-llama.py`, vocab 32000, random weights; generated into
scratch/ when missing):

  4x256:  4 layers, d_model 256, 4 heads, 2 KV heads, d_ffn 704, batch 4 x seq 128
  8x512:  8 layers, d_model 512, 8 heads, 4 KV heads, d_ffn 1408, batch 4 x seq 256
  12x768: 12 layers, d_model 768, 12 heads, 12 KV heads, d_ffn 2048, batch 8 x seq 1024
          (compile and memory; with `--large` also two training steps of memc and PyTorch,
          step time and peak RSS)

it compiles the AdamW fp32 training executable (`memc compile --train --optimizer adamw -o`,
release build, timed with a cold kernel cache, a fresh `MEMC_KERNEL_CACHE` directory, and
again with it warm), reads `--report-json`'s `peak_bytes`
(the plan over the fused kernels) and `node_plan_peak_bytes` (the plan before fusion) and
`OUT info`'s arena, then alternates memc's executable (all cores) and PyTorch eager (all cores,
the same weights' shapes, data and loss) and, with `--ort`, ONNX Runtime Training 1.19.2 on
the same ONNX file (`scripts/ort-train-step.py`, all cores; its first loss checks memc's) one
step block at a time, so all see the same machine state. Times are medians of the steps after the first; peak RSS is each process's
`ru_maxrss` (memc: the executable process; PyTorch: measured in a child process). It also
checks peak RSS − arena against the weights file + 64 MiB, trains once more on one thread
(`--threads 1`: the losses must equal the all-core ones within 1e-6), with `--unfused` times
`--no-fused-loss` (the whole logits held) against the fused loss, and with `--remat` compiles
`--remat full` and times it against PyTorch with per-layer activation checkpointing
(`gradient_checkpointing_enable`), each against its own plain run.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

MODELS = {
    "4x256": (["--layers", "4", "--hidden", "256", "--heads", "4", "--kv-heads", "2", "--ffn", "704"], (4, 128)),
    "8x512": (["--layers", "8", "--hidden", "512", "--heads", "8", "--kv-heads", "4", "--ffn", "1408"], (4, 256)),
    "12x768": (["--layers", "12", "--hidden", "768", "--heads", "12", "--kv-heads", "12", "--ffn", "2048"], (8, 1024)),
}

TORCH_STEP = r"""
import importlib.util, json, resource, statistics, sys, time
import numpy as np, torch
spec = importlib.util.spec_from_file_location("gen", "scripts/gen-big-llama.py")
gen = importlib.util.module_from_spec(spec); spec.loader.exec_module(gen)
layers, hidden, heads, kv, ffn, steps, ids, ckpt = sys.argv[1:]
torch.set_num_threads(torch.get_num_threads())
model = gen.build(0, int(layers), int(hidden), int(heads), int(kv), int(ffn), 32000).train()
if ckpt == "1":
    # Activation checkpointing per decoder layer (the layer's input kept, the rest recomputed).
    model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
x = torch.from_numpy(np.load(ids))
times = []
for _ in range(int(steps)):
    t = time.perf_counter()
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward(); opt.step(); opt.zero_grad()
    times.append((time.perf_counter() - t) * 1e3)
print(json.dumps({"ms": statistics.median(times[1:]), "threads": torch.get_num_threads(),
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


WRAP = r"""
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], check=True, capture_output=True, text=True)
sys.stdout.write(r.stdout)
print("RSS", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def measured(cmd):
    """Runs `cmd` in a fresh wrapper process: its stdout and its own peak RSS in bytes."""
    out = subprocess.run([sys.executable, "-c", WRAP, *cmd], check=True, capture_output=True,
                         text=True).stdout.splitlines()
    return "\n".join(out[:-1]), int(out[-1].split()[1])


def gen_args(args):
    v = dict(zip(args[::2], args[1::2]))
    return [v["--layers"], v["--hidden"], v["--heads"], v["--kv-heads"], v["--ffn"]]


ORT_VENV = "scratch/ort-venv"
ORT_PYTHON = f"{ORT_VENV}/bin/python"


def ort_artifacts(name, onnx):
    """ONNX Runtime Training's artifacts for `onnx` (scripts/ort-train-step.py prepare), made
    once, in a virtual environment made once (onnxruntime-training conflicts with onnxruntime)."""
    if not os.path.exists(ORT_PYTHON):
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", ORT_VENV], check=True)
        subprocess.run([ORT_PYTHON, "-m", "pip", "install", "-q", "onnxruntime-training==1.19.2",
                        "onnx==1.16.2", "numpy<2"], check=True)
    out = f"scratch/ort-{name}"
    ckpt = os.path.join(out, "checkpoint")
    if not os.path.exists(ckpt) or os.path.getmtime(ckpt) < os.path.getmtime(onnx):
        subprocess.run([ORT_PYTHON, "scripts/ort-train-step.py", "prepare", onnx, out], check=True,
                       capture_output=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--models", default="4x256,8x512,12x768")
    ap.add_argument("--unfused", action="store_true",
                    help="also time the executable with --no-fused-loss (the whole logits held)")
    ap.add_argument("--remat", action="store_true",
                    help="also time --remat full against PyTorch's activation checkpointing")
    ap.add_argument("--ort", action="store_true",
                    help="also time ONNX Runtime Training on the same ONNX file (installs "
                         "onnxruntime-training into the virtual environment scratch/ort-venv)")
    ap.add_argument("--large", action="store_true",
                    help="also train the 12-layer model two steps (memc and PyTorch): step time and RSS")
    a = ap.parse_args()
    os.makedirs("scratch", exist_ok=True)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "memc", "-p", "memc-runtime"], check=True)
    for name in a.models.split(","):
        args, (b, s) = MODELS[name]
        onnx = f"scratch/llama{name}.onnx"
        if not os.path.exists(onnx):
            subprocess.run([sys.executable, "scripts/gen-big-llama.py", onnx, *args, "--vocab", "32000"], check=True)
        ids = f"scratch/ids{name}.npy"
        np.save(ids, np.random.default_rng(0).integers(0, 32000, (b, s)).astype(np.int64))
        exe, report = f"scratch/llama{name}-exe", f"scratch/llama{name}.json"
        # Compile time with a cold kernel cache (a fresh directory), then again with it warm.
        cache = tempfile.mkdtemp(prefix="memc-kernel-cache-")
        compile_s = []
        for _ in range(2):
            t0 = time.perf_counter()
            subprocess.run(["target/release/memc", "compile", onnx, "--shape", f"input_ids={b}x{s}", "--train",
                            "--optimizer", "adamw", "-o", exe, "--report-json", report],
                           check=True, capture_output=True, env={**os.environ, "MEMC_KERNEL_CACHE": cache})
            compile_s.append(time.perf_counter() - t0)
        shutil.rmtree(cache)
        r = json.load(open(report))
        info = subprocess.run([exe, "info"], check=True, capture_output=True, text=True).stdout
        arena = int(next(l.split()[1] for l in info.splitlines() if l.startswith("arena_bytes:")))
        print(f"== llama {name}, batch {b} x seq {s}")
        print(f"   memc compile -o: {compile_s[0]:.2f} s with a cold kernel cache, {compile_s[1]:.2f} s warm")
        print(f"   OUT info arena {arena} bytes; --report-json peak_bytes {r['peak_bytes']}; "
              f"node-level plan {r['node_plan_peak_bytes']} (arena = peak: {arena == r['peak_bytes']}, "
              f"<= node plan: {arena <= r['node_plan_peak_bytes']})")
        weights = os.path.getsize(exe + ".safetensors")
        if name == "12x768":
            # bf16 compute (f32 master weights): its arena against its own plans.
            bexe = exe + "-bf16"
            t0 = time.perf_counter()
            subprocess.run(["target/release/memc", "compile", onnx, "--shape", f"input_ids={b}x{s}", "--train",
                            "--optimizer", "adamw", "--dtype", "bf16", "-o", bexe, "--report-json", report],
                           check=True, capture_output=True)
            bs = time.perf_counter() - t0
            br = json.load(open(report))
            binfo = subprocess.run([bexe, "info"], check=True, capture_output=True, text=True).stdout
            barena = int(next(l.split()[1] for l in binfo.splitlines() if l.startswith("arena_bytes:")))
            print(f"   --dtype bf16 (compiled in {bs:.2f} s): OUT info arena {barena} bytes; "
                  f"peak_bytes {br['peak_bytes']}; node-level plan {br['node_plan_peak_bytes']} "
                  f"(arena = peak: {barena == br['peak_bytes']}, <= node plan: "
                  f"{barena <= br['node_plan_peak_bytes']})")
            if a.large:
                # Two steps (the first warms up): the step time and the memory checks.
                out, rss = measured([exe, "train", "--data", ids, "--steps", "2", "--lr", "1e-3"])
                lines = [json.loads(l) for l in out.splitlines()]
                over = rss - arena
                print(f"   memc executable: {lines[-1]['step_ms']:.0f} ms/step (second step; first "
                      f"{lines[0]['step_ms']:.0f}), peak RSS {rss / 1e9:.2f} GB; losses "
                      f"{[round(l['loss'], 5) for l in lines]}")
                print(f"   peak RSS - arena = {over / 2**20:.0f} MiB <= weights + 64 MiB = "
                      f"{(weights + (64 << 20)) / 2**20:.0f} MiB: {over <= weights + (64 << 20)}")
                tj = json.loads(subprocess.run([sys.executable, "-c", TORCH_STEP, *gen_args(args), "2", ids, "0"],
                                               check=True, capture_output=True, text=True).stdout)
                print(f"   PyTorch eager, {tj['threads']} threads: {tj['ms']:.0f} ms/step (second step), "
                      f"peak RSS {tj['rss'] / 1e9:.2f} GB; ratio memc / PyTorch "
                      f"{lines[-1]['step_ms'] / tj['ms']:.2f}")
            continue
        ort_dir = None
        if a.ort:
            ort_dir = ort_artifacts(name, onnx)

        def memc_run(path, extra=()):
            out, rss = measured([path, "train", "--data", ids, "--steps", str(a.steps), "--lr", "1e-3", *extra])
            lines = [json.loads(l) for l in out.splitlines()]
            return statistics.median(l["step_ms"] for l in lines[1:]), rss, [l["loss"] for l in lines]

        def torch_run(ckpt):
            t = subprocess.run([sys.executable, "-c", TORCH_STEP, *gen_args(args), str(a.steps), ids, ckpt],
                               check=True, capture_output=True, text=True)
            return json.loads(t.stdout)

        memc_ms, torch_ms, memc_rss, torch_rss, losses = [], [], 0, 0, None
        ort_ms, ort_rss, ort_losses = [], 0, None
        for _ in range(2):  # interleaved: memc, PyTorch, ONNX Runtime Training, and again
            ms, rss, losses = memc_run(exe)
            memc_ms.append(ms)
            memc_rss = max(memc_rss, rss)
            tj = torch_run("0")
            torch_ms.append(tj["ms"])
            torch_rss = max(torch_rss, tj["rss"])
            if ort_dir:
                oj = json.loads(subprocess.run(
                    [ORT_PYTHON, "scripts/ort-train-step.py", "run", ort_dir, ids, str(a.steps),
                     str(os.cpu_count())], check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                ort_ms.append(oj["ms"])
                ort_rss = max(ort_rss, oj["rss"])
                ort_losses = oj["losses"]
        print(f"   memc executable: {min(memc_ms):.0f} ms/step (runs {[round(x) for x in memc_ms]}), "
              f"peak RSS {memc_rss / 1e9:.2f} GB; losses {[round(x, 5) for x in losses]}")
        print(f"   PyTorch eager, {tj['threads']} threads: {min(torch_ms):.0f} ms/step "
              f"(runs {[round(x) for x in torch_ms]}), peak RSS {torch_rss / 1e9:.2f} GB")
        print(f"   ratio memc / PyTorch: {min(memc_ms) / min(torch_ms):.2f}")
        if ort_dir:
            first = abs(losses[0] - ort_losses[0]) / abs(ort_losses[0])
            print(f"   ONNX Runtime Training 1.19.2, {os.cpu_count()} threads (same ONNX file): "
                  f"{min(ort_ms):.0f} ms/step (runs {[round(x) for x in ort_ms]}), peak RSS "
                  f"{ort_rss / 1e9:.2f} GB; ratio memc / ORT {min(memc_ms) / min(ort_ms):.2f}; "
                  f"first loss {ort_losses[0]:.6f} vs memc {losses[0]:.6f} (relative difference {first:.1e})")
        over = memc_rss - arena
        print(f"   peak RSS - arena = {over / 2**20:.0f} MiB <= weights + 64 MiB = "
              f"{(weights + (64 << 20)) / 2**20:.0f} MiB: {over <= weights + (64 << 20)}")
        ms1, _, losses1 = memc_run(exe, ["--threads", "1"])
        diff = max(abs(x - y) for x, y in zip(losses, losses1))
        print(f"   --threads 1: {ms1:.0f} ms/step; max |loss difference| to all cores {diff:.1e} "
              f"(within 1e-6: {diff <= 1e-6})")
        if a.unfused:
            uexe = exe + "-unfused"
            subprocess.run(["target/release/memc", "compile", onnx, "--shape", f"input_ids={b}x{s}", "--train",
                            "--optimizer", "adamw", "--no-fused-loss", "-o", uexe, "--report-json", report],
                           check=True, capture_output=True)
            upeak = json.load(open(report))["peak_bytes"]
            ums, _, _ = memc_run(uexe)
            fms, _, _ = memc_run(exe)
            print(f"   --no-fused-loss: arena {upeak} bytes (fused {arena}), {ums:.0f} ms/step; "
                  f"fused {fms:.0f} ms/step = {fms / ums:.2f} x unfused")
        if a.remat:
            rexe = exe + "-remat"
            subprocess.run(["target/release/memc", "compile", onnx, "--shape", f"input_ids={b}x{s}", "--train",
                            "--optimizer", "adamw", "--remat", "full", "-o", rexe, "--report-json", report],
                           check=True, capture_output=True)
            rpeak = json.load(open(report))["peak_bytes"]
            rms, rrss, _ = memc_run(rexe)
            ck = torch_run("1")
            print(f"   --remat full: arena {rpeak} bytes (plain {arena}), {rms:.0f} ms/step = "
                  f"{rms / min(memc_ms):.2f} x plain, RSS {rrss / 1e9:.2f} GB")
            print(f"   PyTorch checkpointing: {ck['ms']:.0f} ms/step = {ck['ms'] / min(torch_ms):.2f} x plain, "
                  f"RSS {ck['rss'] / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
