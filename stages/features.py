"""features: a Keras CNN backbone turns each preprocessed image into an embedding.

The record keeps its image (the image-based detection model reads it) and gains "embedding".
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tensorline.config import ModelConfig, PipelineConfig, StageConfig
from tensorline.schemas import Record
from tensorline.stages.base import Model, RecordStage, tensor


class Features(RecordStage):
    def __init__(self, pipeline: PipelineConfig, stage: StageConfig, model: ModelConfig | None):
        super().__init__(pipeline, stage, model)
        if model is None:
            raise ValueError(f"{pipeline.path}: stages.{stage.name}.models: the features stage needs a backbone model")
        self.model = Model(model)

    def check(self, item: Record) -> None:
        self.model.check(item.record_id, tensor(item, self.model.config.input, (1, 2, 3, 4)))

    def process(self, items: list[Record]) -> list[Record]:
        batch = np.stack([r.tensors[self.model.config.input] for r in items]).astype(np.float32, copy=False)
        embeddings = self.model(batch).astype(np.float32, copy=False)
        return [replace(r, tensors={**r.tensors, "embedding": e}, stage=self.name, model=self.model_ref)
                for r, e in zip(items, embeddings)]
