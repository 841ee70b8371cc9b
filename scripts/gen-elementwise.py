"""A bandwidth probe for scripts/gpu-check.sh: y = silu(w * x) + w over N = 2^26 f32 elements
(256 MiB per tensor, far beyond L2), exported with PyTorch's dynamo exporter. memc fuses it into
one kernel that reads w once and writes y once (2 x 256 MiB); the executable fills w with
--random-weights on the GPU machine, so no weights travel.

    python3 scripts/gen-elementwise.py OUT.onnx [--log2n 26]
"""
import argparse

import torch

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--log2n", type=int, default=26)
a = ap.parse_args()


class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1 << a.log2n))

    def forward(self, x):
        return torch.nn.functional.silu(self.w * x) + self.w


torch.onnx.export(M(), (torch.ones(1),), a.out, input_names=["x"], output_names=["y"], dynamo=True)
print(f"wrote {a.out}")
