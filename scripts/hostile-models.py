#!/usr/bin/env python3
"""Builds hostile but small ONNX models into examples/hostile/ and records what onnx's checker
and onnxruntime do with each (examples/hostile/expected.json), so tests/tests/hostile.rs can
hold memc to refusing at least what they refuse.

Each model is one malformed thing in an otherwise valid graph: external data outside the
model's directory, data shorter than its dims, an impossible attribute, an undefined operand,
an out-of-range constant index. Run with onnx and onnxruntime installed:

    python3 scripts/hostile-models.py
"""
import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "examples", "hostile")


def model(nodes, inits, inputs=(), outputs=("y",), opset=18, rank=1):
    # Outputs of unknown size (named dims) and the rank the node would give.
    dims = [f"d{i}" for i in range(rank)]
    graph = helper.make_graph(
        nodes,
        "hostile",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in outputs],
        initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def x():
    return numpy_helper.from_array(np.arange(4, dtype=np.float32), "x")


def external(name, location, offset=0, length=16, dims=(4,)):
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.FLOAT
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for k, v in [("location", location), ("offset", str(offset)), ("length", str(length))]:
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def cases():
    neg = helper.make_node("Neg", ["x"], ["y"])
    short = TensorProto()
    short.name = "x"
    short.data_type = TensorProto.FLOAT
    short.dims.extend([1 << 20])
    short.raw_data = b"\0" * 16
    negdim = TensorProto()
    negdim.name = "x"
    negdim.data_type = TensorProto.FLOAT
    negdim.dims.extend([-4])
    idx = numpy_helper.from_array(np.array([7], dtype=np.int64), "i")
    huge = TensorProto()
    huge.name = "x"
    huge.data_type = TensorProto.FLOAT
    huge.dims.extend([1 << 40])
    return {
        # A model file names files outside its directory.
        "external-parent": model([neg], [external("x", "../models/llama-dynamo/inputs/input_ids.npy")]),
        "external-absolute": model([neg], [external("x", "/etc/hostname", length=1, dims=(1,))]),
        # External data past the end of its file.
        "external-past-end": model([neg], [external("x", "hostile-data.bin", offset=8)]),
        # Raw data shorter than its dims say; a negative dim.
        "raw-data-short": model([neg], [short]),
        "negative-dim": model([neg], [negdim]),
        # A tensor of 4 TiB with no data: refused before anything is allocated.
        "huge-no-data": model([neg], [huge]),
        # Attributes no export can mean.
        "split-num-outputs": model(
            [helper.make_node("Split", ["x"], ["a", "y"], axis=0, num_outputs=-1)], [x()], outputs=("a", "y")
        ),
        "concat-ranks": model(
            [helper.make_node("Concat", ["s", "x"], ["y"], axis=0)],
            [numpy_helper.from_array(np.array(1.0, dtype=np.float32), "s"), x()],
        ),
        "transpose-perm": model([helper.make_node("Transpose", ["x"], ["y"], perm=[0, 0])], [x()]),
        "reshape-two-unknowns": model(
            [helper.make_node("Reshape", ["x", "shape"], ["y"])],
            [x(), numpy_helper.from_array(np.array([-1, -1], dtype=np.int64), "shape")],
            rank=2,
        ),
        "attribute-type": model(
            [helper.make_node("Gather", ["x", "i"], ["y"], axis=0.5)],
            [x(), numpy_helper.from_array(np.array([1], dtype=np.int64), "i")],
        ),
        # An operand nothing defines; a name defined twice.
        "undefined-operand": model([helper.make_node("Add", ["x", "nowhere"], ["y"])], [x()]),
        "defined-twice": model(
            [helper.make_node("Neg", ["x"], ["y"]), helper.make_node("Relu", ["x"], ["y"])], [x()]
        ),
        # An opset ONNX does not define.
        "opset-99": model([neg], [x()], opset=99),
        # A constant index past its table.
        "gather-constant-index": model([helper.make_node("Gather", ["x", "i"], ["y"], axis=0)], [x(), idx]),
    }


def outcome(fn):
    try:
        fn()
        return {"refused": False}
    except Exception as e:  # noqa: BLE001 - every refusal counts, whatever its type
        return {"refused": True, "error": str(e).splitlines()[0][:300] if str(e) else type(e).__name__}


def main():
    import onnxruntime as ort

    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "hostile-data.bin"), "wb") as f:
        f.write(np.arange(4, dtype=np.float32).tobytes())
    expected = {}
    for name, m in cases().items():
        path = os.path.join(OUT, name + ".onnx")
        with open(path, "wb") as f:
            f.write(m.SerializeToString())

        def check(path=path):
            onnx.checker.check_model(path, full_check=True)

        def run(path=path):
            opts = ort.SessionOptions()
            opts.log_severity_level = 4
            s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            s.run(None, {})

        expected[name] = {"onnx_checker": outcome(check), "onnxruntime": outcome(run)}
        print(f"{name}: checker {expected[name]['onnx_checker']['refused']}, ort {expected[name]['onnxruntime']['refused']}")
    meta = {"onnx": onnx.__version__, "onnxruntime": ort.__version__}
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({"versions": meta, "cases": expected}, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
