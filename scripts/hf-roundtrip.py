#!/usr/bin/env python3
"""Load a model directory memc saved with Hugging Face transformers and compare logits.

Usage (from the repository root, with torch and transformers installed):

    python3 scripts/hf-roundtrip.py SAVED_DIR MODEL.onnx INPUT_IDS.npy [--memc target/debug/memc]

1. ``AutoModelForCausalLM.from_pretrained(SAVED_DIR)`` must load with no missing,
   unexpected or mismatched keys (``output_loading_info=True``);
2. its logits on INPUT_IDS (eval mode, fp32) are compared with what
   ``memc eval MODEL.onnx --weights SAVED_DIR`` computes for the same ids.

Prints the largest relative difference and exits non-zero above 1e-4 or on any key problem.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("saved")
    ap.add_argument("model")
    ap.add_argument("ids")
    ap.add_argument("--memc", default="target/debug/memc")
    a = ap.parse_args()

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        a.saved, output_loading_info=True, torch_dtype=torch.float32)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        print(f"from_pretrained({a.saved}): {problems}", file=sys.stderr)
        return 1
    ids = np.load(a.ids)
    with torch.no_grad():
        ref = model.eval()(input_ids=torch.from_numpy(ids)).logits.float().numpy()

    with tempfile.TemporaryDirectory() as out:
        shape = "x".join(map(str, ids.shape))
        subprocess.run([a.memc, "eval", a.model, "--weights", a.saved,
                        "--shape", f"input_ids={shape}", "--input", f"input_ids={a.ids}",
                        "--out", out], check=True, capture_output=True)
        outs = sorted(Path(out).glob("*.npy"))
        got = np.load(outs[0])
    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
    print(f"{a.saved}: loads with no missing or unexpected keys; logits vs memc: max rel {err:.2e}")
    return 0 if err <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
