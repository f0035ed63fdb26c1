"""`Scale`, a model-free stage for runtime tests: in memory (with `tensorline.engine.testing`) and
on Kafka, as kind "tensorline.stages.testing:Scale", with `scale_pipeline_body` for its pipeline
file."""

from __future__ import annotations

import time
from dataclasses import replace

from tensorline.config import ModelConfig, PipelineConfig, StageConfig
from tensorline.schemas import Record
from tensorline.stages.base import RecordStage, tensor


class Scale(RecordStage):
    """Multiplies tensor "x" by params.factor. A record with attribute "poison" makes the batch
    raise (as a model would on input it cannot take); params.sleep_s makes each batch slow."""

    def __init__(self, pipeline: PipelineConfig, stage: StageConfig, model: ModelConfig | None):
        super().__init__(pipeline, stage, model)
        self.factor = float(self.params.get("factor", 2.0))
        self.sleep_s = float(self.params.get("sleep_s", 0.0))
        self.batch_sizes: list[int] = []

    def check(self, item: Record) -> None:
        tensor(item, "x", (0, 1, 2, 3))

    def process(self, items: list[Record]) -> list[Record]:
        self.batch_sizes.append(len(items))
        time.sleep(self.sleep_s)
        if any("poison" in r.attributes for r in items):
            raise ValueError("poisoned record in batch")
        return [replace(r, tensors={"x": r.tensors["x"] * self.factor}, stage=self.name) for r in items]


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
