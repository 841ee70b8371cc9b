#!/usr/bin/env python3
"""Generate a large random-weight Llama ONNX model for memc stress tests.

Usage:

    python3 scripts/gen-big-llama.py OUT.onnx [--verify] [--seed N]

Builds a 24-layer ``LlamaForCausalLM`` from a config (no pretrained weights):
hidden 1024, 16 heads, 8 KV heads (GQA), intermediate 2816, vocab 32000,
max positions 2048, untied lm_head, fp32, eval mode, ``torch.manual_seed``
random init (~345M parameters, ~1.4 GB).  It is exported with the TorchScript
exporter (``torch.onnx.export(dynamo=False, opset_version=17)``) to a single
file (weights embedded; under the 2 GB protobuf limit) with one input
``input_ids`` (int64, dims "batch" x "seq") and one output ``logits``
(``use_cache=False``, no attention_mask input) -- the same interface as the
tiny ``examples/models/llama-torchscript.onnx`` from ``examples/export.py``.

The stock TorchScript exporter cannot export transformers' packed-sequence
check in the causal-mask code (``torch.diff`` has no symbolic, and it emits
CumSum on a bool tensor), so two small custom symbolics are registered, as in
``examples/export.py``.

``--verify`` afterwards runs onnxruntime (CPU) on a 1 x 8 input and compares
the logits with PyTorch eager.
"""

import argparse
import os
import sys
import time
import warnings

import torch
import transformers

warnings.filterwarnings("ignore")


def _diff_symbolic(g, self, n, dim, prepend, append):
    from torch.onnx import symbolic_helper as sh

    n = sh._get_const(n, "i", "n")
    dim = sh._get_const(dim, "i", "dim")
    parts = [t for t in (prepend, self, append) if not sh._is_none(t)]
    x = g.op("Concat", *parts, axis_i=dim) if len(parts) > 1 else self

    def c(v):
        return g.op("Constant", value_t=torch.tensor([v], dtype=torch.int64))

    for _ in range(n):
        hi = g.op("Slice", x, c(1), c(2**62), c(dim))
        lo = g.op("Slice", x, c(0), c(-1), c(dim))
        x = g.op("Sub", hi, lo)
    return x


def _cumsum_symbolic(g, self, dim, dtype=None):
    from torch.onnx import symbolic_helper as sh
    from torch.onnx import symbolic_opset11

    if sh._is_bool(self):
        self = g.op("Cast", self, to_i=7)  # TensorProto.INT64
    return symbolic_opset11.cumsum(g, self, dim, dtype)


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def build(seed, layers=24, hidden=1024, heads=16, kv_heads=8, ffn=2816, vocab=32000):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=False,
        attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    return Logits(model).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="output .onnx path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--verify", action="store_true",
                    help="compare onnxruntime with PyTorch on a 1x8 input")
    a = ap.parse_args()

    t0 = time.time()
    wrapper = build(a.seed, a.layers, a.hidden, a.heads, a.kv_heads, a.ffn, a.vocab)
    nparams = sum(p.numel() for p in wrapper.parameters())
    t1 = time.time()
    print(f"built model: {nparams / 1e6:.1f}M params in {t1 - t0:.1f}s", flush=True)

    torch.onnx.register_custom_op_symbolic("aten::diff", _diff_symbolic, 17)
    torch.onnx.register_custom_op_symbolic("aten::cumsum", _cumsum_symbolic, 17)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    # Trace with batch > 1: a batch-1 trace lets the TorchScript exporter specialise the mask
    # arithmetic to one row, and the file then fails (in onnxruntime too) for larger batches.
    ids = torch.randint(0, a.vocab, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.onnx.export(
            wrapper, (ids,), a.out, dynamo=False, opset_version=17,
            input_names=["input_ids"], output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                          "logits": {0: "batch", 1: "seq"}})
    t2 = time.time()
    size = os.path.getsize(a.out)
    base = os.path.basename(a.out)
    extra = [f for f in os.listdir(os.path.dirname(os.path.abspath(a.out)))
             if f != base and f.startswith(base)]
    print(f"exported {a.out}: {size / 1e9:.3f} GB ({size} bytes) in {t2 - t1:.1f}s",
          flush=True)
    if extra:
        print(f"WARNING: external data files were written: {extra}")

    if a.verify:
        import numpy as np
        import onnxruntime as ort

        with torch.no_grad():
            ref = wrapper(ids).numpy()
        del wrapper
        sess = ort.InferenceSession(a.out, providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {"input_ids": ids.numpy()})[0]
        err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
        print(f"verify: ort vs torch max rel err {err:.2e} "
              f"(logits {list(got.shape)}) in {time.time() - t2:.1f}s")
        if err > 1e-4:
            sys.exit(1)


if __name__ == "__main__":
    main()
