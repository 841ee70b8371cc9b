#!/usr/bin/env python3
"""memc plan against a fixed grid of configurations (issue 24).

For the 4-layer d256 Llama at 8 x 256 and the 8-layer d512 Llama at 8 x 512 (scripts/gen-big-llama.py,
vocab 32000, random weights, AdamW, one process, every core), it
  1. plans with unconstrained memory (--json): every configuration's arena and predicted step;
  2. compiles and measures a fixed grid: --grad-accum 1, 2, 4, 8 x --remat none, auto (the
     default), --activation-budget 0.5, --remat full (16 configurations, each lever at 3+ values):
     arena bytes from the executable, step time the fastest of steps 2..4, peak RSS;
  3. at budgets from the smallest arena any configuration reaches to unconstrained, plans again,
     measures the chosen configuration (or reuses its grid measurement) and compares it with the
     fastest grid configuration that fits the same budget.
With --devices 2 the same for two devices: the grid adds two processes under mpirun (1 thread
each): 2 stages x 1 replica under 1F1B, ZB-H1 and V-Half at 2, 4 and 8 microbatches, and 1 stage
x 2 replicas at 1, 2 and 4 microbatches under --remat none, auto and full; arenas are the
largest rank's. The grid is measured --passes times, minutes apart, each configuration's step
the fastest of its passes (this VM's slow spells last minutes).
Prints the tables of BENCHMARKS.md ("memc plan") and writes scratch/bench-plan-DEVICES.json.

    python3 scripts/bench-plan.py [--models 4x256,8x512] [--steps 4] [--passes 2] [--devices 2] [--reuse]
"""
import argparse, importlib.util, json, os, re, resource, subprocess, sys, time

spec = importlib.util.spec_from_file_location("real", "scripts/bench-cpu-real.py")
real = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real)

MEMC = "target/release/memc"
BATCH = {"4x256": (8, 256), "8x512": (8, 512)}
GRID_K = [1, 2, 4, 8]
GRID_REMAT = [["--remat", "none"], [], ["--activation-budget", "0.5"], ["--remat", "full"]]


def pipe_flags(p, d, m, schedule):
    return ["--pipeline-stages", str(p), "--data-parallel", str(d), "--microbatches", str(m), "--schedule", schedule]


# Two processes: 2 stages x 1 replica under three schedules at three microbatch counts, and
# 1 stage x 2 replicas at three microbatch counts under three recomputation policies.
GRID2 = ([pipe_flags(2, 1, m, s) for s in ["1f1b", "zb-h1", "v-half"] for m in [2, 4, 8]]
         + [pipe_flags(1, 2, m, "1f1b") + r for m in [1, 2, 4] for r in [["--remat", "none"], [], ["--remat", "full"]]])


def flags_of(k, remat):
    return (["--grad-accum", str(k)] if k > 1 else []) + remat


def measure(name, onnx, ids, flags, steps, tag, devices=1):
    # A one-process configuration runs as one process whatever the devices.
    devices = devices if "--pipeline-stages" in flags else 1
    exe = f"scratch/plan-{name}-{tag}"
    report = exe + ".json"
    out = subprocess.run([MEMC, "compile", onnx, "--train", "--shape", f"input_ids={BATCH[name][0]}x{BATCH[name][1]}",
                          *flags, "-o", exe, "--report-json", report], capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1]}
    r = json.load(open(report))
    if devices > 1:
        arena = max(p["total_bytes"] for p in r["pipeline"]["processes"] if p["stage"] is not None)
        launch = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(devices)]
        threads = ["--threads", str(max(1, os.cpu_count() // devices))]
    else:
        arena = r["cpu_backend"]["arena_bytes"]
        launch, threads = [], []
    run = subprocess.run(["/usr/bin/time", "-f", "%M", *launch, exe, "train", "--data", ids, "--steps", str(steps), *threads],
                         capture_output=True, text=True, check=True)
    lines = [json.loads(l) for l in run.stdout.splitlines() if l.startswith("{")]
    rss = int(run.stderr.strip().splitlines()[-1]) * 1024
    # The fastest step after the first: the VM's neighbours slow some steps by up to 30%.
    ms = [min(l["step_ms"] for l in lines[1:])]
    if devices == 1:
        assert lines[-1]["peak_bytes"] == arena, (lines[-1]["peak_bytes"], arena)
    for f in (exe, exe + ".safetensors", report):
        os.remove(f)
    return {"arena": arena, "step_ms": sum(ms) / len(ms), "rss": rss}


def plan(onnx, batch, memory, out, devices=1):
    t = time.time()
    p = subprocess.run([MEMC, "plan", onnx, "--global-batch", f"{batch[0]}x{batch[1]}", "--memory", str(memory),
                        "--devices", str(devices), "-o", out, "--json"], capture_output=True, text=True)
    wall = time.time() - t
    if p.returncode:
        return {"error": p.stderr.strip().splitlines()[-1], "wall": wall}
    r = json.loads(p.stdout)
    r["wall"] = wall
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="4x256,8x512")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--devices", type=int, default=1, help="1, or 2 (pipelined steps under mpirun)")
    ap.add_argument("--passes", type=int, default=2, help="measurements of the grid, each configuration's fastest kept")
    ap.add_argument("--reuse", action="store_true",
                    help="take the grid's measurements from scratch/bench-plan-DEVICES.json (plan and measure the choices again)")
    args = ap.parse_args()
    dv = args.devices
    results = {}
    old = json.load(open(f"scratch/bench-plan-{dv}.json")) if args.reuse else {}
    for name in args.models.split(","):
        gen, _ = real.MODELS[name]
        onnx = f"scratch/llama{name}.onnx"
        if not os.path.exists(onnx):
            subprocess.run([sys.executable, "scripts/gen-big-llama.py", onnx, *gen, "--vocab", "32000"], check=True)
        b, s = BATCH[name]
        ids = f"scratch/ids{b}x{s}.npy"
        subprocess.run([sys.executable, "-c", f"import numpy as np; np.save('{ids}', np.random.default_rng(0).integers(0, 32000, ({b}, {s})).astype(np.int64))"], check=True)
        unc = plan(onnx, (b, s), 10**13, f"scratch/plan-{name}-unconstrained.json", dv)
        predicted = {tuple(c["flags"]): c for c in unc["candidates"]}
        print(f"== {name} at {b}x{s}: unconstrained plan in {unc['wall']:.1f} s (search {unc['search_secs']} s, "
              f"calibration {unc['calibration']['secs']} s), {unc['searched']} configurations", flush=True)
        grid = {}
        configs = [flags_of(k, remat) for k in GRID_K for remat in GRID_REMAT]
        if dv > 1:
            configs += GRID2
        if name in old:
            grid = old[name]["grid"]
            for key, m in grid.items():
                p = predicted.get(tuple(key.split()) if key != "(defaults)" else ())
                m["predicted_ms"] = p["predicted_step_ms"] if p else None
        for n in range(0 if name in old else args.passes):
            for f in configs:
                m = measure(name, onnx, ids, f, args.steps, "grid", dv)
                key = " ".join(f) or "(defaults)"
                if key in grid and "step_ms" in grid[key] and "step_ms" in m:
                    grid[key]["passes_ms"].append(m["step_ms"])
                    grid[key]["step_ms"] = min(grid[key]["passes_ms"])
                    m = grid[key]
                else:
                    p = predicted.get(tuple(f))
                    m["predicted_ms"] = p["predicted_step_ms"] if p else None
                    m["planned_arena"] = p["arena_bytes"] if p else None
                    m["passes_ms"] = [m["step_ms"]] if "step_ms" in m else []
                    grid[key] = m
                print(f"   pass {n + 1}: {key:<44} {m}", flush=True)
        arenas = sorted(c["arena_bytes"] for c in unc["candidates"])
        grid_arenas = sorted(m["arena"] for m in grid.values() if "arena" in m)
        budgets = sorted({arenas[0], grid_arenas[len(grid_arenas) // 4], grid_arenas[len(grid_arenas) // 2], grid_arenas[-1]})
        rows = []
        for budget in budgets:
            p = plan(onnx, (b, s), budget, f"scratch/plan-{name}-{budget}.json", dv)
            if "error" in p:
                rows.append({"budget": budget, "error": p["error"]})
                continue
            f = p["chosen"]["flags"]
            key = " ".join(f) or "(defaults)"
            m = grid.get(key) or measure(name, onnx, ids, f, args.steps, "chosen", dv)
            fit = [(g["step_ms"], k) for k, g in grid.items() if "arena" in g and g["arena"] <= budget]
            best = min(fit) if fit else None
            rows.append({"budget": budget, "chosen": key, "arena": m["arena"], "predicted_ms": p["chosen"]["predicted_step_ms"],
                         "measured_ms": m["step_ms"], "rss": m["rss"], "plan_s": p["wall"], "search_s": p["search_secs"],
                         "grid_best": best[1] if best else None, "grid_best_ms": best[0] if best else None})
            print(f"   budget {budget}: {rows[-1]}", flush=True)
        results[name] = {"batch": [b, s], "unconstrained": {k: unc[k] for k in ("search_secs", "calibration", "searched")},
                         "grid": grid, "budgets": rows}
    json.dump(results, open(f"scratch/bench-plan-{dv}.json", "w"), indent=1)
    print("\n| model | config | arena bytes | predicted ms | measured ms | predicted / measured | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        for k, g in r["grid"].items():
            if "arena" in g and g["predicted_ms"]:
                print(f"| {name} | `{k}` | {g['arena']:,} | {g['predicted_ms']:.0f} | {g['step_ms']:.0f} | "
                      f"{g['predicted_ms'] / g['step_ms']:.2f} | {g['rss']:,} |")
    print("\n| model | --memory | chosen | arena | measured ms | fastest grid config that fits | its ms | chosen / grid | plan s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        for row in r["budgets"]:
            if "error" in row:
                print(f"| {name} | {row['budget']:,} | {row['error']} |")
                continue
            ratio = f"{row['measured_ms'] / row['grid_best_ms']:.2f}" if row["grid_best_ms"] else "no grid config fits"
            print(f"| {name} | {row['budget']:,} | `{row['chosen']}` | {row['arena']:,} | {row['measured_ms']:.0f} | "
                  f"`{row['grid_best']}` | {row['grid_best_ms'] and round(row['grid_best_ms'])} | {ratio} | {row['plan_s']:.1f} |")


if __name__ == "__main__":
    main()
