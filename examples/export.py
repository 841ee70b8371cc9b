#!/usr/bin/env python3
"""Regenerate the tiny ONNX example models used to test memc's importer.

Run from the repository root: ``python3 examples/export.py``

For each of four Hugging Face model families (llama, gpt2, bert, qwen2) this
builds a tiny model from a config with random weights (``torch.manual_seed(0)``,
fp32, eval mode, 2 layers, hidden size 64, vocab 256, 64 max positions; no
pretrained weights are downloaded), then adds seeded Gaussian noise (std 0.02)
to every parameter so that biases and norm weights/biases are not the trivial
0/1 of HF's init (tied embeddings stay tied), and exports it four times:

* ``dynamo``      -- ``torch.onnx.export(dynamo=True, opset_version=18)`` with
                     batch and sequence made dynamic via ``dynamic_shapes``, a
                     single file (``external_data=False``) and the exporter's
                     default ``optimize`` setting.  Model-local functions, if
                     any are left, are inlined before saving.
* ``torchscript`` -- ``torch.onnx.export(dynamo=False, opset_version=17)`` with
                     ``dynamic_axes`` naming the dims "batch" and "seq".
* ``dynamo-opset20``, ``torchscript-opset14`` -- the same at the edges of the
                     supported opset ranges (see ``EDGE_VARIANTS`` below).

Outputs (all under ``examples/models/``; ``<name>`` = ``<family>-<variant>``):

* ``<name>.onnx``                             the model (weights embedded)
* ``<name>/inputs/<input>.npy``               inputs, batch 2 x seq 16, int64
* ``<name>/ref/<output>.npy``                 onnxruntime CPU outputs
* ``<name>/torch_ref/<output>.npy``           PyTorch eager outputs
* ``manifest.json``                           per-model inputs/outputs (with the
                                              symbolic dims as declared in the
                                              graph), op types, opset imports,
                                              quirks, fallbacks and the versions
                                              of torch/transformers/onnx/ort.

Decoder models take only ``input_ids`` and return only ``logits``
(``use_cache=False``).  BERT takes ``input_ids``, ``token_type_ids`` and
``attention_mask`` (row 1 has its last 5 positions padded).

ORT results are checked against PyTorch eager (max abs diff <= 1e-4 *
max|torch|), at the reference shape and, for dynamic exports, also at a second
shape (batch 3 x seq 9) to make sure the dims really are dynamic.  The script
exits non-zero if any model fails.
"""

import json
import os
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import torch
import transformers

warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "models"
TOL = 1e-4
REF_SHAPE = (2, 16)
ALT_SHAPE = (3, 9)
DATA_SEED = 1234


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------

def make_config(family, attn):
    common = dict(attn_implementation=attn)
    if family == "llama":
        return transformers.LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, tie_word_embeddings=False, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(
            vocab_size=256, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, tie_word_embeddings=True, **common)
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64,
            **common)
    if family == "bert":
        return transformers.BertConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, type_vocab_size=2, **common)
    raise ValueError(family)


MODEL_CLASS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertForMaskedLM",
}
INPUT_NAMES = {
    "llama": ["input_ids"],
    "qwen2": ["input_ids"],
    "gpt2": ["input_ids"],
    "bert": ["input_ids", "token_type_ids", "attention_mask"],
}


class DecoderLogits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


class EncoderLogits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, token_type_ids, attention_mask):
        return self.model(input_ids=input_ids, token_type_ids=token_type_ids,
                          attention_mask=attention_mask).logits


# NOTE: the dynamo exporter records the file/line of the forward() methods
# above in every node's "pkg.torch.onnx.stack_trace" metadata, so adding or
# removing lines above them changes the bytes of the committed *-dynamo*.onnx
# files.  Keep them at lines 117 and 126.


PERTURB_SEED = 4321
PERTURB_STD = 0.02


def perturb(model, seed=PERTURB_SEED, std=PERTURB_STD):
    """Add small seeded Gaussian noise to every parameter.

    HF's random init leaves biases at 0 and norm weights at 1 (LayerNorm bias
    0), so references could not catch a missing bias add or a wrong norm
    scale, and the dynamo exporter would merge identical initializers.
    ``model.parameters()`` yields tied parameters once, so tied embeddings
    stay tied (and get the noise once).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


def build(family, attn):
    torch.manual_seed(0)
    cfg = make_config(family, attn)
    model = getattr(transformers, MODEL_CLASS[family])(cfg)
    model = model.float().eval()
    perturb(model)
    if getattr(cfg, "tie_word_embeddings", False):
        assert (model.get_input_embeddings().weight
                is model.get_output_embeddings().weight), family
    wrapper = EncoderLogits(model) if family == "bert" else DecoderLogits(model)
    return wrapper.eval()


def make_inputs(family, shape, seed):
    b, s = shape
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, 256, size=(b, s), dtype=np.int64)}
    if family == "bert":
        tt = np.zeros((b, s), dtype=np.int64)
        tt[:, s // 2:] = 1
        am = np.ones((b, s), dtype=np.int64)
        if b > 1:
            am[1, s - 5:] = 0
        feeds["token_type_ids"] = tt
        feeds["attention_mask"] = am
    return feeds


def torch_run(wrapper, feeds, names):
    with torch.no_grad():
        out = wrapper(*[torch.from_numpy(feeds[n]) for n in names])
    return out.detach().numpy()


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------

DYNAMO_OPSET = 18
TORCHSCRIPT_OPSET = 17
# (exporter, opset, name suffix): the original pair, then the edges of the
# supported opset ranges, named ``<family>-dynamo-opset20`` and
# ``<family>-torchscript-opset14`` and exported exactly like the originals.
# The dynamo exporter builds its torchlib registry at the requested opset when
# it is >= 18 (so opset-20 overloads such as ``Gelu`` are picked directly);
# should a saved model still not import the requested default-domain opset it
# is converted with ``onnx.version_converter`` (noted in the manifest), and
# postprocess() asserts the default-domain opset_import is the requested one.
VARIANTS = [
    ("dynamo", DYNAMO_OPSET, ""),
    ("torchscript", TORCHSCRIPT_OPSET, ""),
]
EDGE_VARIANTS = [
    ("dynamo", 20, "-opset20"),
    ("torchscript", 14, "-opset14"),
]


def export_dynamo(wrapper, args, names, path, dynamic, opset=DYNAMO_OPSET):
    kw = {}
    if dynamic:
        batch = torch.export.Dim("batch")
        seq = torch.export.Dim("seq")
        kw["dynamic_shapes"] = {n: {0: batch, 1: seq} for n in names}
    with torch.no_grad():
        torch.onnx.export(
            wrapper, args, str(path), dynamo=True, opset_version=opset,
            input_names=names, output_names=["logits"], external_data=False,
            **kw)


def _diff_symbolic(g, self, n, dim, prepend, append):
    """ONNX symbolic for aten::diff (missing from the TorchScript exporter).

    transformers' masking_utils calls ``torch.diff(position_ids, prepend=...)``
    (packed-sequence detection) whenever a decoder gets no attention_mask.
    Lowered to Concat + Slice + Sub, i.e. what the dynamo exporter emits.
    """
    from torch.onnx import symbolic_helper as sh

    SYMBOLICS_USED.add("aten::diff")
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
    """aten::cumsum that casts bool input to int64 first (as torch does).

    The stock TorchScript symbolic emits CumSum directly on the bool tensor
    of ``(position_diff != 1).cumsum(-1)``, which is an invalid ONNX model.
    """
    from torch.onnx import symbolic_helper as sh
    from torch.onnx import symbolic_opset11

    if sh._is_bool(self):
        SYMBOLICS_USED.add("aten::cumsum(bool)")
        self = g.op("Cast", self, to_i=onnx.TensorProto.INT64)
    return symbolic_opset11.cumsum(g, self, dim, dtype)


_SYMBOLICS_REGISTERED = set()
SYMBOLICS_USED = set()


def export_torchscript(wrapper, args, names, path, dynamic,
                       opset=TORCHSCRIPT_OPSET):
    # A symbolic registered at opset N serves every target opset >= N (until
    # a later registration), so register at each opset actually requested.
    if opset not in _SYMBOLICS_REGISTERED:
        torch.onnx.register_custom_op_symbolic("aten::diff", _diff_symbolic, opset)
        torch.onnx.register_custom_op_symbolic("aten::cumsum", _cumsum_symbolic, opset)
        _SYMBOLICS_REGISTERED.add(opset)
    kw = {}
    if dynamic:
        kw["dynamic_axes"] = {n: {0: "batch", 1: "seq"} for n in names}
        kw["dynamic_axes"]["logits"] = {0: "batch", 1: "seq"}
    with torch.no_grad():
        torch.onnx.export(
            wrapper, args, str(path), dynamo=False, opset_version=opset,
            input_names=names, output_names=["logits"], **kw)


def default_opset(m):
    return next((o.version for o in m.opset_import
                 if o.domain in ("", "ai.onnx")), None)


def postprocess(path, notes, opset):
    """Inline model-local functions (if any) and re-save as one file.

    Also makes sure the default-domain opset import is ``opset``, converting
    with ``onnx.version_converter`` if the exporter did not get there itself.
    """
    m = onnx.load(str(path))
    got = default_opset(m)
    if got != opset:
        from onnx import version_converter
        m = version_converter.convert_version(m, opset)
        notes.append(f"exporter produced default-domain opset {got}; converted "
                     f"to {opset} with onnx.version_converter")
    if len(m.functions):
        fnames = sorted({f"{f.domain}::{f.name}" for f in m.functions})
        m = onnx.inliner.inline_local_functions(m)
        notes.append(f"inlined {len(fnames)} model-local functions: "
                     + ", ".join(fnames))
        # drop now-unused opset imports of function domains
        used = {n.domain for n in iter_nodes(m.graph)}
        keep = [o for o in m.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
        del m.opset_import[:]
        m.opset_import.extend(keep)
    onnx.checker.check_model(m)
    if default_opset(m) != opset:
        raise RuntimeError(f"default-domain opset is {default_opset(m)}, "
                           f"wanted {opset}")
    onnx.save(m, str(path))
    data_files = [p for p in path.parent.iterdir()
                  if p.name.startswith(path.name) and p != path]
    for p in data_files:
        p.unlink()
    return m


# --------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------

def iter_nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from iter_nodes(g)


def dims_of(vi):
    out = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_param"):
            out.append(d.dim_param)
        elif d.HasField("dim_value"):
            out.append(d.dim_value)
        else:
            out.append(None)
    return out


def inspect_model(m):
    nodes = list(iter_nodes(m.graph))
    for f in m.functions:
        nodes.extend(f.node)
    ops = Counter((n.domain or "", n.op_type) for n in nodes)
    op_types = sorted(f"{d}::{o}" if d else o for d, o in ops)
    quirks = {}
    nondefault = sorted({d for d, _ in ops if d not in ("", "ai.onnx")})
    if nondefault:
        quirks["non_default_domains"] = nondefault
    if len(m.functions):
        quirks["local_functions"] = len(m.functions)
    const_attrs = Counter()
    for n in nodes:
        if n.op_type == "Constant":
            for a in n.attribute:
                const_attrs[a.name] += 1
    if const_attrs:
        quirks["constant_node_attrs"] = dict(sorted(const_attrs.items()))
    sub = Counter(n.op_type for n in nodes
                  if n.op_type in ("If", "Loop", "Scan"))
    if sub:
        quirks["control_flow"] = dict(sub)
    seqops = sorted({n.op_type for n in nodes if "Sequence" in n.op_type
                     or n.op_type in ("SplitToSequence", "ConcatFromSequence")})
    if seqops:
        quirks["sequence_ops"] = seqops
    interesting = ["ScatterND", "ScatterElements", "GatherND", "Trilu",
                   "Range", "Where", "Expand", "CumSum", "ConstantOfShape",
                   "Shape", "Split", "Slice", "Gemm", "Einsum", "Cast"]
    quirks["counts"] = {k: ops[("", k)] for k in interesting if ops[("", k)]}
    quirks["num_nodes"] = sum(ops.values())
    quirks["ir_version"] = m.ir_version
    quirks["value_info"] = len(m.graph.value_info)
    in_dims = {d for i in m.graph.input for d in dims_of(i) if isinstance(d, str)}
    derived = sorted({d for vi in list(m.graph.value_info) + list(m.graph.output)
                      for d in dims_of(vi) if isinstance(d, str)} - in_dims)
    if derived:
        # e.g. "seq + 1", "seq*batch", "Min(64, seq)" (dynamo value_info)
        quirks["derived_dim_params"] = derived
    uses = Counter(x for n in nodes for x in n.input)
    quirks["shared_initializers"] = sum(
        1 for i in m.graph.initializer if uses[i.name] > 1)
    quirks["rank0_initializers"] = sum(
        1 for i in m.graph.initializer if len(i.dims) == 0)
    const_dt = Counter(onnx.TensorProto.DataType.Name(a.t.data_type)
                       for n in nodes if n.op_type == "Constant"
                       for a in n.attribute if a.name == "value")
    if const_dt:
        quirks["constant_value_dtypes"] = dict(sorted(const_dt.items()))
    quirks["initializers"] = len(m.graph.initializer)
    ini_names = {i.name for i in m.graph.initializer}
    quirks["initializers_as_inputs"] = sum(
        1 for i in m.graph.input if i.name in ini_names)
    dt = Counter(onnx.TensorProto.DataType.Name(i.data_type)
                 for i in m.graph.initializer)
    quirks["initializer_dtypes"] = dict(sorted(dt.items()))
    opsets = {(o.domain or "ai.onnx"): o.version for o in m.opset_import}
    return op_types, opsets, quirks


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------

def ort_run(path, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so,
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(None, feeds)
    return dict(zip(names, outs))


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def save_npys(d, arrays):
    d.mkdir(parents=True, exist_ok=True)
    for k, v in arrays.items():
        np.save(d / f"{k}.npy", v)


def try_export(family, exporter, attn, dynamic, path, opset):
    wrapper = build(family, attn)
    names = INPUT_NAMES[family]
    feeds = make_inputs(family, REF_SHAPE, DATA_SEED)
    args = tuple(torch.from_numpy(feeds[n]) for n in names)
    if path.exists():
        path.unlink()
    fn = export_dynamo if exporter == "dynamo" else export_torchscript
    SYMBOLICS_USED.clear()
    fn(wrapper, args, names, path, dynamic, opset)
    notes = []
    if SYMBOLICS_USED:
        notes.append("custom TorchScript symbolics used (stock exporter fails): "
                     + ", ".join(sorted(SYMBOLICS_USED))
                     + " -- from transformers' packed-sequence check "
                     "(torch.diff(position_ids).ne(1).cumsum()) in mask creation")
    m = postprocess(path, notes, opset)
    ref = ort_run(path, feeds)
    tref = torch_run(wrapper, feeds, names)
    err = rel_err(ref["logits"], tref)
    alt_err = None
    if dynamic:
        alt = make_inputs(family, ALT_SHAPE, DATA_SEED + 1)
        alt_err = rel_err(ort_run(path, alt)["logits"],
                          torch_run(wrapper, alt, names))
    return m, feeds, ref, tref, err, alt_err, notes


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    manifest = {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },
        "tolerance": f"max|ort-torch| <= {TOL} * max|torch|",
        "models": [],
    }
    rows, failed = [], []
    families = ["llama", "gpt2", "bert", "qwen2"]
    # The original 8 first (unchanged order), then the opset-edge variants.
    jobs = [(f, e, o, sfx) for variants in (VARIANTS, EDGE_VARIANTS)
            for f in families for e, o, sfx in variants]
    for family, exporter, opset, suffix in jobs:
        name = f"{family}-{exporter}{suffix}"
        path = OUT / f"{name}.onnx"
        print(f"=== {name}", flush=True)
        attempts = [("sdpa", True), ("eager", True)]
        if exporter == "dynamo":
            attempts += [("sdpa", False), ("eager", False)]
        result, errors = None, []
        for attn, dynamic in attempts:
            try:
                result = try_export(family, exporter, attn, dynamic, path,
                                    opset)
                bad = result[4] > TOL or (result[5] is not None and result[5] > TOL)
                if bad:
                    errors.append(f"attn={attn} dynamic={dynamic}: mismatch "
                                  f"err={result[4]:.2e} alt_err={result[5]}")
                    print("   " + errors[-1], flush=True)
                    result = None
                    continue
                break
            except Exception as e:  # noqa: BLE001
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                errors.append(f"attn={attn} dynamic={dynamic}: {msg}")
                print("   FAILED " + errors[-1], flush=True)
                if os.environ.get("EXPORT_DEBUG"):
                    traceback.print_exc()
                result = None
        if result is None:
            failed.append(name)
            rows.append((name, "-", "-", "-", "FAIL"))
            continue
        m, feeds, ref, tref, err, alt_err, notes = result
        notes = [f"attempt failed: {e}" for e in errors] + notes
        if suffix:
            how = (f"torch.onnx.export(dynamo={exporter == 'dynamo'}, "
                   f"opset_version={opset})")
            if exporter == "dynamo" and not any(
                    "version_converter" in n for n in notes):
                how += (" directly: torchlib registry built at opset "
                        f"{opset} (>= 18), no version conversion needed")
            notes.insert(0, f"opset-edge variant of {family}-{exporter}: "
                         + how)
        if attn != "sdpa":
            notes.append(f"attn_implementation={attn!r} (sdpa export failed)")
        else:
            notes.append("attn_implementation='sdpa' (transformers default)")
        if not dynamic:
            notes.append("static shapes (dynamic export failed)")
        d = OUT / name
        for sub in ("inputs", "ref", "torch_ref"):
            if (d / sub).exists():
                for p in (d / sub).iterdir():
                    p.unlink()
        save_npys(d / "inputs", feeds)
        save_npys(d / "ref", ref)
        save_npys(d / "torch_ref", {"logits": tref})
        op_types, opsets, quirks = inspect_model(m)
        entry = {
            "name": name,
            "family": family,
            "exporter": exporter,
            "opset": opsets.get("ai.onnx"),
            "file": f"{name}.onnx",
            "attn_implementation": attn,
            "dynamic": dynamic,
            "inputs": [{"name": i.name,
                        "dtype": onnx.helper.tensor_dtype_to_np_dtype(
                            i.type.tensor_type.elem_type).name,
                        "shape": list(feeds[i.name].shape),
                        "dims": dims_of(i)}
                       for i in m.graph.input
                       if i.name not in {x.name for x in m.graph.initializer}],
            "outputs": [{"name": o.name, "shape": list(ref[o.name].shape),
                         "dims": dims_of(o)} for o in m.graph.output],
            "opset_imports": opsets,
            "op_types": op_types,
            "quirks": quirks,
            # Unique trainable tensors' elements (tied weights counted once).
            "torch_params": sum(p.numel() for p in build(family, attn).parameters()),
            "max_rel_err_ort_vs_torch": err,
            "max_rel_err_alt_shape": alt_err,
            "notes": notes,
        }
        manifest["models"].append(entry)
        size = path.stat().st_size
        print(f"   opsets {opsets}")
        print(f"   ops ({len(op_types)}): {' '.join(op_types)}")
        print(f"   quirks {json.dumps(quirks)}")
        for n in notes:
            print(f"   note: {n}")
        rows.append((name, f"{size / 1e6:.2f}MB", f"{err:.2e}",
                     "-" if alt_err is None else f"{alt_err:.2e}", "ok"))
    with open(OUT / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print()
    print(f"{'model':<28}{'size':>9}{'rel_err':>11}{'alt_err':>11}  status")
    for r in rows:
        print(f"{r[0]:<28}{r[1]:>9}{r[2]:>11}{r[3]:>11}  {r[4]}")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"total size of {OUT.relative_to(ROOT.parent)}: {total / 1e6:.2f} MB")
    if failed:
        print("FAILED:", ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
