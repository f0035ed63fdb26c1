"""features: a Keras CNN backbone turns each preprocessed image into an embedding.

The record keeps its image (the image-based detection model reads it) and gains "embedding".
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tensorline.schemas import Record
from tensorline.stages.base import ModelStage


class Features(ModelStage):
    def process(self, items: list[Record]) -> list[Record]:
        embeddings = self.model(self.batch(items)).astype(np.float32, copy=False)
        return [replace(r, tensors={**r.tensors, "embedding": e}, stage=self.name, model=self.model_ref)
                for r, e in zip(items, embeddings)]
