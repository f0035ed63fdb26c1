"""detection: one detection model, its own consumer group, scoring every record of the features topic.

Outputs are keyed by record id, so every model's output for one record lands in one partition
of the detections topic, ready for fusion. The class names come from pipeline.classes.
"""

from __future__ import annotations


from tensorline.config import ModelConfig, PipelineConfig, StageConfig
from tensorline.schemas import Detection as DetectionMessage
from tensorline.schemas import Record
from tensorline.stages.base import ModelStage
from tensorline.engine.runtime import Message


class Detection(ModelStage):
    def __init__(self, pipeline: PipelineConfig, stage: StageConfig, model: ModelConfig | None):
        super().__init__(pipeline, stage, model)
        self.classes = pipeline.classes
        out = self.model.output_shape
        if out is not None and out[-1] != len(self.classes):
            raise ValueError(f"{pipeline.path}: model {model.name} ({model.path}) gives {out[-1]} scores, "
                             f"pipeline.classes names {len(self.classes)}")

    def process(self, items: list[Record]) -> list[DetectionMessage]:
        scores = self.model(self.batch(items)).reshape(len(items), -1)
        if scores.shape[1] != len(self.classes):
            raise ValueError(f"model {self.model.config.name} gives {scores.shape[1]} scores, "
                             f"pipeline.classes names {len(self.classes)}")
        return [DetectionMessage(record_id=r.record_id, source=r.source, ingest_ts_ms=r.ingest_ts_ms,
                                 model=self.model_ref, classes=self.classes, scores=tuple(map(float, s)),
                                 attributes=r.attributes, label=r.label)
                for r, s in zip(items, scores)]

    def key(self, output: DetectionMessage, message: Message) -> bytes:
        return output.record_id.encode()
