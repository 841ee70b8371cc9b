"""Writes the seed corpus for the `onnx_loader` fuzz target into fuzz/seeds/.

Small hand-built graphs covering the frontend's paths (dynamic dims, shape subgraphs, masks,
Split/Slice/Gemm/LayerNormalization) plus a one-layer, d_model 8 Llama and GPT-2 from both
PyTorch exporters. Run from the repository root: python3 fuzz/make_seeds.py
"""
import os
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = "fuzz/seeds"
os.makedirs(OUT, exist_ok=True)


def save(name, nodes, inputs, outputs, inits=(), opset=18):
    g = helper.make_graph(nodes, name, inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.save(m, f"{OUT}/{name}.onnx")


f = TensorProto.FLOAT
i64 = TensorProto.INT64
x = helper.make_tensor_value_info("x", f, ["batch", 4])
y = helper.make_tensor_value_info("y", f, None)
w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4) / 16, "w")
save("add", [helper.make_node("Add", ["x", "x"], ["y"])], [x], [y])
save("matmul_softmax", [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Softmax", ["h"], ["y"], axis=-1)], [x], [y], [w])
save(
    "shape_reshape",
    [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "zero1"], ["b1"]),
        helper.make_node("Concat", ["b1", "two", "two"], ["t"], axis=0),
        helper.make_node("Reshape", ["x", "t"], ["y"]),
    ],
    [x],
    [y],
    [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([0], np.int64), "zero1"),
        numpy_helper.from_array(np.array([2], np.int64), "two"),
    ],
)
save(
    "mask",
    [
        helper.make_node("Range", ["r0", "r4", "r1"], ["r"]),
        helper.make_node("Unsqueeze", ["r", "ax"], ["rc"]),
        helper.make_node("Less", ["r", "rc"], ["m"]),
        helper.make_node("Where", ["m", "x", "ninf"], ["y"]),
    ],
    [helper.make_tensor_value_info("x", f, [4, 4])],
    [y],
    [
        numpy_helper.from_array(np.array(0, np.int64), "r0"),
        numpy_helper.from_array(np.array(4, np.int64), "r4"),
        numpy_helper.from_array(np.array(1, np.int64), "r1"),
        numpy_helper.from_array(np.array([1], np.int64), "ax"),
        numpy_helper.from_array(np.array(-1e9, np.float32), "ninf"),
    ],
)
save(
    "split_gemm_ln",
    [
        helper.make_node("Split", ["x"], ["a", "b"], axis=1, num_outputs=2),
        helper.make_node("Concat", ["b", "a"], ["c"], axis=1),
        helper.make_node("Gemm", ["c", "w", "bias"], ["g"], transB=1, alpha=0.5),
        helper.make_node("LayerNormalization", ["g", "scale", "bias"], ["y"], axis=-1, epsilon=1e-5),
    ],
    [helper.make_tensor_value_info("x", f, [2, 4])],
    [y],
    [w, numpy_helper.from_array(np.ones(4, np.float32), "scale"), numpy_helper.from_array(np.zeros(4, np.float32), "bias")],
)

# Real exporter output, tiny.
try:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids, use_cache=False).logits

    torch.manual_seed(0)
    models = {
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=16)),
    }
    ids = torch.randint(0, 16, (1, 4))
    for name, m in models.items():
        m.eval()
        try:
            torch.onnx.export(Logits(m), (ids,), f"{OUT}/{name}-dynamo.onnx", dynamo=True, opset_version=18,
                              input_names=["input_ids"], output_names=["logits"], external_data=False)
        except Exception as e:  # noqa: BLE001 - seeds are best effort
            print(f"{name} dynamo seed skipped: {e}")
        try:
            torch.onnx.export(Logits(m), (ids,), f"{OUT}/{name}-torchscript.onnx", dynamo=False, opset_version=17,
                              input_names=["input_ids"], output_names=["logits"])
        except Exception as e:  # noqa: BLE001
            print(f"{name} torchscript seed skipped: {e}")
except ImportError:
    print("torch/transformers missing: only hand-built seeds written")
for f_ in sorted(os.listdir(OUT)):
    print(f_, os.path.getsize(f"{OUT}/{f_}"))
