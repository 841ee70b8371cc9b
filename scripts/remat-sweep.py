#!/usr/bin/env python3
"""Sweep memc's activation budgets on one model: saved bytes vs recomputed FLOPs.

Compiles the training step with `--remat none`, `--remat auto` (the default), `--remat full`
(per-layer checkpointing, the Hugging Face baseline) and `--activation-budget` at evenly
spaced budgets between the smallest feasible one and no remat's, reads each `--report-json`,
and prints a markdown table. With `--svg F`, also draws saved bytes against recomputed FLOPs.

    python3 scripts/remat-sweep.py scratch/llama12x768.onnx --shape input_ids=8x1024 \
        --dtype bf16 --points 8 --svg remat-sweep.svg

Bytes are exact (the memory plan); FLOPs count multiply-adds as 2 (the report's
`recompute_flops`).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_report(memc, model, shapes, dtype, extra):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        cmd = [memc, "compile", model, "--train", "--dtype", dtype, "--report-json", out]
        for s in shapes:
            cmd += ["--shape", s]
        cmd += extra
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd)}: {r.stderr.strip()}")
        with open(out) as f:
            return json.load(f)


def row(name, r):
    return {
        "name": name,
        "saved": r["saved_activation_bytes"],
        "peak": r["peak_bytes"],
        "recompute": r["recompute_flops"],
        "flops": r["flops"],
    }


def svg(rows, title, path):
    w, h, m = 640, 420, 70
    xs = [r["saved"] for r in rows]
    ys = [r["recompute"] for r in rows]
    x0, x1 = 0, max(xs) * 1.05
    y0, y1 = 0, max(max(ys) * 1.1, 1)

    def px(x):
        return m + (x - x0) / (x1 - x0) * (w - 2 * m)

    def py(y):
        return h - m - (y - y0) / (y1 - y0) * (h - 2 * m)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
        f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
        f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
        f'<text x="{w / 2}" y="{h - 25}" text-anchor="middle">saved activations (GB)</text>',
        f'<text x="18" y="{h / 2}" text-anchor="middle" transform="rotate(-90 18 {h / 2})">recomputed TFLOP</text>',
    ]
    for k in range(6):
        x = x0 + (x1 - x0) * k / 5
        out.append(f'<text x="{px(x)}" y="{h - m + 16}" text-anchor="middle">{x / 1e9:.2f}</text>')
        y = y0 + (y1 - y0) * k / 5
        out.append(f'<text x="{m - 6}" y="{py(y) + 4}" text-anchor="end">{y / 1e12:.2f}</text>')
    budget = sorted((r for r in rows if r["name"].startswith("budget ")), key=lambda r: r["saved"])
    pts = " ".join(f'{px(r["saved"])},{py(r["recompute"])}' for r in budget)
    out.append(f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
    for r in budget:
        out.append(f'<circle cx="{px(r["saved"])}" cy="{py(r["recompute"])}" r="3" fill="#1f77b4"/>')
    marks = {"full": "#d62728", "auto": "#2ca02c", "none": "#7f7f7f"}
    for r in rows:
        c = marks.get(r["name"])
        if c:
            x, y = px(r["saved"]), py(r["recompute"])
            out.append(f'<rect x="{x - 5}" y="{y - 5}" width="10" height="10" fill="{c}"/>')
            out.append(f'<text x="{x + 8}" y="{y - 8}" fill="{c}">{r["name"]}</text>')
    out.append(f'<text x="{w - m}" y="{m}" text-anchor="end" fill="#1f77b4">auto under a budget</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--shape", action="append", default=[])
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--svg")
    ap.add_argument("--memc", default=os.path.join(ROOT, "target/release/memc"))
    a = ap.parse_args()
    none = compile_report(a.memc, a.model, a.shape, a.dtype, ["--remat", "none"])
    auto = compile_report(a.memc, a.model, a.shape, a.dtype, [])
    full = compile_report(a.memc, a.model, a.shape, a.dtype, ["--remat", "full"])
    rows = [row("none", none), row("auto", auto), row("full", full)]
    # From the smallest feasible budget (layer inputs, the minimum cut outside the layers).
    lo = auto["training"]["remat"]["min_budget_bytes"]
    hi = none["saved_activation_bytes"]
    for k in range(a.points + 1):
        b = lo + (hi - lo) * k // a.points
        r = compile_report(a.memc, a.model, a.shape, a.dtype, ["--activation-budget", str(b)])
        rows.append(row(f"budget {b}", r))
    # Auto at full checkpointing's memory.
    r = compile_report(
        a.memc, a.model, a.shape, a.dtype,
        ["--activation-budget", str(full["saved_activation_bytes"])],
    )
    rows.append(row("budget = full's bytes", r))
    step = none["flops"]
    print("| policy | saved activation bytes | peak bytes | recomputed FLOPs | step FLOPs vs none |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['saved']:,} | {r['peak']:,} | {r['recompute']:,} | {r['flops'] / step:.3f} |")
    if a.svg:
        svg(rows, f"{os.path.basename(a.model)} {' '.join(a.shape)} {a.dtype}", a.svg)
        print(f"\nwrote {a.svg}", file=sys.stderr)


if __name__ == "__main__":
    main()
