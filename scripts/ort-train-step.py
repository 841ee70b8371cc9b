#!/usr/bin/env python3
"""ONNX Runtime Training's AdamW step on the same ONNX file memc compiles (the peer baseline of
`scripts/bench-cpu-real.py`). Needs onnxruntime-training, which cannot share an environment
with onnxruntime: `scripts/bench-cpu-real.py --ort` makes the virtual environment
scratch/ort-venv for it (`python3 -m venv --system-site-packages`, so PyTorch comes from the
system; onnxruntime-training 1.19.2, onnx 1.16.2, numpy < 2) and runs this script there.

    ort-train-step.py prepare MODEL.onnx DIR
        Appends the next-token loss's shift to the model (logits[:, :-1] flattened to
        [B*(S-1), vocab]), and writes ONNX Runtime's training artifacts to DIR: the training,
        eval and optimizer models and the checkpoint, with every float initializer trained
        (the TorchScript exports hold only parameters as initializers), onnxblock's
        CrossEntropyLoss (mean) against the labels ids[:, 1:] and AdamW (betas 0.9/0.999,
        eps 1e-8, weight decay 0.01, as memc's and PyTorch's defaults).

    ort-train-step.py run DIR IDS.npy STEPS THREADS
        Trains STEPS steps at learning rate 1e-3 on one batch with THREADS intra-op threads and
        prints one JSON line: the median step time after the first (ms), the losses and the
        process's peak RSS (bytes). Preparation runs in its own process, so its memory is not
        counted.
"""
import json
import os
import resource
import statistics
import sys
import time

import numpy as np


def prepare(model_path, out_dir):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from onnxruntime.training import artifacts

    ort.set_default_logger_severity(3)

    m = onnx.load(model_path)
    g = m.graph
    logits = g.output[0]
    vocab = logits.type.tensor_type.shape.dim[-1].dim_value
    if vocab <= 0:
        sys.exit(f"{model_path}: the logits' last dimension (the vocabulary) must be static")
    consts = {
        "memc_shift_starts": [0],
        "memc_shift_ends": [-1],
        "memc_shift_axes": [1],
        "memc_shift_shape": [-1, vocab],
    }
    for name, values in consts.items():
        g.initializer.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
    g.node.extend([
        helper.make_node("Slice", [logits.name, "memc_shift_starts", "memc_shift_ends", "memc_shift_axes"],
                         ["memc_shifted_3d"]),
        helper.make_node("Reshape", ["memc_shifted_3d", "memc_shift_shape"], ["memc_shifted_logits"]),
    ])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("memc_shifted_logits", TensorProto.FLOAT, ["tokens", vocab]))
    trained = [i.name for i in g.initializer if i.data_type == TensorProto.FLOAT]
    frozen = [i.name for i in g.initializer if i.data_type != TensorProto.FLOAT]
    os.makedirs(out_dir, exist_ok=True)
    artifacts.generate_artifacts(
        m,
        requires_grad=trained,
        frozen_params=frozen,
        loss=artifacts.LossType.CrossEntropyLoss,
        optimizer=artifacts.OptimType.AdamW,
        artifact_directory=out_dir,
    )
    print(json.dumps({"trained": len(trained), "frozen": len(frozen)}))


def run(art_dir, ids_path, steps, threads):
    # ONNX Runtime's training bindings, called as onnxruntime.training.api calls them: the
    # training build's Python package imports PyTorch (for ORTModule and a CUDA version check),
    # whose libraries would count in the peak RSS of a run that never uses them; it is kept
    # out (the import fails, which the package tolerates).
    sys.modules["torch"] = None
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state as C
    from onnxruntime.capi.onnxruntime_pybind11_state import OrtValueVector

    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
    state = C.load_checkpoint(os.path.join(art_dir, "checkpoint"))
    module = C.Module(os.path.join(art_dir, "training_model.onnx"), state,
                      os.path.join(art_dir, "eval_model.onnx"), device, so)
    opt = C.Optimizer(os.path.join(art_dir, "optimizer_model.onnx"), state, device, so)
    opt.set_learning_rate(1e-3)

    def train_step(*inputs):
        fetches = OrtValueVector()
        module.train_step(list(inputs), fetches)
        return fetches[0].numpy()

    ids = np.load(ids_path).astype(np.int64)
    labels = np.ascontiguousarray(ids[:, 1:].reshape(-1))
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        loss = train_step(ids, labels)
        opt.optimizer_step()
        module.lazy_reset_grad()
        times.append((time.perf_counter() - t) * 1e3)
        losses.append(float(loss))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"ms": statistics.median(times[1:]) if len(times) > 1 else times[0],
                      "losses": losses, "rss": rss}))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "prepare":
        prepare(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 6 and sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(__doc__)
