#!/usr/bin/env python3
"""Reversible layers (MEFT) over depth: saved activations, starting-point deviation and
reconstruction drift, from memc's reports.

For each model (one width, several depths) and each variant (meft1, meft2, meft3) this
compiles the training step three ways and reads `--report-json`:

* full fine-tuning (no --reversible, every weight trained),
* the reversible model with its activations stored (`--rev-store`, ordinary autodiff),
* the reversible model with backward by reconstruction (the default),

then trains one step with `--rev-check` in f32 and in bf16 (reference backend) and reads the
per-layer drift max|x_reconstructed - x| / max|x| from the step's JSON line. Prints markdown
tables.

    python3 scripts/rev-sweep.py examples/models/depth/llama-L{2,4,8,16}.onnx \
        --shape input_ids=4x32

Bytes are exact (the memory plan's saved activations, i.e. forward values the backward pass
reads).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ["meft1", "meft2", "meft3"]


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


def report(memc, model, shape, extra):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        run([memc, "compile", model, "--shape", shape, "--train", "--report-json", out] + extra)
        with open(out) as f:
            return json.load(f)


def drift(memc, model, data, variant, dtype):
    """Per-layer drift of one step, or None when the reconstruction blew up (memc stops on
    non-finite gradients)."""
    cmd = [memc, "train", model, "--data", data, "--steps", "1", "--reversible", variant,
           "--rev-check", "--rev-check-threshold", "1e9", "--dtype", dtype]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        if "not finite" in r.stderr or "the loss is" in r.stderr:
            return None
        sys.exit(f"{' '.join(cmd)}: {r.stderr.strip()}")
    line = json.loads(r.stdout.strip().splitlines()[-1])
    return line["rev_drift"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--shape", default="input_ids=4x32")
    ap.add_argument("--memc", default=os.path.join(ROOT, "target", "release", "memc"))
    a = ap.parse_args()
    memc = a.memc if os.path.exists(a.memc) else os.path.join(ROOT, "target", "debug", "memc")
    batch, seq = (int(x) for x in a.shape.split("=")[1].split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "ids.npy")
        for model in a.models:
            full = report(memc, model, a.shape, [])
            layers = full["training"]["remat"]["layers"]
            vocab = full.get("vocab") or 128
            np.save(data, np.random.default_rng(0).integers(0, 128, (batch, seq)).astype(np.int64))
            for v in VARIANTS:
                rev = report(memc, model, a.shape, ["--reversible", v])
                stored = report(memc, model, a.shape, ["--reversible", v, "--rev-store"])
                rows.append(dict(
                    layers=layers, variant=v,
                    full=full["saved_activation_bytes"],
                    stored=stored["saved_activation_bytes"],
                    rev=rev["saved_activation_bytes"],
                    peak_full=full["peak_bytes"], peak_rev=rev["peak_bytes"],
                    deviation=rev["reversible"]["start_deviation"],
                    f32=drift(memc, model, data, v, "f32"),
                    bf16=drift(memc, model, data, v, "bf16")))
                print(f"{os.path.basename(model)} {v}: done", file=sys.stderr, flush=True)
    print("| layers | variant | saved: full FT | saved: reversible, stored | saved: reversible | vs full FT | peak: full FT | peak: reversible | start deviation |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['variant']} | {r['full']:,} | {r['stored']:,} | {r['rev']:,} | "
              f"{100 * (1 - r['rev'] / r['full']):.1f}% less | {r['peak_full']:,} | {r['peak_rev']:,} | "
              f"{r['deviation']:.3f} |")
    print()
    print("| layers | variant | f32 drift: max over layers | f32: first layer | bf16: max over layers | bf16: first layer |")
    print("|---|---|---|---|---|---|")
    def cells(d):
        if d is None:
            return "not finite (gradients overflowed) | -"
        return f"{max(d):.2e} | {d[0]:.2e}"

    for r in rows:
        print(f"| {r['layers']} | {r['variant']} | {cells(r['f32'])} | {cells(r['bf16'])} |")


if __name__ == "__main__":
    main()
