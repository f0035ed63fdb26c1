"""detection: one detection model, its own consumer group, scoring every record of the features topic.

Outputs are keyed by record id, so every model's output for one record lands in one partition
of the detections topic, ready for fusion. The class names come from pipeline.classes. Scores
that are not a probability vector over them (the wrong count, outside [0, 1], or a softmax row
not summing to 1) are dead letters `not_probabilities`, never sent on to be fused.
"""

from __future__ import annotations

from tensorline.config import SCORE_KINDS, ModelConfig, PipelineConfig, StageConfig
from tensorline.schemas import Detection as DetectionMessage
from tensorline.schemas import Record
from tensorline.stages.base import ModelStage, check_probabilities
from tensorline.engine.runtime import DeadLetter, Message


class Detection(ModelStage):
    def __init__(self, pipeline: PipelineConfig, stage: StageConfig, model: ModelConfig | None):
        super().__init__(pipeline, stage, model)
        self.classes = pipeline.classes
        out = self.model.output_shape
        if out is not None and out[-1] != len(self.classes):
            raise ValueError(f"{pipeline.path}: model {model.name} ({model.path}) gives {out[-1]} scores, "
                             f"pipeline.classes names {len(self.classes)}")
        # The sum is checked only where the model declares softmax; unknown: range and count only.
        self.kind = self.model.activation if self.model.activation in SCORE_KINDS else None
        fusion = pipeline.fusion
        if (self.kind == "sigmoid" and fusion is not None and fusion.scores == "softmax"
                and model.name in fusion.expected_models):
            raise ValueError(f"{pipeline.path}: model {model.name} ({model.path}) ends in a sigmoid, "
                             f"fusion.scores is softmax: fusion would refuse every output (set fusion.scores)")

    def process(self, items: list[Record]) -> list[DetectionMessage]:
        scores = self.model(self.batch(items)).reshape(len(items), -1)
        if scores.shape[1] != len(self.classes):
            raise DeadLetter(f"model {self.model.config.name} gives {scores.shape[1]} scores, "
                             f"pipeline.classes names {len(self.classes)}", reason="not_probabilities")
        return [DetectionMessage(record_id=r.record_id, source=r.source, ingest_ts_ms=r.ingest_ts_ms,
                                 model=self.model_ref, classes=self.classes, scores=tuple(map(float, s)),
                                 attributes=r.attributes, label=r.label)
                for r, s in zip(items, scores)]

    def encode(self, output: DetectionMessage) -> bytes:
        check_probabilities(output.record_id, self.model.config.name, output.scores, len(self.classes), self.kind)
        return super().encode(output)

    def key(self, output: DetectionMessage, message: Message) -> bytes:
        return output.record_id.encode()
