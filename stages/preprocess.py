"""preprocess: medical-image preprocessing as TensorFlow ops on a batch.

Per record, from its attributes (DICOM tags the producer copied): rescale slope/intercept to
modality units, then one tensor per configured view (params.views, default ["window"]):

- "window" -> tensor "image": the DICOM window (center/width; the params may fix them), values
  outside it clipped, as a radiologist's display shows the image;
- "full" -> "image_full": the image's whole range mapped to [0, 1], nothing clipped (a narrow
  window can clip a lesion away; this view keeps it);
- "equalized" -> "image_equalized": histogram equalisation, each pixel the fraction of its
  image's pixels at or below it; unchanged by any window or monotonic rescale, and a faint
  lesion next to bone or air keeps its contrast;
- "local" -> "image_local": local contrast, the full view resized, then each pixel's difference
  from its neighbourhood's mean in units of the neighbourhood's standard deviation (a Gaussian
  neighbourhood of params.local_sigma pixels of the output, default 4): a lesion stands out by
  its contrast to what surrounds it, whatever the image's overall range and texture.

Each view is MONOCHROME1-inverted (bright is high), resized to the model's input size and
normalised. Different detection models can read different views, so their errors differ.
Records of one shape are stacked and transformed as one batch. A record whose attributes make
a view non-finite (a rescale slope of 1e38 overflows float32) is a dead letter `non_finite`,
from the output check every record stage shares (stages.base).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from tensorline.config import ModelConfig, PipelineConfig, StageConfig
from tensorline.schemas import Record
from tensorline.stages.base import RecordStage, check_finite, tensor
from tensorline.engine.runtime import DeadLetter

NORMALIZE = ("zscore", "minmax", "none")
# Each view's tensor name; "window" keeps the name every model reads by default.
VIEWS = {"window": "image", "full": "image_full", "equalized": "image_equalized", "local": "image_local"}
# The local view's neighbourhood (Gaussian sigma, pixels of the output): about a lesion's size
# (the demo's blobs have sigma 2-6 px on 64-px patches), so a blob is measured against the
# anatomy right around it, not the whole patch.
LOCAL_SIGMA = 4.0
# The local variance's floor, a fraction of the image's own variance: a flat neighbourhood
# (air, padding) is not blown up into noise.
LOCAL_FLOOR = 1e-2


def _float_attr(record: Record, name: str, default: float | None) -> float | None:
    raw = record.attributes.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise DeadLetter(f"record {record.record_id}: attribute {name}={raw!r} is not a number",
                         reason="bad_attribute") from None
    if not np.isfinite(value):
        raise DeadLetter(f"record {record.record_id}: attribute {name}={raw!r} is not finite", reason="bad_attribute")
    return value


class Preprocess(RecordStage):
    """Raw stored pixel values in; out, one (size, size, 1) float32 tensor per configured view."""

    def __init__(self, pipeline: PipelineConfig, stage: StageConfig, model: ModelConfig | None):
        super().__init__(pipeline, stage, model)
        self.size = int(self.params.get("size", 64))
        self.normalize = str(self.params.get("normalize", "zscore"))
        if self.normalize not in NORMALIZE:
            raise ValueError(f"{pipeline.path}: stages.{stage.name}.params.normalize: expected one of "
                             f"{', '.join(NORMALIZE)}, got {self.normalize!r}")
        self.window = (self.params.get("window_center"), self.params.get("window_width"))
        views = self.params.get("views", ["window"])
        if (isinstance(views, str) or not views or len(set(views)) != len(views)
                or any(v not in VIEWS for v in views)):
            raise ValueError(f"{pipeline.path}: stages.{stage.name}.params.views: expected a list of distinct "
                             f"views among {', '.join(VIEWS)}, got {views!r}")
        self.views = tuple(views)
        sigma = self.params.get("local_sigma", LOCAL_SIGMA)
        valid = isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and 0.5 <= sigma <= self.size / 2
        if "local" in self.views and not valid:
            raise ValueError(f"{pipeline.path}: stages.{stage.name}.params.local_sigma: expected 0.5 to half the "
                             f"size ({self.size / 2:g}) pixels, got {sigma!r}")
        self.local_sigma = float(sigma) if valid else LOCAL_SIGMA

    def _window(self, record: Record, image: np.ndarray, slope: float, intercept: float) -> tuple[float, float]:
        center = self.window[0] if self.window[0] is not None else _float_attr(record, "window_center", None)
        width = self.window[1] if self.window[1] is not None else _float_attr(record, "window_width", None)
        if center is None or width is None:  # no window: the image's own range
            lo, hi = float(image.min()) * slope + intercept, float(image.max()) * slope + intercept
            return (lo + hi) / 2, max(hi - lo, 1e-6)
        if width <= 0:
            raise DeadLetter(f"record {record.record_id}: window width {width} is not positive", reason="bad_attribute")
        return float(center), float(width)

    def check(self, item: Record) -> None:
        image = tensor(item, "image", (2, 3))
        if image.ndim == 3 and image.shape[-1] != 1:
            raise DeadLetter(f"record {item.record_id}: image has {image.shape[-1]} channels, expected 1",
                             reason="bad_shape")
        if image.size == 0:
            raise DeadLetter(f"record {item.record_id}: image is empty {list(image.shape)}", reason="bad_shape")
        check_finite(item.record_id, "tensor 'image'", image)
        slope = _float_attr(item, "rescale_slope", 1.0)
        intercept = _float_attr(item, "rescale_intercept", 0.0)
        if "window" in self.views:
            self._window(item, image, slope, intercept)

    def process(self, items: list[Record]) -> list[Record]:
        import tensorflow as tf

        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, r in enumerate(items):
            groups[r.tensors["image"].shape[:2]].append(i)
        out: list[dict[str, np.ndarray]] = [{} for _ in items]
        for indices in groups.values():
            records = [items[i] for i in indices]
            params = np.array([self._params(r) for r in records], np.float32)  # (n, 5)
            col = lambda j: tf.reshape(params[:, j], (-1, 1, 1, 1))  # noqa: E731
            x = tf.convert_to_tensor(np.stack([r.tensors["image"].reshape(r.tensors["image"].shape[:2])
                                               for r in records]).astype(np.float32))[..., None]
            x = x * col(0) + col(1)                                   # stored values -> modality units
            inverted = col(4) > 0                                      # MONOCHROME1: bright is low
            full = None  # the whole range, resized: the "full" view, and the "local" view's input
            if {"full", "local"} & set(self.views):
                lo, hi = tf.reduce_min(x, (1, 2, 3), keepdims=True), tf.reduce_max(x, (1, 2, 3), keepdims=True)
                v = (x - lo) / tf.maximum(hi - lo, 1e-6)
                full = self._resize(tf.where(inverted, 1.0 - v, v))
            for view in self.views:
                if view == "window":
                    lo = col(2) - col(3) / 2
                    v = tf.clip_by_value((x - lo) / col(3), 0.0, 1.0)
                    v = self._resize(tf.where(inverted, 1.0 - v, v))
                elif view == "full":
                    v = full
                elif view == "local":
                    v = _local_contrast(full, self.local_sigma)
                else:
                    v = self._resize(_equalize(tf.where(inverted, -x, x)))
                for i, arr in zip(indices, self._normalize(v).numpy()):
                    out[i][VIEWS[view]] = arr
        return [r.passed_on(t, self.name, None) for r, t in zip(items, out)]

    def _resize(self, x):
        """To the model's input size (params.size), antialiased."""
        import tensorflow as tf

        return tf.image.resize(x, (self.size, self.size), antialias=True)

    def _normalize(self, x):
        """Normalise each image as params.normalize says."""
        import tensorflow as tf

        if self.normalize == "zscore":
            x = tf.image.per_image_standardization(x)
        elif self.normalize == "minmax":
            lo_, hi_ = tf.reduce_min(x, (1, 2, 3), keepdims=True), tf.reduce_max(x, (1, 2, 3), keepdims=True)
            x = (x - lo_) / tf.maximum(hi_ - lo_, 1e-6)
        return x

    def _params(self, record: Record) -> tuple[float, float, float, float, float]:
        slope = _float_attr(record, "rescale_slope", 1.0)
        intercept = _float_attr(record, "rescale_intercept", 0.0)
        center, width = (self._window(record, record.tensors["image"], slope, intercept)
                         if "window" in self.views else (0.0, 1.0))
        inverted = 1.0 if record.attributes.get("photometric", "").upper() == "MONOCHROME1" else 0.0
        return slope, intercept, center, width, inverted


def _equalize(x):
    """Histogram equalisation of a batch (n, h, w, 1): each value -> the fraction of its image's
    values at or below it, in (0, 1]; equal values map to equal outputs."""
    import tensorflow as tf

    flat = tf.reshape(x, (tf.shape(x)[0], -1))
    below = tf.searchsorted(tf.sort(flat, axis=1), flat, side="right")
    return tf.reshape(tf.cast(below, tf.float32) / tf.cast(tf.shape(flat)[1], tf.float32), tf.shape(x))


def _local_contrast(x, sigma: float):
    """Each pixel of a batch (n, h, w, 1) minus its Gaussian neighbourhood's mean (sigma pixels,
    reflected at the border), over the neighbourhood's standard deviation; the variance is floored
    at LOCAL_FLOOR of the image's own, and the image standardised first, so the result does not
    depend on the image's scale."""
    import tensorflow as tf

    radius = min(int(3 * sigma), int(x.shape[1]) - 1, int(x.shape[2]) - 1)
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    taps = tf.constant(taps / taps.sum(), tf.float32)
    # The Gaussian is separable: a column pass, then a row pass (2 * (2r + 1) taps a pixel, not (2r + 1)^2).
    column, row = tf.reshape(taps, (-1, 1, 1, 1)), tf.reshape(taps, (1, -1, 1, 1))

    def blur(t):
        padded = tf.pad(t, [[0, 0], [radius, radius], [radius, radius], [0, 0]], "REFLECT")
        return tf.nn.conv2d(tf.nn.conv2d(padded, column, 1, "VALID"), row, 1, "VALID")

    z = tf.image.per_image_standardization(x)
    mean, mean_of_squares = tf.split(blur(tf.concat([z, z * z], 0)), 2)
    variance = tf.maximum(mean_of_squares - mean * mean, 0.0)
    return (z - mean) / tf.sqrt(variance + LOCAL_FLOOR)
