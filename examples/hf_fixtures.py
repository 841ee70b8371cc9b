#!/usr/bin/env python3
"""Hugging Face checkpoints for the ``--weights`` / ``--save DIR`` tests.

Run from the repository root: ``python3 examples/hf_fixtures.py``
(``scripts/setup.sh --python`` installs what it needs; no model hub is contacted).

For each causal-LM family ``export.py`` builds (llama, qwen2 with tied embeddings, gpt2
with tied embeddings and Conv1D layers) this builds the same architecture as the exported
files (``export.make_config`` with the ``attn_implementation`` recorded in
``models/manifest.json``) but with **other weights** (``torch.manual_seed(HF_SEED)`` and
``export.perturb(seed=HF_PERTURB_SEED)``), so binding a checkpoint by value to the exported
initializers cannot be what makes a test pass, and writes under ``examples/models/``:

* ``<family>-hf/``: ``model.save_pretrained`` (``config.json``, ``generation_config.json``,
  ``model.safetensors``, fp32; tied weights stored once, as transformers stores them);
* ``<family>-hf-trained.safetensors``: the same model's state after 5 AdamW steps
  (``AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)``), as ``save_pretrained``
  writes it (same keys as ``<family>-hf/model.safetensors``);
* ``<family>-hf-trained.json``: ``adamw``, the 5 losses (each before its step's update).

For llama also ``llama-hf-bf16/`` (the same weights saved in bfloat16),
``llama-hf-sharded/`` (the fp32 checkpoint in shards with a
``model.safetensors.index.json``), and ``static/llama-dynamo-static.onnx``: the example llama
(``export.build``, the exported weights) exported by the dynamo exporter at fixed shapes
[2, 16], where the exporter stores the causal mask and the rotary cos/sin tables as
initializers (they must stay frozen: ``models/llama-dynamo/train_ref.json`` is its
reference).

The batch is ``models/<family>-dynamo/inputs/input_ids.npy`` (int64 [2, 16]); the loss is
transformers' causal-LM loss (``model(input_ids=ids, labels=ids).loss``: the mean cross
entropy of ``logits[:, :-1]`` against ``ids[:, 1:]``), what memc's ``--loss next-token-ce``
computes. fp32, CPU, one thread, deterministic algorithms, dropout 0, ``train()`` mode.
"""

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parent
MODELS = ROOT / "models"
HF_SEED = 7
HF_PERTURB_SEED = 8765
STEPS = 5
FAMILIES = ["llama", "qwen2", "gpt2"]

_spec = importlib.util.spec_from_file_location("export", ROOT / "export.py")
export = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export)


def build(family, attn):
    torch.manual_seed(HF_SEED)
    cfg = export.make_config(family, attn)
    # Every dropout probability 0 (as train_fixtures.py does), saved so in config.json.
    for k, v in list(vars(cfg).items()):
        if ("dropout" in k or "pdrop" in k) and isinstance(v, float):
            setattr(cfg, k, 0.0)
    model = getattr(transformers, export.MODEL_CLASS[family])(cfg).float()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(mod, attr, None), float):
                setattr(mod, attr, 0.0)
    export.perturb(model, seed=HF_PERTURB_SEED)
    return model


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    manifest = json.loads((MODELS / "manifest.json").read_text())
    attn_of = {}
    for m in manifest["models"]:
        attn_of.setdefault(m["family"], m.get("attn_implementation", "eager"))
    static = MODELS / "static"
    static.mkdir(exist_ok=True)
    wrapper = export.build("llama", attn_of.get("llama", "eager"))
    ids = torch.from_numpy(np.load(MODELS / "llama-dynamo" / "inputs" / "input_ids.npy"))
    export.export_dynamo(wrapper, (ids,), ["input_ids"], static / "llama-dynamo-static.onnx", False)
    for family in FAMILIES:
        attn = attn_of.get(family, "eager")
        ids = torch.from_numpy(np.load(MODELS / f"{family}-dynamo" / "inputs" / "input_ids.npy"))
        model = build(family, attn)
        out = MODELS / f"{family}-hf"
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out, safe_serialization=True)
        if family == "llama":
            sharded = MODELS / "llama-hf-sharded"
            shutil.rmtree(sharded, ignore_errors=True)
            model.save_pretrained(sharded, safe_serialization=True, max_shard_size="150KB")
            bf16 = MODELS / "llama-hf-bf16"
            shutil.rmtree(bf16, ignore_errors=True)
            build(family, attn).to(torch.bfloat16).save_pretrained(bf16, safe_serialization=True)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        losses = []
        for _ in range(STEPS):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            losses.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            shutil.copy(Path(tmp) / "model.safetensors", MODELS / f"{family}-hf-trained.safetensors")
        (MODELS / f"{family}-hf-trained.json").write_text(json.dumps({
            "adamw": losses,
            "lr": 1e-3,
            "weight_decay": 0.01,
            "attn_implementation": attn,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
        }, indent=1) + "\n")
        print(f"{family}: {out.relative_to(ROOT.parent)} and 5 AdamW steps, losses {losses}")


if __name__ == "__main__":
    main()
