#!/usr/bin/env python3
"""Export the model zoo: tiny random-weight Hugging Face models of many classes.

Run from the repository root: ``python3 scripts/export-zoo.py [CLASS_PREFIX ...]``
(``scripts/setup.sh --python`` installs what it needs; no model hub is contacted).

Every class in ``ZOO`` is built from a tiny config (2 layers, hidden 32, 4 heads of 8,
vocab 128; ``torch.manual_seed(0)`` then seeded noise on every parameter, as
``examples/export.py`` does), once with ``attn_implementation="eager"`` and once with
``"sdpa"``, and exported by both of PyTorch's exporters (dynamo at opset 18,
TorchScript at opset 17, batch and sequence dynamic). For each export it writes, under
``examples/zoo/``:

* ``<name>.onnx``, ``<name>`` = ``<class>-<attn>-<exporter>`` (lower case, e.g.
  ``llama-eager-dynamo``)
* ``<name>/inputs/*.npy`` (batch 2 x seq 16) and ``<name>/ref/logits.npy`` (onnxruntime)

and, once per class and attention (the weights and batch do not depend on the exporter),
``<class>-<attn>.train.json``: PyTorch's 5-step loss trajectories with SGD (lr 0.1) and
AdamW (lr 1e-3, weight decay 0.01), the loss being memc's ``--loss next-token-ce`` (mean
cross entropy of ``logits[:, :-1]`` against ``input_ids[:, 1:]``), every dropout at 0
(checked: the train-mode loss equals the eval-mode loss bit for bit),
``model.parameters()`` trained (tied weights once).

``manifest.json`` lists every export with its status: ``ok``, or ``failed`` with the
exporter's error (a class or exporter that fails is recorded, never skipped silently),
the ORT-vs-PyTorch error, and ``expected``: the blocks per layer read off the Hugging Face
config (attention heads and kv heads, FFN kind, norms per layer and their kind, the
residual form), which the zoo test compares with what memc recognises.
"""

import importlib.util
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import transformers

warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "examples" / "zoo"
SHAPE = (2, 16)
DATA_SEED = 1234
STEPS = 5

_spec = importlib.util.spec_from_file_location("export", ROOT / "examples" / "export.py")
export = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export)

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64)


def zoo():
    """(name, class, config class, config kwargs, inputs)."""
    T = transformers
    dec = ["input_ids"]
    rows = [
        ("llama", "LlamaForCausalLM", T.LlamaConfig,
         dict(COMMON, num_key_value_heads=2, tie_word_embeddings=False)),
        ("mistral", "MistralForCausalLM", T.MistralConfig,
         dict(COMMON, num_key_value_heads=2, sliding_window=8)),
        ("qwen2", "Qwen2ForCausalLM", T.Qwen2Config,
         dict(COMMON, num_key_value_heads=2, tie_word_embeddings=True)),
        ("qwen3", "Qwen3ForCausalLM", T.Qwen3Config,
         dict(COMMON, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)),
        ("phi3", "Phi3ForCausalLM", T.Phi3Config,
         dict(COMMON, num_key_value_heads=4, pad_token_id=0)),
        ("gemma", "GemmaForCausalLM", T.GemmaConfig,
         dict(COMMON, num_key_value_heads=1, head_dim=8)),
        ("gemma2", "Gemma2ForCausalLM", T.Gemma2Config,
         dict(COMMON, num_key_value_heads=2, head_dim=8, sliding_window=8,
              query_pre_attn_scalar=8)),
        ("gpt2", "GPT2LMHeadModel", T.GPT2Config,
         dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        ("gptneox", "GPTNeoXForCausalLM", T.GPTNeoXConfig,
         dict(COMMON, rotary_pct=0.25, use_parallel_residual=True)),
        ("opt", "OPTForCausalLM", T.OPTConfig,
         dict(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
              pad_token_id=1)),
        ("bert", "BertForMaskedLM", T.BertConfig,
         dict(COMMON, type_vocab_size=2)),
        ("roberta", "RobertaForMaskedLM", T.RobertaConfig,
         dict(COMMON, type_vocab_size=1, max_position_embeddings=66, pad_token_id=1)),
        ("phi", "PhiForCausalLM", T.PhiConfig,
         dict(COMMON, partial_rotary_factor=0.5)),
        ("gptbigcode", "GPTBigCodeForCausalLM", T.GPTBigCodeConfig,
         dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
              multi_query=True)),
        ("stablelm", "StableLmForCausalLM", T.StableLmConfig,
         dict(COMMON, num_key_value_heads=4, partial_rotary_factor=0.25)),
        ("olmo", "OlmoForCausalLM", T.OlmoConfig,
         dict(COMMON, num_key_value_heads=4)),
    ]
    inputs = {"bert": ["input_ids", "attention_mask", "token_type_ids"],
              "roberta": ["input_ids", "attention_mask"]}
    return [(n, c, cfg, kw, inputs.get(n, dec)) for n, c, cfg, kw in rows]


def expected(name, cfg):
    """The blocks of each layer, read off the Hugging Face config (not from memc)."""
    g = lambda *ks, d=None: next((getattr(cfg, k) for k in ks if hasattr(cfg, k)), d)  # noqa: E731
    heads = g("num_attention_heads", "n_head")
    kv = g("num_key_value_heads", d=heads)
    if getattr(cfg, "multi_query", False):
        kv = 1
    act = str(g("hidden_activation", "hidden_act", "activation_function", "hidden_activation"))
    gated = name in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2",
                     "stablelm", "olmo")
    if gated:
        ffn = "swiglu" if act == "silu" else "geglu"
    else:
        ffn = "relu" if act == "relu" else "gelu"
    rms = name in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2")
    if name == "gemma2":
        residual, norms = "sandwich", 4
    elif name in ("bert", "roberta"):
        residual, norms = "post-norm", 2
    elif name == "gptneox" and cfg.use_parallel_residual:
        residual, norms = "parallel", 2
    elif name == "phi":
        residual, norms = "parallel", 1
    elif name == "opt" and not cfg.do_layer_norm_before:
        residual, norms = "post-norm", 2
    else:
        residual, norms = "pre-norm", 2
    return {
        "layers": g("num_hidden_layers", "n_layer"),
        "attention": {"heads": heads, "kv_heads": kv,
                      "kind": "mha" if kv == heads else ("mqa" if kv == 1 else "gqa"),
                      "causal": name not in ("bert", "roberta"),
                      "sliding_window": g("sliding_window") if name in ("mistral", "gemma2") else None,
                      "softcap": g("attn_logit_softcapping") if name == "gemma2" else None,
                      "qk_norm": name == "qwen3"},
        "ffn": ffn,
        "ffn_fused_gate_up": name == "phi3",
        "norm": "rms_norm" if rms else "layer_norm",
        "norms_per_layer": norms,
        "residual": residual,
    }


class Logits(torch.nn.Module):
    def __init__(self, model, names):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        kw = {"input_ids": input_ids}
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        if "token_type_ids" not in self.names and "attention_mask" not in self.names:
            kw["use_cache"] = False
        return self.model(**kw).logits


def build(row, attn):
    name, cls, cfg_cls, kw, names = row
    torch.manual_seed(0)
    cfg = cfg_cls(attn_implementation=attn, **kw)
    model = getattr(transformers, cls)(cfg).float().eval()
    export.perturb(model)
    return Logits(model, names).eval(), cfg


def make_inputs(names, shape, seed):
    b, s = shape
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(2, 128, size=(b, s), dtype=np.int64)}
    if "token_type_ids" in names:
        tt = np.zeros((b, s), dtype=np.int64)
        tt[:, s // 2:] = 1
        feeds["token_type_ids"] = tt
    if "attention_mask" in names:
        am = np.ones((b, s), dtype=np.int64)
        am[1, s - 5:] = 0
        feeds["attention_mask"] = am
    return feeds


def run_torch(wrapper, feeds):
    with torch.no_grad():
        return wrapper(*[torch.from_numpy(feeds[n]) for n in wrapper.names]).numpy()


def zero_dropout(wrapper):
    for mod in wrapper.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
        # Float probabilities modules copy from the config (`attention_dropout`,
        # GPTBigCode's `attn_dropout`, GPT-2's `attn_pdrop`, ...).
        for attr, v in list(vars(mod).items()):
            if ("dropout" in attr or "pdrop" in attr) and isinstance(v, float):
                setattr(mod, attr, 0.0)
    for k, v in list(vars(wrapper.model.config).items()):
        if ("dropout" in k or "pdrop" in k) and isinstance(v, float):
            setattr(wrapper.model.config, k, 0.0)


def trajectories(row, attn, feeds):
    out = {}
    for kind in ("sgd", "adamw"):
        wrapper, _ = build(row, attn)
        zero_dropout(wrapper)
        ids = torch.from_numpy(feeds["input_ids"])
        args = [torch.from_numpy(feeds[n]) for n in wrapper.names]

        def next_token_ce():
            logits = wrapper(*args)
            return torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

        with torch.no_grad():
            eval_loss = next_token_ce().item()
            wrapper.train()
            train_loss = next_token_ce().item()
        if eval_loss != train_loss:
            # Some dropout is still active: the trajectory would not be memc's.
            raise RuntimeError(f"train-mode loss {train_loss} != eval-mode loss {eval_loss}")
        params = list(wrapper.parameters())
        opt = (torch.optim.SGD(params, lr=0.1) if kind == "sgd"
               else torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01))
        losses = []
        for _ in range(STEPS):
            loss = next_token_ce()
            losses.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
        out[kind] = losses
    out["params"] = sum(p.numel() for p in build(row, attn)[0].parameters())
    return out


def export_one(row, attn, exporter, feeds):
    wrapper, cfg = build(row, attn)
    name = f"{row[0]}-{attn}-{exporter}"
    path = OUT / f"{name}.onnx"
    args = tuple(torch.from_numpy(feeds[n]) for n in row[4])
    notes, errors = [], []
    for dynamic in (True, False):
        try:
            if exporter == "dynamo":
                export.export_dynamo(wrapper, args, row[4], path, dynamic, 18)
            else:
                export.export_torchscript(wrapper, args, row[4], path, dynamic, 17)
            m = export.postprocess(path, notes, 18 if exporter == "dynamo" else 17)
            # The dynamo exporter's per-node stack traces name this machine's paths and
            # double the file; the zoo drops them, keeping what memc reads (each node's FX
            # node and module scopes: which parameter a folded initializer is).
            for node in export.iter_nodes(m.graph):
                keep = [(p.key, p.value) for p in node.metadata_props
                        if p.key in ("pkg.torch.onnx.fx_node", "pkg.torch.onnx.name_scopes")]
                del node.metadata_props[:]
                for k, v in keep:
                    node.metadata_props.add(key=k, value=v)
            onnx.save(m, str(path))
            ref = export.ort_run(path, feeds)["logits"]
            err = export.rel_err(ref, run_torch(wrapper, feeds))
            if err > export.TOL:
                raise RuntimeError(f"onnxruntime differs from PyTorch by {err:.2e}")
            if not dynamic:
                notes.append("static shapes (the dynamic export failed: " + errors[-1] + ")")
            return m, ref, err, notes
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            errors.append(msg)
            if os.environ.get("EXPORT_DEBUG"):
                traceback.print_exc()
            if path.exists():
                path.unlink()
    raise RuntimeError(errors[0])


def main():
    only = sys.argv[1:]
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    man_path = OUT / "manifest.json"
    old = json.loads(man_path.read_text())["models"] if man_path.exists() else []
    entries = {e["name"]: e for e in old}
    for row in zoo():
        if only and row[0] not in only:
            continue
        for attn in ("eager", "sdpa"):
            feeds = make_inputs(row[4], SHAPE, DATA_SEED)
            try:
                _, cfg = build(row, attn)
            except Exception as e:  # noqa: BLE001
                # The class refuses this attention implementation: recorded, not skipped.
                err = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                for exporter in ("dynamo", "torchscript"):
                    name = f"{row[0]}-{attn}-{exporter}"
                    print(f"=== {name}\n   FAILED {err}", flush=True)
                    entries[name] = {"name": name, "family": row[0], "class": row[1],
                                     "attn": attn, "exporter": exporter, "status": "failed",
                                     "error": err}
                continue
            exp = expected(row[0], cfg)
            tname = f"{row[0]}-{attn}.train.json"
            try:
                traj = trajectories(row, attn, feeds)
                (OUT / tname).write_text(json.dumps(traj, indent=1) + "\n")
            except Exception as e:  # noqa: BLE001
                traj = None
                print(f"   trajectories failed: {e}", flush=True)
            for exporter in ("dynamo", "torchscript"):
                name = f"{row[0]}-{attn}-{exporter}"
                print(f"=== {name}", flush=True)
                entry = {"name": name, "family": row[0], "class": row[1], "attn": attn,
                         "exporter": exporter, "inputs": row[4], "expected": exp,
                         "train": tname if traj else None}
                try:
                    m, ref, err, notes = export_one(row, attn, exporter, feeds)
                    d = OUT / name
                    export.save_npys(d / "inputs", feeds)
                    export.save_npys(d / "ref", {"logits": ref})
                    ops = sorted({n.op_type for n in export.iter_nodes(m.graph)})
                    entry.update(status="ok", file=f"{name}.onnx", ort_vs_torch=err,
                                 notes=notes, op_types=ops,
                                 bytes=(OUT / f"{name}.onnx").stat().st_size)
                    print(f"   ok ({entry['bytes'] / 1e3:.0f} kB, err {err:.1e})", flush=True)
                except Exception as e:  # noqa: BLE001
                    entry.update(status="failed", error=str(e))
                    print(f"   FAILED {e}", flush=True)
                entries[name] = entry
    order = [f"{r[0]}-{a}-{x}" for r in zoo() for a in ("eager", "sdpa")
             for x in ("dynamo", "torchscript")]
    manifest = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnx": onnx.__version__, "onnxruntime": export.ort.__version__},
        "shape": list(SHAPE),
        "models": [entries[n] for n in order if n in entries],
    }
    man_path.write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    failed = [e["name"] for e in manifest["models"] if e["status"] != "ok"]
    print(f"zoo: {len(manifest['models']) - len(failed)} exported, {len(failed)} failed "
          f"({', '.join(failed) or 'none'}); {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
