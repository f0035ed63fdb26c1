"""features: a Keras CNN backbone turns each preprocessed image into an embedding.

The record gains "embedding" and keeps its input tensors (an image-based detection model reads
them), unless `params.keep` names the ones to forward: `keep = []` when every detection model
reads the embedding only, so the image is not shipped through Kafka a second time.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tensorline.config import ModelConfig, PipelineConfig, StageConfig
from tensorline.schemas import Record
from tensorline.stages.base import ModelStage


class Features(ModelStage):
    def __init__(self, pipeline: PipelineConfig, stage: StageConfig, model: ModelConfig | None):
        super().__init__(pipeline, stage, model)
        keep = self.params.get("keep")
        if keep is not None and not (isinstance(keep, list) and all(isinstance(k, str) for k in keep)):
            raise ValueError(f"{pipeline.path}: stages.{stage.name}.params.keep: expected a list of tensor "
                             f"names, got {keep!r}")
        self.keep = None if keep is None else frozenset(keep)

    def process(self, items: list[Record]) -> list[Record]:
        embeddings = self.model(self.batch(items)).astype(np.float32, copy=False)
        return [r.passed_on({**self._kept(r), "embedding": e}, self.name, self.model_ref)
                for r, e in zip(items, embeddings)]

    def _kept(self, record: Record) -> Mapping[str, np.ndarray]:
        if self.keep is None:
            return record.tensors
        return {k: v for k, v in record.tensors.items() if k in self.keep}
