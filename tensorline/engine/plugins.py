"""Stage plugins as the engine finds them: by kind (a builtin name or 'package.module:Factory'),
imported by name so the engine imports no plugin; and the device a worker process is pinned to."""

from __future__ import annotations

import importlib
import os
import sys

from tensorline.config import PipelineConfig

BUILTIN = {
    "preprocess": "tensorline.stages.preprocess:Preprocess",
    "features": "tensorline.stages.features:Features",
    "detection": "tensorline.stages.detection:Detection",
    "fusion": "tensorline.fusion.stage:Fusion",
}
# Stages of these kinds run one consumer group per model, so each model reads every record.
PER_MODEL_KINDS = frozenset({"detection"})


def pin_device(device: str) -> bool:
    """Make only `device` ("cpu" or "gpu:N") visible to TensorFlow, GPU memory growing on demand.

    TensorFlow reads these variables once, at import: returns False (nothing pinned) when it is
    already imported in this process.
    """
    if "tensorflow" in sys.modules:
        return False
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1" if device == "cpu" else device.split(":", 1)[1]
    os.environ["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
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
