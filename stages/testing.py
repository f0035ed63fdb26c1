"""`Scale`, a model-free stage for runtime tests: in memory (with `tensorline.engine.testing`) and
on Kafka, as kind "tensorline.stages.testing:Scale", with `scale_pipeline_body` for its pipeline
file."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import numpy as np

from tensorline.config import ModelConfig, PipelineConfig, StageConfig
from tensorline.schemas import Record
from tensorline.stages.base import RecordStage, tensor


# The unit of params.work: one product of two 128x128 float64 matrices, ~0.12 ms of one core.
WORK_SIDE = 128


def pinned_device() -> str:
    """The device `plugins.pin_device` made visible to this process ("cpu" when none was)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "-1")
    return "cpu" if visible in ("", "-1") else f"gpu:{visible}"


class Scale(RecordStage):
    """Multiplies tensor "x" by params.factor. A record with attribute "poison" makes the batch
    raise (as a model would on input it cannot take); params.sleep_s makes each batch slow.

    params.work costs CPU like a model: that many 128x128 matrix products per record (numpy
    releases the GIL for them, as a model's kernels do). A table by device (`{ cpu = 8, "gpu:0" =
    24 }`) gives the workers of one stage different speeds, each by the device it is pinned to.
    """

    def __init__(self, pipeline: PipelineConfig, stage: StageConfig, model: ModelConfig | None):
        super().__init__(pipeline, stage, model)
        self.factor = float(self.params.get("factor", 2.0))
        self.sleep_s = float(self.params.get("sleep_s", 0.0))
        work = self.params.get("work", 0)
        self.work = int(work.get(pinned_device(), 0) if isinstance(work, Mapping) else work)
        self._matrix = np.random.default_rng(0).standard_normal((WORK_SIDE, WORK_SIDE)) / WORK_SIDE
        self.batch_sizes: list[int] = []

    def check(self, item: Record) -> None:
        tensor(item, "x", (0, 1, 2, 3))

    def process(self, items: list[Record]) -> list[Record]:
        self.batch_sizes.append(len(items))
        time.sleep(self.sleep_s)
        for _ in range(self.work * len(items)):
            self._matrix @ self._matrix  # the same product every time: a constant cost
        if any("poison" in r.attributes for r in items):
            raise ValueError("poisoned record in batch")
        return [r.passed_on({"x": r.tensors["x"] * self.factor}, self.name, r.model) for r in items]


def scale_pipeline_body(*, partitions: int = 3, **params: float) -> str:
    """The topics and stage tables (no [pipeline] header) of one Scale stage from `in` to `out`,
    with its params: for tests that run it on a real broker."""
    extra = "".join(f"{k} = {v}\n" for k, v in params.items())
    return f"""
[topics]
in = {{ partitions = {partitions} }}
out = {{ partitions = {partitions} }}
dlq = {{ partitions = 1 }}
[stages.scale]
kind = "tensorline.stages.testing:Scale"
input = "in"
output = "out"
max_batch = 8
max_delay_ms = 20
[stages.scale.params]
{extra}"""
