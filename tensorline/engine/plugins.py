"""Stage plugins as the engine finds them: by kind (a builtin name or 'package.module:Factory'),
imported by name so the engine imports no plugin; and the device a worker process is pinned to."""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator
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
        if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _QuietImport())
    elif device is not None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# What TensorFlow's import writes to stderr on a host without CUDA drivers whatever its log level:
# absl's note that logging is not initialised yet, then `cudart_stub.cc] Could not find cuda
# drivers on your machine, GPU will not be used` (once per stub library) — an INFO line logged
# before TF_CPP_MIN_LOG_LEVEL is read (tensorflow/tensorflow#62075) — and, on a CPU with the
# features for which TensorFlow turns oneDNN on by default (AVX-512 VNNI/BF16, AMX), `port.cc]
# oneDNN custom operations are on. You may see slightly different numerical results ...`, INFO too.
TF_IMPORT_NOISE = (b"All log messages before absl::InitializeLog() is called", b"Could not find cuda drivers",
                   b"oneDNN custom operations are on")


@contextlib.contextmanager
def stderr_without(noise: tuple[bytes, ...]) -> Iterator[None]:
    """Capture file descriptor 2 (C++ libraries write there directly) and, at the end, write back
    every line that contains none of `noise`, in order."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured:
                if not any(n in line for n in noise):
                    os.write(2, line)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Runs the first `import tensorflow` (also through keras) with `TF_IMPORT_NOISE` kept off
    stderr; removes itself once used."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec_module(module) -> None:
            with stderr_without(TF_IMPORT_NOISE):
                exec_module(module)

        spec.loader.exec_module = quiet_exec_module
        return spec


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
