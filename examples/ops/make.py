#!/usr/bin/env python3
"""Build the single-op ONNX conformance cases in examples/ops/.

Run from the repository root:

    python3 examples/ops/make.py

Each case is a tiny ONNX model built with ``onnx.helper`` that exercises one op
(or one attribute / opset-signature variant of an op, or a short chain of
elementwise ops).  For every case the script writes

* ``examples/ops/<case>.onnx``                 the model
* ``examples/ops/<case>/inputs/<input>.npy``    one file per graph input
* ``examples/ops/<case>/ref/<output>.npy``      onnxruntime's output (CPU EP)

and ``examples/ops/manifest.json``::

    {"cases": [{"name", "opset", "ops": [op types], "inputs": [names],
                "outputs": [names]}]}

Conventions (memc's importer needs shape operands to be compile-time
constants):

* every graph input has a fully static shape; graph outputs are named ``y``
  (and ``y2`` when there are two) and get the static shapes and element types
  onnxruntime produced;
* operands such as axes, shapes, starts/ends, split sizes, ``k`` are
  initializers or ``Constant`` nodes, never graph inputs;
* float inputs are float32 drawn from a normal distribution; index inputs are
  in-range int64 and masks are bool.

The output is deterministic: each case's inputs come from a
``numpy.random.default_rng`` seeded with the CRC32 of the case name, so adding
or reordering cases does not change the others.  Graph optimizations are
disabled in onnxruntime so every reference is computed by the op's own kernel.
"""

import json
import os
import shutil
import sys
import zlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
I64_MAX = np.iinfo(np.int64).max

CASES = []


# --------------------------------------------------------------------------- helpers

def rng_for(name):
    return np.random.default_rng(zlib.crc32(name.encode()))


def init(name, value, dtype=None):
    """Initializer tensor from a Python / numpy value."""
    arr = np.asarray(value, dtype=dtype)
    return numpy_helper.from_array(arr, name)


def const(out, value, dtype=None):
    """A Constant node with a `value` tensor attribute."""
    arr = np.asarray(value, dtype=dtype)
    return helper.make_node("Constant", [], [out], value=numpy_helper.from_array(arr, out + "_value"))


def node(op, ins, outs, **attrs):
    return helper.make_node(op, ins, outs, **attrs)


def case(name, opset, nodes, inputs, outputs=("y",), inits=()):
    """Register a case.  `inputs` maps input name -> numpy array (order kept)."""
    assert name not in {c["name"] for c in CASES}, name
    CASES.append(dict(name=name, opset=opset, nodes=list(nodes), inputs=dict(inputs),
                      outputs=list(outputs), inits=list(inits)))


NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.bool_): TensorProto.BOOL,
}


def build_model(c, out_info=None):
    """Model proto; outputs typed from shape inference or, when known, from results."""
    inputs = [helper.make_tensor_value_info(k, NP_TO_ONNX[v.dtype], list(v.shape))
              for k, v in c["inputs"].items()]
    if out_info is None:
        outputs = [onnx.ValueInfoProto(name=o) for o in c["outputs"]]
    else:
        outputs = [helper.make_tensor_value_info(o, NP_TO_ONNX[out_info[o].dtype], list(out_info[o].shape))
                   for o in c["outputs"]]
    graph = helper.make_graph(c["nodes"], c["name"], inputs, outputs, initializer=c["inits"])
    opsets = [helper.make_opsetid("", c["opset"])]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="memc-examples-ops")
    model.ir_version = max(8, helper.find_min_ir_version_for(opsets))
    return model


def run_case(c):
    # First pass: let ONNX shape inference type the outputs so onnxruntime can load it.
    model = build_model(c)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    for o in model.graph.output:
        if not o.type.tensor_type.elem_type:
            raise RuntimeError(f"{c['name']}: could not infer type of output {o.name}")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    results = sess.run(c["outputs"], c["inputs"])
    out = {name: np.asarray(r) for name, r in zip(c["outputs"], results)}
    # Final model: outputs carry the exact static shapes/types onnxruntime produced.
    final = build_model(c, out)
    onnx.checker.check_model(final, full_check=True)
    sess = ort.InferenceSession(final.SerializeToString(), so, providers=["CPUExecutionProvider"])
    again = sess.run(c["outputs"], c["inputs"])
    for name, r in zip(c["outputs"], again):
        np.testing.assert_array_equal(r, out[name])
    return final, out


# --------------------------------------------------------------------------- data

def normal(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def positive(rng, *shape, eps=0.1):
    return (np.abs(rng.standard_normal(shape)) + eps).astype(np.float32)


def bools(rng, *shape):
    return rng.random(shape) < 0.5


def ints(rng, lo, hi, *shape):
    return rng.integers(lo, hi, size=shape, dtype=np.int64)


# --------------------------------------------------------------------------- cases

def elementwise():
    n = "add_bcast"
    r = rng_for(n)
    case(n, 17, [node("Add", ["x", "a"], ["y"]), node("Add", ["x", "b"], ["y2"])],
         {"x": normal(r, 2, 3, 4), "a": normal(r, 4), "b": normal(r, 3, 1)}, ["y", "y2"])
    n = "sub_bcast"
    r = rng_for(n)
    case(n, 17, [node("Sub", ["x", "a"], ["y"]), node("Sub", ["b", "x"], ["y2"])],
         {"x": normal(r, 2, 3, 4), "a": normal(r, 4), "b": normal(r, 3, 1)}, ["y", "y2"])
    n = "mul_bcast"
    r = rng_for(n)
    case(n, 17, [node("Mul", ["x", "a"], ["y"]), node("Mul", ["b", "x"], ["y2"])],
         {"x": normal(r, 2, 3, 4), "a": normal(r, 4), "b": normal(r, 3, 1)}, ["y", "y2"])
    n = "div_bcast"
    r = rng_for(n)
    case(n, 17, [node("Div", ["x", "a"], ["y"]), node("Div", ["b", "x2"], ["y2"])],
         {"x": normal(r, 2, 3, 4), "a": positive(r, 4, eps=0.5),
          "b": normal(r, 3, 1), "x2": positive(r, 2, 3, 4, eps=0.5)}, ["y", "y2"])
    # Pow: float exponent tensor (broadcast [4]) and float scalar initializer.
    n = "pow_float"
    r = rng_for(n)
    case(n, 17, [node("Pow", ["x", "e"], ["y"]), node("Pow", ["x", "s"], ["y2"])],
         {"x": positive(r, 2, 3, 4), "e": normal(r, 4)}, ["y", "y2"],
         inits=[init("s", 2.5, np.float32)])
    # Pow with an int64 scalar exponent (opset >= 12 allows mixed types).
    n = "pow_int_exp"
    r = rng_for(n)
    case(n, 17, [node("Pow", ["x", "e3"], ["y"]), node("Pow", ["x", "e2"], ["y2"])],
         {"x": normal(r, 2, 3, 4)}, ["y", "y2"],
         inits=[init("e3", 3, np.int64), init("e2", 2, np.int64)])
    # Single unary ops.
    for op, data in [("Sqrt", "abs"), ("Reciprocal", "abs"), ("Neg", "normal"), ("Exp", "normal"),
                     ("Log", "abs"), ("Tanh", "normal"), ("Erf", "normal"), ("Sigmoid", "normal"),
                     ("Cos", "normal"), ("Sin", "normal")]:
        n = op.lower()
        r = rng_for(n)
        x = positive(r, 2, 3, 4) if data == "abs" else normal(r, 2, 3, 4) * np.float32(2)
        case(n, 17, [node(op, ["x"], ["y"])], {"x": x.astype(np.float32)})
    # Chains of unary ops.
    n = "unary_chain_a"
    r = rng_for(n)
    case(n, 17, [node("Neg", ["x"], ["t0"]), node("Exp", ["t0"], ["t1"]),
                 node("Log", ["t1"], ["t2"]), node("Tanh", ["t2"], ["y"]),
                 node("Sqrt", ["t1"], ["t3"]), node("Reciprocal", ["t3"], ["y2"])],
         {"x": normal(r, 2, 5)}, ["y", "y2"])
    n = "unary_chain_b"
    r = rng_for(n)
    case(n, 17, [node("Sin", ["x"], ["t0"]), node("Cos", ["x"], ["t1"]),
                 node("Mul", ["t0", "t1"], ["t2"]), node("Erf", ["t2"], ["t3"]),
                 node("Sigmoid", ["t3"], ["y"]), node("Sub", ["t0", "t1"], ["t4"]),
                 node("Div", ["t4", "x2"], ["y2"])],
         {"x": normal(r, 2, 3, 4), "x2": positive(r, 4, eps=0.5)}, ["y", "y2"])


def comparisons():
    def pair(r, shape_a, shape_b):
        # Values on a coarse grid so equality actually occurs.
        a = np.round(normal(r, *shape_a))
        b = np.round(normal(r, *shape_b))
        return a.astype(np.float32), b.astype(np.float32)

    for op in ["Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"]:
        n = {"Equal": "equal", "Less": "less", "LessOrEqual": "less_or_equal",
             "Greater": "greater", "GreaterOrEqual": "greater_or_equal"}[op]
        r = rng_for(n)
        a, b = pair(r, (2, 3, 4), (2, 3, 4))
        c, _ = pair(r, (4,), (1,))
        case(n, 17, [node(op, ["a", "b"], ["y"]), node(op, ["a", "c"], ["y2"])],
             {"a": a, "b": b, "c": c}, ["y", "y2"])
    n = "equal_int"
    r = rng_for(n)
    case(n, 17, [node("Equal", ["a", "b"], ["y"])],
         {"a": ints(r, 0, 3, 2, 3, 4), "b": ints(r, 0, 3, 3, 1)})
    n = "not"
    r = rng_for(n)
    case(n, 17, [node("Not", ["m"], ["y"])], {"m": bools(r, 2, 3, 4)})
    n = "and"
    r = rng_for(n)
    case(n, 17, [node("And", ["m", "n"], ["y"]), node("And", ["m", "k"], ["y2"])],
         {"m": bools(r, 2, 3, 4), "n": bools(r, 2, 3, 4), "k": bools(r, 3, 1)}, ["y", "y2"])
    n = "where_bcast"
    r = rng_for(n)
    case(n, 17, [node("Where", ["cond", "x", "z"], ["y"])],
         {"cond": np.array([[True], [False], [True]]), "x": normal(r, 2, 3, 4), "z": normal(r, 4)})
    n = "where_from_less"
    r = rng_for(n)
    case(n, 17, [node("Less", ["x", "t"], ["c"]), node("Where", ["c", "x", "t"], ["y"])],
         {"x": normal(r, 2, 3, 4), "t": normal(r, 3, 1)})
    # IsNaN: NaN from Sqrt of negatives, and from 0/0 (Sub(x,x) / m with zeros in m).
    n = "isnan"
    r = rng_for(n)
    case(n, 17, [node("Sqrt", ["x"], ["s"]), node("IsNaN", ["s"], ["y"]),
                 node("Sub", ["x", "x"], ["z"]), node("Div", ["z", "m"], ["d"]),
                 node("IsNaN", ["d"], ["y2"])],
         {"x": normal(r, 2, 3, 4)}, ["y", "y2"],
         inits=[init("m", [0.0, 1.0, 0.0, 2.0], np.float32)])
    n = "max_variadic"
    r = rng_for(n)
    case(n, 17, [node("Max", ["a", "b", "c"], ["y"])],
         {"a": normal(r, 2, 3, 4), "b": normal(r, 4), "c": normal(r, 3, 1)})


def casts():
    n = "cast_float_to_int64"
    x = np.array([[1.7, -1.7, 2.5, -2.5, 0.5], [-0.5, 3.99, -3.99, 0.0, 100.25]], np.float32)
    case(n, 17, [node("Cast", ["x"], ["y"], to=TensorProto.INT64)], {"x": x})
    n = "cast_float_to_bool"
    x = np.array([[0.0, -0.0, 1e-30, -2.5, 0.5], [1.0, 0.0, -1e-3, 3.0, 0.0]], np.float32)
    case(n, 17, [node("Cast", ["x"], ["y"], to=TensorProto.BOOL)], {"x": x})
    n = "cast_int64_to_float"
    r = rng_for(n)
    x = np.concatenate([ints(r, -1000, 1000, 6),
                        np.array([2**24 + 1, -(2**40) - 3, 2**53 + 1, 0], np.int64)]).reshape(2, 5)
    case(n, 17, [node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], {"x": x})
    n = "cast_float16_roundtrip"
    r = rng_for(n)
    special = np.array([1 + 2**-11,        # tie -> even (1.0)
                        1 + 3 * 2**-11,    # tie -> even (1 + 2**-9)
                        -(1 + 2**-11),
                        65504.0, 65519.0,  # max finite, rounds to max
                        65520.0, 1e6,      # overflow -> inf
                        6e-8, 1e-8, 3e-5,  # subnormal / underflow
                        0.1, -0.0], np.float32)
    x = np.concatenate([special, normal(r, 12) * np.float32(100)]).reshape(2, 3, 4)
    case(n, 17, [node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
                 node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)], {"x": x})
    # CastLike (opset 15): the dynamo exporter's unoptimised graphs cast scalars this way.
    n = "castlike_float_to_int64"
    x = np.array([[1.7, -1.7, 2.5, -2.5, 0.5], [-0.5, 3.99, -3.99, 0.0, 100.25]], np.float32)
    case(n, 15, [node("CastLike", ["x", "t"], ["y"])],
         {"x": x, "t": np.array([3], np.int64)})
    n = "castlike_int64_to_float"
    x = np.array([[2**24 + 1, -7, 0], [5, -(2**40) - 3, 12]], np.int64)
    case(n, 20, [node("CastLike", ["x", "t"], ["y"])],
         {"x": x, "t": np.zeros((2, 2), np.float32)})


def matmuls():
    n = "matmul_3d_2d"
    r = rng_for(n)
    case(n, 17, [node("MatMul", ["a", "b"], ["y"])], {"a": normal(r, 2, 3, 4), "b": normal(r, 4, 5)})
    n = "matmul_batch_bcast"
    r = rng_for(n)
    case(n, 17, [node("MatMul", ["a", "b"], ["y"])], {"a": normal(r, 2, 1, 3, 4), "b": normal(r, 3, 4, 2)})
    n = "matmul_vec"
    r = rng_for(n)
    case(n, 17, [node("MatMul", ["a", "b"], ["y"])], {"a": normal(r, 4), "b": normal(r, 4, 5)})
    n = "gemm_trans_alpha_beta"
    r = rng_for(n)
    case(n, 17, [node("Gemm", ["a", "b", "c"], ["y"], transA=1, transB=1, alpha=0.5, beta=2.0)],
         {"a": normal(r, 4, 3), "b": normal(r, 5, 4)}, inits=[init("c", normal(r, 5))])
    n = "gemm_no_c"
    r = rng_for(n)
    case(n, 17, [node("Gemm", ["a", "b"], ["y"])], {"a": normal(r, 3, 4), "b": normal(r, 4, 5)})


def softmaxes():
    for op in ["Softmax", "LogSoftmax"]:
        for axis, tag in [(1, "axis1"), (-1, "axis_neg1")]:
            n = f"{op.lower()}_{tag}"
            r = rng_for(n)
            case(n, 13, [node(op, ["x"], ["y"], axis=axis)], {"x": normal(r, 2, 3, 4) * np.float32(3)})


def layernorms():
    n = "layernorm_last_bias"
    r = rng_for(n)
    case(n, 17, [node("LayerNormalization", ["x", "scale", "bias"], ["y"], axis=-1)],
         {"x": normal(r, 2, 3, 4)}, inits=[init("scale", 1 + 0.2 * normal(r, 4)), init("bias", 0.2 * normal(r, 4))])
    n = "layernorm_last_nobias"
    r = rng_for(n)
    case(n, 17, [node("LayerNormalization", ["x", "scale"], ["y"], axis=-1, epsilon=1e-3)],
         {"x": normal(r, 2, 3, 4)}, inits=[init("scale", 1 + 0.2 * normal(r, 4))])
    n = "layernorm_axis1"
    r = rng_for(n)
    case(n, 17, [node("LayerNormalization", ["x", "scale", "bias"], ["y"], axis=1)],
         {"x": normal(r, 2, 3, 4)},
         inits=[init("scale", 1 + 0.2 * normal(r, 3, 4)), init("bias", 0.2 * normal(r, 3, 4))])


def reductions():
    def red(name, opset, op, axes, keepdims, as_input):
        r = rng_for(name)
        attrs = {"keepdims": keepdims}
        ins = ["x"]
        inits = []
        if axes is not None:
            if as_input:
                ins.append("axes")
                inits.append(init("axes", axes, np.int64))
            else:
                attrs["axes"] = axes
        case(name, opset, [node(op, ins, ["y"], **attrs)], {"x": normal(r, 2, 3, 4)}, inits=inits)

    # ReduceSum: axes input at 13, attribute at 11.
    red("reducesum13_axes1_keep", 13, "ReduceSum", [1], 1, True)
    red("reducesum13_axes_neg_nokeep", 13, "ReduceSum", [-1, 0], 0, True)
    red("reducesum13_all_keep", 13, "ReduceSum", None, 1, True)
    red("reducesum11_axes_neg_nokeep", 11, "ReduceSum", [-2], 0, False)
    red("reducesum11_all_nokeep", 11, "ReduceSum", None, 0, False)
    # ReduceMean / ReduceMax: attribute at 17, input at 18.
    red("reducemean17_axes1_keep", 17, "ReduceMean", [1], 1, False)
    red("reducemean17_axes_neg_nokeep", 17, "ReduceMean", [-1], 0, False)
    red("reducemean18_axes_neg_keep", 18, "ReduceMean", [-1, -3], 1, True)
    red("reducemean18_axes2_nokeep", 18, "ReduceMean", [2], 0, True)
    red("reducemean18_all_nokeep", 18, "ReduceMean", None, 0, True)
    red("reducemax17_axes_neg_keep", 17, "ReduceMax", [-2], 1, False)
    red("reducemax17_all_keep", 17, "ReduceMax", None, 1, False)
    red("reducemax18_axes02_nokeep", 18, "ReduceMax", [0, 2], 0, True)
    red("reducemax18_axes_neg_keep", 18, "ReduceMax", [-1], 1, True)


def gathers():
    n = "gather_axis0_neg"
    r = rng_for(n)
    case(n, 17, [node("Gather", ["x", "idx"], ["y"], axis=0)],
         {"x": normal(r, 5, 3), "idx": np.array([[0, -1], [-2, 3]], np.int64)})
    n = "gather_axis1_neg"
    r = rng_for(n)
    case(n, 17, [node("Gather", ["x", "idx"], ["y"], axis=1)],
         {"x": normal(r, 2, 5, 3), "idx": np.array([[-1, 0], [2, -4]], np.int64)})
    n = "gather_elements_axis1"
    r = rng_for(n)
    case(n, 17, [node("GatherElements", ["x", "idx"], ["y"], axis=1)],
         {"x": normal(r, 2, 3, 4), "idx": ints(r, -3, 3, 2, 2, 4)})
    n = "gather_nd_idx2x2"
    r = rng_for(n)
    case(n, 17, [node("GatherND", ["x", "idx"], ["y"], batch_dims=0)],
         {"x": normal(r, 3, 4, 2), "idx": np.array([[2, 1], [0, 3]], np.int64)})
    n = "gather_nd_idx2x1"
    r = rng_for(n)
    case(n, 17, [node("GatherND", ["x", "idx"], ["y"])],
         {"x": normal(r, 3, 4, 2), "idx": np.array([[1], [2]], np.int64)})


def shapes():
    n = "reshape14_zero_neg1"
    r = rng_for(n)
    case(n, 14, [node("Reshape", ["x", "shape"], ["y"], allowzero=0)], {"x": normal(r, 2, 3, 4)},
         inits=[init("shape", [0, -1, 2], np.int64)])
    n = "reshape14_neg1_first"
    r = rng_for(n)
    case(n, 14, [node("Reshape", ["x", "shape"], ["y"])], {"x": normal(r, 2, 3, 4)},
         inits=[init("shape", [-1, 0, 2], np.int64)])
    n = "flatten_axis2"
    r = rng_for(n)
    case(n, 17, [node("Flatten", ["x"], ["y"], axis=2)], {"x": normal(r, 2, 3, 4)})
    n = "transpose_perm"
    r = rng_for(n)
    case(n, 17, [node("Transpose", ["x"], ["y"], perm=[2, 0, 1])], {"x": normal(r, 2, 3, 4)})
    n = "transpose_default"
    r = rng_for(n)
    case(n, 17, [node("Transpose", ["x"], ["y"])], {"x": normal(r, 2, 3, 4)})
    n = "unsqueeze11_attr_neg"
    r = rng_for(n)
    case(n, 11, [node("Unsqueeze", ["x"], ["y"], axes=[0, -1])], {"x": normal(r, 2, 3, 4)})
    n = "unsqueeze13_input_neg"
    r = rng_for(n)
    case(n, 13, [node("Unsqueeze", ["x", "axes"], ["y"])], {"x": normal(r, 2, 3, 4)},
         inits=[init("axes", [-2, 1], np.int64)])
    n = "squeeze11_attr_neg"
    r = rng_for(n)
    case(n, 11, [node("Squeeze", ["x"], ["y"], axes=[1, -1])], {"x": normal(r, 2, 1, 3, 1)})
    n = "squeeze13_input_neg"
    r = rng_for(n)
    case(n, 13, [node("Squeeze", ["x", "axes"], ["y"])], {"x": normal(r, 2, 1, 3, 1)},
         inits=[init("axes", [-3], np.int64)])
    n = "squeeze13_no_axes"
    r = rng_for(n)
    case(n, 13, [node("Squeeze", ["x"], ["y"])], {"x": normal(r, 1, 2, 1, 3)})


def slices():
    def sl(name, starts, ends, axes=None, steps=None, shape=(3, 5, 6)):
        r = rng_for(name)
        ins = ["x", "starts", "ends"]
        inits = [init("starts", starts, np.int64), init("ends", ends, np.int64)]
        if axes is not None:
            ins.append("axes")
            inits.append(init("axes", axes, np.int64))
        if steps is not None:
            if axes is None:
                ins.append("")
            ins.append("steps")
            inits.append(init("steps", steps, np.int64))
        case(name, 13, [node("Slice", ins, ["y"])], {"x": normal(r, *shape)}, inits=inits)

    sl("slice13_neg_starts", [-2, -4], [I64_MAX, -1], axes=[2, 1])
    sl("slice13_ends_int64max", [1], [I64_MAX], axes=[0])
    sl("slice13_steps2", [0, 1], [I64_MAX, 6], axes=[1, 2], steps=[2, 2])
    sl("slice13_all_axes", [0, 1, -5], [2, 100, 5])
    n = "slice9_attrs"
    r = rng_for(n)
    case(n, 9, [node("Slice", ["x"], ["y"], starts=[1, -3], ends=[1000, -1], axes=[0, 2])],
         {"x": normal(r, 3, 5, 6)})


def concat_split():
    n = "concat_neg_axis_3in"
    r = rng_for(n)
    case(n, 17, [node("Concat", ["a", "b", "c"], ["y"], axis=-1)],
         {"a": normal(r, 2, 3, 4), "b": normal(r, 2, 3, 1), "c": normal(r, 2, 3, 2)})
    n = "split13_sizes_input"
    r = rng_for(n)
    case(n, 13, [node("Split", ["x", "split"], ["y", "y2"], axis=1)], {"x": normal(r, 2, 3, 4)},
         ["y", "y2"], inits=[init("split", [1, 2], np.int64)])
    n = "split18_num_outputs"
    r = rng_for(n)
    case(n, 18, [node("Split", ["x"], ["y", "y2"], axis=-1, num_outputs=2)], {"x": normal(r, 2, 3, 4)},
         ["y", "y2"])
    n = "split11_attr"
    r = rng_for(n)
    case(n, 11, [node("Split", ["x"], ["y", "y2"], axis=2, split=[3, 1])], {"x": normal(r, 2, 3, 4)},
         ["y", "y2"])


def misc():
    n = "expand"
    r = rng_for(n)
    case(n, 17, [node("Expand", ["x", "shape"], ["y"])], {"x": normal(r, 3, 1)},
         inits=[init("shape", [2, 3, 4], np.int64)])
    for upper, k, tag in [(1, 1, "upper_k1"), (0, -1, "lower_kneg1"), (1, -1, "upper_kneg1"),
                          (0, 1, "lower_k1")]:
        n = f"trilu_{tag}"
        r = rng_for(n)
        case(n, 14, [node("Trilu", ["x", "k"], ["y"], upper=upper)], {"x": normal(r, 2, 4, 4)},
             inits=[init("k", k, np.int64)])
    n = "identity"
    r = rng_for(n)
    case(n, 17, [node("Identity", ["x"], ["y"])], {"x": normal(r, 2, 3, 4)})

    n = "constant_of_shape"
    r = rng_for(n)
    case(n, 17, [const("shape", [2, 3, 4], np.int64),
                 node("ConstantOfShape", ["shape"], ["c"],
                      value=helper.make_tensor("value", TensorProto.FLOAT, [1], [1.5])),
                 node("Add", ["x", "c"], ["y"])],
         {"x": normal(r, 2, 3, 4)})
    n = "constant_value_attrs"
    r = rng_for(n)
    case(n, 17, [node("Constant", [], ["cf"], value_floats=[0.5, -1.0, 2.0, 0.25, 3.0]),
                 node("Add", ["x", "cf"], ["y"]),
                 node("Constant", [], ["ci"], value_int=3),
                 node("Cast", ["ci"], ["cif"], to=TensorProto.FLOAT),
                 node("Mul", ["x", "cif"], ["y2"])],
         {"x": normal(r, 2, 5)}, ["y", "y2"])
    n = "shape15_start_end_reshape"
    r = rng_for(n)
    case(n, 15, [node("Shape", ["x"], ["s0"], end=1),
                 const("neg1", [-1], np.int64),
                 node("Concat", ["s0", "neg1"], ["shape_a"], axis=0),
                 node("Reshape", ["x", "shape_a"], ["y"]),
                 node("Shape", ["x"], ["s1"], start=-2),
                 node("Concat", ["neg1", "s1"], ["shape_b"], axis=0),
                 node("Reshape", ["w", "shape_b"], ["y2"])],
         {"x": normal(r, 2, 3, 4), "w": normal(r, 6, 4)}, ["y", "y2"])
    n = "range_gather"
    r = rng_for(n)
    case(n, 17, [const("start", 4, np.int64), const("limit", -1, np.int64), const("delta", -2, np.int64),
                 node("Range", ["start", "limit", "delta"], ["idx"]),
                 node("Gather", ["x", "idx"], ["y"], axis=0)],
         {"x": normal(r, 5, 3)})
    n = "cumsum14_const_exclusive"
    r = rng_for(n)
    case(n, 14, [const("v", [1, 2, 3, 4], np.int64), const("axis", 0, np.int64),
                 node("CumSum", ["v", "axis"], ["cs"], exclusive=1, reverse=0),
                 node("Cast", ["cs"], ["csf"], to=TensorProto.FLOAT),
                 node("Add", ["x", "csf"], ["y"])],
         {"x": normal(r, 2, 3, 4)})


def gelus():
    for approx in ["none", "tanh"]:
        n = f"gelu20_{approx}"
        r = rng_for(n)
        case(n, 20, [node("Gelu", ["x"], ["y"], approximate=approx)], {"x": normal(r, 2, 3, 4) * np.float32(2)})


# --------------------------------------------------------------------------- main

def main():
    elementwise()
    comparisons()
    casts()
    matmuls()
    softmaxes()
    layernorms()
    reductions()
    gathers()
    shapes()
    slices()
    concat_split()
    misc()
    gelus()

    manifest = {"cases": []}
    failures = []
    rows = []
    for c in CASES:
        name = c["name"]
        try:
            model, out = run_case(c)
        except Exception as e:  # report every failing case, then exit non-zero
            failures.append((name, f"{type(e).__name__}: {e}"))
            continue
        onnx.save(model, os.path.join(HERE, name + ".onnx"))
        cdir = os.path.join(HERE, name)
        shutil.rmtree(cdir, ignore_errors=True)
        os.makedirs(os.path.join(cdir, "inputs"))
        os.makedirs(os.path.join(cdir, "ref"))
        for k, v in c["inputs"].items():
            np.save(os.path.join(cdir, "inputs", k + ".npy"), v)
        for k, v in out.items():
            np.save(os.path.join(cdir, "ref", k + ".npy"), v)
        ops = []
        for nd in model.graph.node:
            if nd.op_type not in ops:
                ops.append(nd.op_type)
        manifest["cases"].append({"name": name, "opset": c["opset"], "ops": ops,
                                  "inputs": list(c["inputs"]), "outputs": c["outputs"]})
        shapes_ = ", ".join(f"{k}:{v.dtype}{list(v.shape)}" for k, v in out.items())
        rows.append((name, c["opset"], model.ir_version, " ".join(ops), shapes_))

    with open(os.path.join(HERE, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")

    w = max(len(r[0]) for r in rows)
    print(f"{'case':<{w}}  opset  ir  {'ops':<36} outputs")
    for name, opset, irv, ops, outs in rows:
        print(f"{name:<{w}}  {opset:>5}  {irv:>2}  {ops:<36} {outs}")
    print(f"{len(rows)} cases ok, {len(failures)} failed (onnxruntime {ort.__version__}, onnx {onnx.__version__})")
    for name, err in failures:
        print(f"FAILED {name}: {err}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
