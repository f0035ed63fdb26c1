"""preprocess: medical-image preprocessing as TensorFlow ops on a batch.

Per record, from its attributes (DICOM tags the producer copied): rescale slope/intercept to
modality units, windowing (center/width; the pipeline's params may fix them), MONOCHROME1
inversion; then resize to the model's input size and normalise. Records of one shape are
stacked and transformed as one batch.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import numpy as np

from tensorline.config import ModelConfig, PipelineConfig, StageConfig
from tensorline.schemas import Record
from tensorline.stages.base import RecordStage, tensor
from tensorline.stages.runtime import DeadLetter

NORMALIZE = ("zscore", "minmax", "none")


def _float_attr(record: Record, name: str, default: float | None) -> float | None:
    raw = record.attributes.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise DeadLetter(f"record {record.record_id}: attribute {name}={raw!r} is not a number") from None
    if not np.isfinite(value):
        raise DeadLetter(f"record {record.record_id}: attribute {name}={raw!r} is not finite")
    return value


class Preprocess(RecordStage):
    """Raw stored pixel values in, (size, size, 1) float32 images out."""

    def __init__(self, pipeline: PipelineConfig, stage: StageConfig, model: ModelConfig | None):
        super().__init__(pipeline, stage, model)
        self.size = int(self.params.get("size", 64))
        self.normalize = str(self.params.get("normalize", "zscore"))
        if self.normalize not in NORMALIZE:
            raise ValueError(f"{pipeline.path}: stages.{stage.name}.params.normalize: expected one of "
                             f"{', '.join(NORMALIZE)}, got {self.normalize!r}")
        self.window = (self.params.get("window_center"), self.params.get("window_width"))

    def _window(self, record: Record, image: np.ndarray, slope: float, intercept: float) -> tuple[float, float]:
        center = self.window[0] if self.window[0] is not None else _float_attr(record, "window_center", None)
        width = self.window[1] if self.window[1] is not None else _float_attr(record, "window_width", None)
        if center is None or width is None:  # no window: the image's own range
            lo, hi = float(image.min()) * slope + intercept, float(image.max()) * slope + intercept
            return (lo + hi) / 2, max(hi - lo, 1e-6)
        if width <= 0:
            raise DeadLetter(f"record {record.record_id}: window width {width} is not positive")
        return float(center), float(width)

    def check(self, item: Record) -> None:
        image = tensor(item, "image", (2, 3))
        if image.ndim == 3 and image.shape[-1] != 1:
            raise DeadLetter(f"record {item.record_id}: image has {image.shape[-1]} channels, expected 1")
        if image.size == 0:
            raise DeadLetter(f"record {item.record_id}: image is empty {list(image.shape)}")
        if image.dtype.kind == "f" and not np.isfinite(image).all():
            raise DeadLetter(f"record {item.record_id}: image has NaN or Inf values")
        slope = _float_attr(item, "rescale_slope", 1.0)
        self._window(item, image, slope, _float_attr(item, "rescale_intercept", 0.0))

    def process(self, items: list[Record]) -> list[Record]:
        import tensorflow as tf

        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, r in enumerate(items):
            groups[r.tensors["image"].shape[:2]].append(i)
        out: list[np.ndarray | None] = [None] * len(items)
        for indices in groups.values():
            records = [items[i] for i in indices]
            params = np.array([self._params(r) for r in records], np.float32)  # (n, 5)
            col = lambda j: tf.reshape(params[:, j], (-1, 1, 1, 1))  # noqa: E731
            x = tf.convert_to_tensor(np.stack([r.tensors["image"].reshape(r.tensors["image"].shape[:2])
                                               for r in records]).astype(np.float32))[..., None]
            x = x * col(0) + col(1)                                   # stored values -> modality units
            lo = col(2) - col(3) / 2
            x = tf.clip_by_value((x - lo) / col(3), 0.0, 1.0)         # windowing
            x = tf.where(col(4) > 0, 1.0 - x, x)                       # MONOCHROME1: bright is low
            x = tf.image.resize(x, (self.size, self.size), antialias=True)
            if self.normalize == "zscore":
                x = tf.image.per_image_standardization(x)
            elif self.normalize == "minmax":
                lo_, hi_ = tf.reduce_min(x, (1, 2, 3), keepdims=True), tf.reduce_max(x, (1, 2, 3), keepdims=True)
                x = (x - lo_) / tf.maximum(hi_ - lo_, 1e-6)
            for i, arr in zip(indices, x.numpy()):
                out[i] = arr
        return [replace(r, tensors={"image": img}, stage=self.name, model=None) for r, img in zip(items, out)]

    def _params(self, record: Record) -> tuple[float, float, float, float, float]:
        slope = _float_attr(record, "rescale_slope", 1.0)
        intercept = _float_attr(record, "rescale_intercept", 0.0)
        center, width = self._window(record, record.tensors["image"], slope, intercept)
        inverted = 1.0 if record.attributes.get("photometric", "").upper() == "MONOCHROME1" else 0.0
        return slope, intercept, center, width, inverted
