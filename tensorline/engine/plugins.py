"""Stage plugins as the engine finds them: by kind (a builtin name or 'package.module:Factory'),
imported by name so the engine imports no plugin; and the device a worker process is pinned to."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from tensorline.config import PipelineConfig

BUILTIN = {
    "preprocess": "tensorline.stages.preprocess:Preprocess",
    "features": "tensorline.stages.features:Features",
    "detection": "tensorline.stages.detection:Detection",
    "fusion": "tensorline.fusion.stage:Fusion",
}
# Stages of these kinds run one consumer group per model, so each model reads every record.
PER_MODEL_KINDS = frozenset({"detection"})


def has_gpu() -> bool:
    """Whether this host shows TensorFlow an NVIDIA device (a device node, not hidden by
    CUDA_VISIBLE_DEVICES), without importing TensorFlow."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def quiet_tensorflow(device: str | None = None) -> None:
    """Set TensorFlow's C++ log level before its import, unless the user set TF_CPP_MIN_LOG_LEVEL.

    On a CPU device or a host without a GPU, errors are hidden too ("3"): there the only one
    TensorFlow logs is `failed call to cuInit`, its probe for a GPU it will not use (real failures
    still raise Python exceptions). On a GPU device, warnings and errors stay ("2"); with no device
    given on a GPU host, TensorFlow's default.
    """
    if device == "cpu" or (device is None and not has_gpu()):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    elif device is not None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pin_device(device: str) -> bool:
    """Make only `device` ("cpu" or "gpu:N") visible to TensorFlow, GPU memory growing on demand,
    its log quiet (see `quiet_tensorflow`).

    TensorFlow reads these variables once, at import: returns False (nothing pinned) when it is
    already imported in this process.
    """
    if "tensorflow" in sys.modules:
        return False
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1" if device == "cpu" else device.split(":", 1)[1]
    os.environ["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    quiet_tensorflow(device)
    return True


def load_stage(pipeline: PipelineConfig, stage: str, model: str | None = None):
    """The stage object for `stage` (and its model `model`), from its kind in the pipeline file."""
    cfg = pipeline.stages[stage]
    target = BUILTIN.get(cfg.kind, cfg.kind)
    if ":" not in target:
        raise ValueError(f"{pipeline.path}: stages.{stage}.kind: unknown stage kind {cfg.kind!r} "
                         f"(builtin: {', '.join(BUILTIN)}, or 'package.module:Factory')")
    module, attr = target.split(":", 1)
    factory = getattr(importlib.import_module(module), attr)
    return factory(pipeline, cfg, pipeline.model(stage, model))
