#!/usr/bin/env python3
"""Record PyTorch training references for the example models.

Run from the repository root: ``python3 examples/train_fixtures.py``

For each family that ``export.py`` builds (the causal LMs llama, gpt2, qwen2,
and the masked LM bert, trained here with the same next-token loss; see
"BERT" below) this rebuilds the exact model that was exported
(``export.build(family, attn)`` with the ``attn_implementation`` recorded in
``models/manifest.json``, i.e. the same seeded init + seeded perturbation),
checks that its parameters are bit-identical to the initializers of every
exported ONNX file of that family, and writes ``train_ref.json`` into each of
``models/<family>-{dynamo,torchscript,dynamo-opset20,torchscript-opset14}/``
(those that exist; all four hold the same weights and the same batch, so the
file content is identical).  Nothing else under ``models/`` is touched.

Setup shared by every measurement:

* batch: ``models/<family>-dynamo/inputs/input_ids.npy`` (int64 [2, 16]);
  the script asserts every variant folder holds the same array.
* loss: Hugging Face's own causal-LM loss,
  ``model(input_ids=ids, labels=ids, use_cache=False).loss``, i.e. the mean
  cross entropy of ``logits[:, :-1]`` against ``ids[:, 1:]`` (30 tokens); the
  script checks it against that formula computed by hand.
* fp32, CPU, ``torch.set_num_threads(1)`` and deterministic algorithms, so the
  numbers are reproducible bit for bit on one torch build.
* every dropout probability is 0 (config ``*dropout*``/``*pdrop*`` fields,
  ``nn.Dropout.p``, and the float ``attention_dropout`` attribute the llama/
  qwen2 attention modules copy from the config at construction) and the model
  is in ``train()`` mode; the script asserts the train-mode loss equals the
  eval-mode loss bit for bit, so the mode makes no difference.
* the model is rebuilt fresh for every trajectory.

BERT (``BertForMaskedLM`` in export.py's ``EncoderLogits`` wrapper): the model
takes ``input_ids``, ``token_type_ids`` and ``attention_mask`` (all three read
from ``models/bert-dynamo/inputs/*.npy``, checked equal across the variant
folders) and returns logits [2, 16, 256].  HF's masked-LM loss is not what
memc's ``--loss next-token-ce`` computes, so the loss is written by hand as
that: ``cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))``
(mean over all 30 positions, no ignore index; the attention mask only
masks attention, not the loss).  Dropout (``hidden_dropout_prob``,
``attention_probs_dropout_prob`` and every ``nn.Dropout``) is set to 0 as for
the causal LMs; everything else (keys, optimizers, saved-tensor rules) is the
same.

Keys of ``train_ref.json``:

* ``sgd``, ``sgd_momentum``, ``adamw``, ``adamw_clip``: 5 losses each, the
  loss computed BEFORE each step's update (``[0]`` is the initial loss):
  ``for step in range(5): loss = f(); record; loss.backward(); [clip;]
  opt.step(); opt.zero_grad()``.
  - ``sgd``: ``SGD(params, lr=0.1)`` (no momentum, no weight decay)
  - ``sgd_momentum``: ``SGD(params, lr=0.1, momentum=0.9)``
  - ``adamw``: ``AdamW(params, lr=1e-3, weight_decay=0.01)`` (betas 0.9/0.999,
    eps 1e-8, amsgrad off)
  - ``adamw_clip``: the same AdamW with
    ``clip_grad_norm_(params, 1.0)`` before each step;
    ``adamw_clip_grad_norms`` is the total L2 grad norm before clipping, per
    step (what ``clip_grad_norm_`` returns).
  - ``adamw_linear_warmup``, ``adamw_cosine_warmup``: the ``adamw`` optimizer
    under ``transformers.get_linear_schedule_with_warmup`` /
    ``get_cosine_schedule_with_warmup`` (2 warmup steps of 5), stepped after
    each update as the Trainer does; ``*_lrs`` is the rate each update used.
  - ``adamw_labels_linear_warmup``, ``adamw_labels_cosine_warmup``: the
    linear and cosine ones with ``labels`` =
    ``masked_labels`` (written as ``masked_labels``): the ids with the first
    6 / 3 positions of the rows and row 1's column 10 at -100, HF's
    ``model(input_ids, labels=labels).loss`` (mean over the kept positions).
  ``params`` is ``model.parameters()``: tied weights (gpt2, qwen2 embedding /
  LM head) are one parameter and are updated once.  Values are the fp32
  results written as Python floats (full repr, exact).
* ``adamw_moc_k32`` (Llama and Qwen2, the SwiGLU families): the ``adamw``
  trajectory with every MLP made a Mixture-of-Channels block (what memc's
  ``--moc-k 32`` computes): ``g = gate_proj(x); u = up_proj(x); m =
  zeros_like(g).scatter(-1, topk(g, 32).indices, 1); down_proj(act_fn(g) * m *
  u)``.
* ``saved_activation_bytes`` etc.: what PyTorch eager keeps for backward in
  one forward of the loss (same batch, fp32, train mode, grad enabled), seen
  through ``torch.autograd.graph.saved_tensors_hooks``: the pack hook sees
  every tensor any autograd node saves.
  - ``saved_tensors``: number of pack-hook calls (every saved tensor, counting
    repeats and parameters).
  - A saved tensor is a *parameter* if its storage is the storage of a
    parameter (parameters themselves and views such as ``weight.t()``).
    ``saved_param_bytes_excluded`` is the bytes of those, deduplicated by view
    key (below), sizes as ``numel * itemsize``.
  - Dedupe rule for activations: two saved tensors are the same if they have
    the same view key ``(storage data_ptr, storage_offset, shape, stride,
    dtype)``.  ``saved_activation_bytes`` is the sum of ``numel * itemsize``
    over the unique view keys.  ``saved_breakdown`` groups those unique views
    by ``[shape, dtype, count, bytes]`` (sums to ``saved_activation_bytes``).
  - Different views of one buffer (e.g. ``x`` [2,16,64] and ``x.view(32,64)``,
    or q/k/v split out of gpt2's fused qkv) have different view keys and are
    both counted by the rule above.  ``saved_activation_bytes_memory`` is the
    memory actually referenced instead: per storage, the size of the union of
    the byte spans the saved views cover (a view's span is from its first to
    its last element).  ``saved_storage_bytes`` is the sum of ``nbytes`` of the
    distinct (non-parameter) storages, i.e. what autograd keeps alive.
  - Buffers (rotary ``inv_freq``) and the integer ``input_ids`` / labels are
    not parameters and are counted as activations (they show up in the
    breakdown with their dtype).
  - ``saved_by_node``: ``[autograd node, unique saved views, bytes]``, found by
    walking the graph from the loss and reading each node's ``_saved_*``
    attributes (the same view key rule, parameters excluded); a view saved by
    several nodes is attributed to the first one met in the walk.
  - ``autograd_nodes``: count of each autograd node type in the graph.
* ``attn_implementation``, ``torch_version``, ``transformers_version``,
  ``train_mode``, ``weights_check``, ``notes``.
"""

import json
import sys
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import export  # noqa: E402  (main() is guarded by __name__ == "__main__")
import transformers  # noqa: E402

MODELS = HERE / "models"
CAUSAL = ["llama", "gpt2", "qwen2"]
FAMILIES = CAUSAL + ["bert"]
VARIANTS = ["dynamo", "torchscript", "dynamo-opset20", "torchscript-opset14"]
STEPS = 5
BATCH = "inputs/input_ids.npy"
# Model inputs per family, in export.INPUT_NAMES order (inputs/<name>.npy).
INPUTS = {f: export.INPUT_NAMES[f] for f in FAMILIES}


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------

def manifest_attn(family):
    man = json.loads((MODELS / "manifest.json").read_text())
    attns = {e["attn_implementation"] for e in man["models"]
             if e["family"] == family}
    assert len(attns) == 1, (family, attns)
    return attns.pop()


def zero_dropout(wrapper):
    """Set every dropout probability of the HF model to 0 (no RNG effect)."""
    cfg = wrapper.model.config
    changed = []
    for k, v in list(vars(cfg).items()):
        if ("dropout" in k or "pdrop" in k) and isinstance(v, float):
            if v != 0.0:
                changed.append(f"config.{k}={v}")
            setattr(cfg, k, 0.0)
    for name, mod in wrapper.named_modules():
        if isinstance(mod, torch.nn.Dropout):
            if mod.p != 0.0:
                changed.append(f"{name}.p={mod.p}")
            mod.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            v = getattr(mod, attr, None)
            if isinstance(v, float):
                if v != 0.0:
                    changed.append(f"{name}.{attr}={v}")
                setattr(mod, attr, 0.0)
    return changed


def fresh(family, attn, mode="train"):
    wrapper = export.build(family, attn)  # same call as export.py
    changed = zero_dropout(wrapper)
    wrapper.train() if mode == "train" else wrapper.eval()
    return wrapper, changed


def hf_loss(wrapper, ids):
    return wrapper.model(input_ids=ids, labels=ids, use_cache=False).loss


def next_token_ce(logits, ids):
    """memc's ``--loss next-token-ce``: mean CE of logits[:, :-1] vs ids[:, 1:]."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def masked_labels(ids):
    """The labels of the masked-label trajectories (issue 23): the ids with the
    prompt-like first positions of each row (6 of row 0, 3 of row 1) and one
    later position (row 1, column 10) set to -100, transformers' ignore index."""
    labels = ids.clone()
    labels[0, :6] = -100
    labels[1, :3] = -100
    labels[1, 10] = -100
    return labels


def compute_loss(family, wrapper, batch, labels=None):
    """The training loss: HF's causal-LM loss, or the hand-written
    next-token CE for BERT (same formula; HF's BERT loss is masked-LM); with
    ``labels``, against those (-100 left out of the mean)."""
    if labels is not None:
        if family in CAUSAL:
            return wrapper.model(input_ids=batch["input_ids"], labels=labels,
                                 use_cache=False).loss
        logits = wrapper(**batch)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1), ignore_index=-100)
    if family in CAUSAL:
        return hf_loss(wrapper, batch["input_ids"])
    return next_token_ce(wrapper(**batch), batch["input_ids"])


# --------------------------------------------------------------------------
# Weights vs ONNX initializers
# --------------------------------------------------------------------------

def check_weights(family, wrapper):
    """Match every parameter against each exported ONNX file's initializers.

    By name first (ONNX names carry the wrapper's ``model.`` prefix; a tied
    parameter may appear under any of its names), else by exact value, as is
    or transposed (both exporters store Linear weights pre-transposed for
    MatMul under generated names such as ``val_152`` / ``onnx::MatMul_778``).
    """
    named = {}
    for n, p in wrapper.named_parameters(remove_duplicate=False):
        named.setdefault(id(p), (p, []))[1].append(n)
    emb = wrapper.model.get_input_embeddings().weight
    layer_w = {"llama": "model.model.layers.0.self_attn.q_proj.weight",
               "qwen2": "model.model.layers.0.self_attn.q_proj.weight",
               "gpt2": "model.transformer.h.0.attn.c_attn.weight",
               "bert": "model.bert.encoder.layer.0.attention.self.query.weight",
               }[family]
    layer_p = dict(wrapper.named_parameters())[layer_w]
    out = {}
    for v in VARIANTS:
        path = MODELS / f"{family}-{v}.onnx"
        if not path.exists():
            continue
        m = onnx.load(str(path))
        inits = OrderedDict((i.name, onnx.numpy_helper.to_array(i))
                            for i in m.graph.initializer)
        by_name = by_value = by_transpose = 0
        missing = []
        where = {}
        for p, names in named.values():
            a = p.detach().numpy()
            how = None
            for n in names:
                if n in inits and inits[n].shape == a.shape \
                        and np.array_equal(inits[n], a):
                    how, src = "name", n
                    break
            if how is None:
                for n, x in inits.items():
                    if x.dtype != a.dtype:
                        continue
                    if x.shape == a.shape and np.array_equal(x, a):
                        how, src = "value", n
                        break
                    if a.ndim == 2 and x.shape == a.T.shape \
                            and np.array_equal(x, a.T):
                        how, src = "transposed", n
                        break
            if how is None:
                missing.append(names[0])
                continue
            by_name += how == "name"
            by_value += how == "value"
            by_transpose += how == "transposed"
            where[id(p)] = f"{src} ({how})"
        assert id(emb) in where, (path.name, "embedding not found")
        assert id(layer_p) in where, (path.name, layer_w, "not found")
        out[f"{family}-{v}.onnx"] = {
            "params": len(named),
            "matched_by_name": by_name,
            "matched_by_value": by_value,
            "matched_transposed": by_transpose,
            "unmatched": missing,
            "embedding": where[id(emb)],
            layer_w: where[id(layer_p)],
        }
    return out


# --------------------------------------------------------------------------
# Trajectories
# --------------------------------------------------------------------------

def moc_mlp(mlp, k):
    """Make a Hugging Face SwiGLU MLP a Mixture-of-Channels block keeping the k
    largest gate channels per token (memc's ``moc_ffn``)."""
    def forward(x):
        g = mlp.gate_proj(x)
        u = mlp.up_proj(x)
        mask = torch.zeros_like(g).scatter(-1, torch.topk(g, k, dim=-1).indices, 1.0)
        return mlp.down_proj(mlp.act_fn(g) * mask * u)
    mlp.forward = forward


# The learning-rate schedules (issue 23): AdamW as ``adamw`` under transformers' schedulers,
# warmup 2 of the 5 steps, the scheduler stepped after each update as the Trainer does.
WARMUP = 2
SCHEDULED = {
    "adamw_linear_warmup": transformers.get_linear_schedule_with_warmup,
    "adamw_cosine_warmup": transformers.get_cosine_schedule_with_warmup,
}
# Masked labels (``masked_labels``) under the linear and the cosine schedule.
LABELED = ("adamw_labels_linear_warmup", "adamw_labels_cosine_warmup")
SCHEDULED[LABELED[0]] = transformers.get_linear_schedule_with_warmup
SCHEDULED[LABELED[1]] = transformers.get_cosine_schedule_with_warmup


def trajectory(family, attn, batch, kind):
    wrapper, _ = fresh(family, attn)
    if kind.startswith("adamw_moc_k"):
        k = int(kind[len("adamw_moc_k"):])
        for layer in wrapper.model.model.layers:
            moc_mlp(layer.mlp, k)
    params = list(wrapper.parameters())
    if kind == "sgd":
        opt = torch.optim.SGD(params, lr=0.1)
    elif kind == "sgd_momentum":
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = None
    if kind in SCHEDULED:
        sched = SCHEDULED[kind](opt, num_warmup_steps=WARMUP, num_training_steps=STEPS)
    labels = masked_labels(batch["input_ids"]) if kind in LABELED else None
    losses, norms = [], []
    for _ in range(STEPS):
        loss = compute_loss(family, wrapper, batch, labels)
        losses.append(loss.item())
        loss.backward()
        if kind == "adamw_clip":
            norms.append(torch.nn.utils.clip_grad_norm_(params, 1.0).item())
        if sched is not None:
            # The rate this update uses (what memc prints as each step's "lr").
            norms.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
    return losses, norms


# --------------------------------------------------------------------------
# Saved activations
# --------------------------------------------------------------------------

def view_key(t):
    return (t.untyped_storage().data_ptr(), t.storage_offset(),
            tuple(t.shape), tuple(t.stride()), str(t.dtype))


def nbytes(t):
    return t.numel() * t.element_size()


def span(t):
    """Byte interval [lo, hi) within its storage that a view touches."""
    es = t.element_size()
    if t.numel() == 0:
        return None
    last = t.storage_offset() + sum((s - 1) * st
                                    for s, st in zip(t.shape, t.stride()))
    return (t.storage_offset() * es, (last + 1) * es)


def union_len(ivs):
    total, cur = 0, None
    for lo, hi in sorted(ivs):
        if cur is None or lo > cur[1]:
            if cur:
                total += cur[1] - cur[0]
            cur = [lo, hi]
        else:
            cur[1] = max(cur[1], hi)
    if cur:
        total += cur[1] - cur[0]
    return total


def saved_activations(family, attn, batch):
    wrapper, _ = fresh(family, attn)
    param_ptrs = {p.untyped_storage().data_ptr() for p in wrapper.parameters()}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    def unpack(t):
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = compute_loss(family, wrapper, batch)

    act, par = OrderedDict(), OrderedDict()
    for t in saved:
        d = par if t.untyped_storage().data_ptr() in param_ptrs else act
        d.setdefault(view_key(t), t)
    by_shape = Counter()
    shape_bytes = Counter()
    for k, t in act.items():
        sk = (tuple(t.shape), str(t.dtype).replace("torch.", ""))
        by_shape[sk] += 1
        shape_bytes[sk] += nbytes(t)
    breakdown = [[list(s), dt, by_shape[(s, dt)], shape_bytes[(s, dt)]]
                 for (s, dt) in sorted(by_shape, key=lambda k: (
                     -shape_bytes[k], k[1], k[0]))]
    spans, storages = {}, {}
    for t in act.values():
        ptr = t.untyped_storage().data_ptr()
        storages[ptr] = t.untyped_storage().nbytes()
        s = span(t)
        if s:
            spans.setdefault(ptr, []).append(s)

    # Attribute saved views to autograd nodes.
    nodes, seen, stack = Counter(), set(), [loss.grad_fn]
    by_node, node_bytes, claimed = Counter(), Counter(), set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        name = type(fn).__name__
        nodes[name] += 1
        for attr in sorted(dir(fn)):
            if not attr.startswith("_saved_"):
                continue
            try:
                val = getattr(fn, attr)
            except Exception:  # noqa: BLE001
                continue
            vals = val if isinstance(val, (tuple, list)) else [val]
            for t in vals:
                if isinstance(t, torch.Tensor):
                    k = view_key(t)
                    if k in act and k not in claimed:
                        claimed.add(k)
                        by_node[name] += 1
                        node_bytes[name] += nbytes(t)
        stack.extend(nf for nf, _ in fn.next_functions)
    loss.backward()  # frees the graph; also proves it was a valid graph
    return {
        "saved_activation_bytes": sum(nbytes(t) for t in act.values()),
        "saved_param_bytes_excluded": sum(nbytes(t) for t in par.values()),
        "saved_tensors": len(saved),
        "saved_tensors_unique_activations": len(act),
        "saved_tensors_unique_params": len(par),
        "saved_breakdown": breakdown,
        "saved_activation_bytes_memory": sum(union_len(v)
                                             for v in spans.values()),
        "saved_storage_bytes": sum(storages.values()),
        "saved_by_node": [[n, by_node[n], node_bytes[n]] for n in sorted(
            by_node, key=lambda n: (-node_bytes[n], n))],
        "saved_by_node_unattributed": [
            len(act) - len(claimed),
            sum(nbytes(t) for k, t in act.items() if k not in claimed)],
        "autograd_nodes": dict(sorted(nodes.items())),
    }


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------

def load_batch(family):
    """{input name: int64 [2, 16] tensor}, the same in every variant folder."""
    batch = OrderedDict()
    for name in INPUTS[family]:
        rel = f"inputs/{name}.npy"
        a = np.load(MODELS / f"{family}-dynamo" / rel)
        assert a.dtype == np.int64 and a.shape == (2, 16), (name, a.shape)
        for v in VARIANTS[1:]:
            p = MODELS / f"{family}-{v}" / rel
            if p.exists():
                assert np.array_equal(np.load(p), a), p
        batch[name] = torch.from_numpy(a)
    return batch


def batch_key(family):
    names = INPUTS[family]
    if names == ["input_ids"]:
        return BATCH
    return "inputs/{" + ",".join(names) + "}.npy"


def run_family(family):
    attn = manifest_attn(family)
    batch = load_batch(family)
    ids = batch["input_ids"]
    wrapper, changed = fresh(family, attn)
    weights = check_weights(family, wrapper)

    # The loss is the shifted mean CE (HF's for the causal LMs, checked
    # against the formula; by hand for BERT); train == eval with dropout at 0.
    with torch.no_grad():
        l_train = compute_loss(family, wrapper, batch)
        logits = wrapper(**batch)
        assert logits.shape == (2, 16, 256), logits.shape
        manual = next_token_ce(logits, ids)
        wrapper.eval()
        l_eval = compute_loss(family, wrapper, batch)
        ref = np.load(MODELS / f"{family}-dynamo" / "torch_ref" / "logits.npy")
        logits_eval = wrapper(**batch).numpy()
    assert l_train.item() == l_eval.item(), (l_train.item(), l_eval.item())
    assert torch.allclose(l_train, manual, rtol=1e-6, atol=0), (l_train, manual)
    logits_match = bool(np.array_equal(logits_eval, ref))

    res = OrderedDict(batch=batch_key(family))
    for kind in ("sgd", "sgd_momentum", "adamw", "adamw_clip"):
        losses, norms = trajectory(family, attn, batch, kind)
        res[kind] = losses
        if norms:
            res["adamw_clip_grad_norms"] = norms
    for kind in SCHEDULED:
        losses, lrs = trajectory(family, attn, batch, kind)
        res[kind] = losses
        res[kind + "_lrs"] = lrs
    res["masked_labels"] = masked_labels(ids).tolist()
    if family in ("llama", "qwen2"):
        res["adamw_moc_k32"] = trajectory(family, attn, batch, "adamw_moc_k32")[0]
    # Determinism: the first trajectory once more.
    assert trajectory(family, attn, batch, "sgd")[0] == res["sgd"]
    sa = saved_activations(family, attn, batch)
    res.update(sa)
    res["attn_implementation"] = attn
    res["train_mode"] = "train"
    res["torch_version"] = torch.__version__
    res["transformers_version"] = transformers.__version__
    res["weights_check"] = weights
    sdpa_nodes = sorted(n for n in sa["autograd_nodes"]
                        if "Attention" in n or "Softmax" in n)
    if family in CAUSAL:
        loss_note = (
            "loss = model(input_ids=ids, labels=ids, use_cache=False).loss "
            "(HF ForCausalLMLoss: mean CE of logits[:, :-1] vs ids[:, 1:], "
            "30 tokens)")
    else:
        loss_note = (
            "loss = hand-written next-token CE (what memc's --loss "
            "next-token-ce computes), NOT HF's masked-LM loss: logits = "
            "model(input_ids, token_type_ids, attention_mask) [2, 16, 256]; "
            "torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), "
            "input_ids[:, 1:].reshape(-1)), mean over all 30 positions, no "
            "ignore index (attention_mask masks attention only, not the loss)")
    res["notes"] = [
        f"model: export.build({family!r}, {attn!r}) as in export.py "
        "(torch.manual_seed(0) init + perturb(seed 4321, std 0.02)); "
        "parameters bit-identical to the initializers of every exported "
        "ONNX file of the family (weights_check)",
        "dropout set to 0 after build: " + (", ".join(changed) or
                                            "all already 0")
        + "; model in train() mode; train-mode loss == eval-mode loss "
        "bit for bit",
        loss_note,
        f"eval-mode logits {'==' if logits_match else '!='} "
        f"{family}-dynamo/torch_ref/logits.npy (bitwise)",
        "fp32 CPU, torch.set_num_threads(1), "
        "torch.use_deterministic_algorithms(True); optimizers' default "
        "(for-loop, non-foreach on CPU) implementation; params = "
        "model.parameters() (tied weights once)",
        "losses[i] is computed before the i-th update; losses[0] is the "
        "initial loss",
        "saved_activation_bytes: unique (storage ptr, offset, shape, stride, "
        "dtype) views saved for backward, parameters (and views of them) "
        "excluded, numel*itemsize each; saved_activation_bytes_memory: union "
        "of byte spans per storage; saved_storage_bytes: whole storages",
        "sdpa-related autograd nodes: " + (", ".join(sdpa_nodes) or "none"),
    ]
    return res


def main():
    transformers.logging.set_verbosity_error()  # gpt2 bos/eos id warnings
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for family in FAMILIES:
        res = run_family(family)
        text = json.dumps(res, indent=1) + "\n"
        wrote = []
        for v in VARIANTS:
            d = MODELS / f"{family}-{v}"
            if d.is_dir():
                (d / "train_ref.json").write_text(text)
                wrote.append(d.name)
        print(f"=== {family} ({res['attn_implementation']}) -> "
              + ", ".join(wrote))
        for k in ("sgd", "sgd_momentum", "adamw", "adamw_clip",
                  "adamw_clip_grad_norms"):
            print(f"   {k:<22} {res[k][0]!r} .. {res[k][-1]!r}")
        print(f"   saved: {res['saved_tensors']} tensors, "
              f"{res['saved_tensors_unique_activations']} unique activations "
              f"= {res['saved_activation_bytes']} B "
              f"(memory {res['saved_activation_bytes_memory']} B, storages "
              f"{res['saved_storage_bytes']} B), params excluded "
              f"{res['saved_param_bytes_excluded']} B")
        for s, dt, c, b in res["saved_breakdown"]:
            print(f"      {str(s):<16} {dt:<8} x{c:<3} {b}")
        for n, c, b in res["saved_by_node"]:
            print(f"      {n:<50} x{c:<3} {b}")
        for name, w in res["weights_check"].items():
            print(f"   {name}: {w['matched_by_name']} by name, "
                  f"{w['matched_by_value']} by value, "
                  f"{w['matched_transposed']} transposed, "
                  f"unmatched {w['unmatched']}")


if __name__ == "__main__":
    main()
