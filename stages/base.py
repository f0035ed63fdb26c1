"""What the three record stages share: Record in, encoded message out, models loaded from config.

Nothing non-finite leaves a record stage: every float tensor of a Record, and every score of a
Detection, is checked at encode (dead letter `non_finite`), and a model stage checks the tensor
its model reads before the model sees it. Detection scores must be a probability vector over the
pipeline's classes (`check_probabilities`, dead letter `not_probabilities`), here and in fusion.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tensorline.config import ModelConfig, PipelineConfig, StageConfig
from tensorline.schemas import (Detection, FusedResult, ModelRef, Record, decode_record, encode_detection,
                                encode_record, encode_result)
from tensorline.engine.runtime import DeadLetter, Message, Output

# How far softmax scores may sum from 1. Rounding keeps float32 sums within ~1e-7 per class (and
# scores travel as float32); a thousandth leaves room for float16 models and thousands of
# classes, and still rejects anything that is not one distribution (0.9/0.9 sums to 1.8).
SUM_TOLERANCE = 1e-3


class RecordStage:
    """Base of a stage reading Records: decoding, encoding by output type, keys kept from input."""

    def __init__(self, pipeline: PipelineConfig, stage: StageConfig, model: ModelConfig | None):
        self.name = stage.name
        self.params = stage.params
        self.model_config = model
        self.model_ref = ModelRef(model.name, model.version) if model else None

    def decode(self, message: Message) -> Record:
        return decode_record(message.value)

    def check(self, item: Record) -> None:
        pass

    def encode(self, output: Record | Detection | FusedResult) -> bytes:
        """The output's message; DeadLetter `non_finite` when a tensor or score is NaN or Inf."""
        if isinstance(output, Record):
            for name, arr in output.tensors.items():
                check_finite(output.record_id, f"tensor {name!r}", arr)
            return encode_record(output)
        check_finite(output.record_id, "scores", np.asarray(output.scores))
        if isinstance(output, Detection):
            return encode_detection(output)
        return encode_result(output)

    def key(self, output: Any, message: Message) -> bytes | None:
        return message.key

    # Hooks for stateful stages (see engine.runtime.Stage); a map stage needs none of them.
    changelog_topic: str | None = None  # set by a stage that keeps state: the runtime gives it `state`

    def tick(self) -> list[Output]:
        return []

    def expire(self, partition: int, key: bytes, value: Any, now_ms: int) -> list[Output]:
        self.state.delete(partition, key)
        return []

    def on_assigned(self, partitions: set[tuple[str, int]]) -> None:
        pass

    def on_revoked(self, partitions: set[tuple[str, int]]) -> None:
        pass

    def committed(self) -> None:
        pass

    def aborted(self) -> None:
        pass


def tensor(record: Record, name: str, ndim: tuple[int, ...]) -> np.ndarray:
    """The record's tensor `name`, checked to be numeric with one of the allowed ranks."""
    if name not in record.tensors:
        raise DeadLetter(f"record {record.record_id} has no tensor {name!r} (has {sorted(record.tensors)})",
                         reason="missing_tensor")
    arr = record.tensors[name]
    if arr.ndim not in ndim or arr.dtype.kind not in "biuf":
        raise DeadLetter(f"record {record.record_id}: tensor {name!r} is {arr.dtype}{list(arr.shape)}, "
                         f"expected a numeric tensor of rank {' or '.join(map(str, ndim))}", reason="bad_shape")
    return arr


def check_finite(record_id: str, what: str, arr: np.ndarray) -> None:
    """DeadLetter `non_finite` when the float array `arr` (`what` of record `record_id`) holds
    NaN or Inf. One pass of isfinite and a boolean all (half the time of min and max, which
    propagate NaN; a sum would be faster but overflows, warning, on finite float16 images)."""
    if arr.dtype.kind != "f":
        return
    finite = np.isfinite(arr)
    if finite.all():
        return
    bad = arr.size - int(np.count_nonzero(finite))
    raise DeadLetter(f"record {record_id}: {what}: {bad} of {arr.size} values are NaN or Inf", reason="non_finite")


def check_probabilities(record_id: str, model: str, scores: Any, n_classes: int, kind: str | None) -> None:
    """DeadLetter unless `scores` (model `model`'s for record `record_id`) are a probability vector
    over `n_classes` classes: finite (else `non_finite`), one per class, each in [0, 1], and for
    `kind` "softmax" summing to 1 within SUM_TOLERANCE (else `not_probabilities`). `kind` None
    (a model whose last activation is unknown) checks all but the sum."""
    s = np.asarray(scores, np.float64)
    check_finite(record_id, f"scores of model {model}", s)

    def shown() -> str:  # only for the message: array2string costs ~0.5 ms, more than the checks
        return np.array2string(s, precision=4, threshold=8)
    if s.shape != (n_classes,):
        raise DeadLetter(f"record {record_id}: model {model} gave {s.size} scores {shown()}, the pipeline has "
                         f"{n_classes} classes", reason="not_probabilities")
    if s.min() < 0 or s.max() > 1:
        raise DeadLetter(f"record {record_id}: model {model} gave scores {shown()}, not all in [0, 1]",
                         reason="not_probabilities")
    if kind == "softmax" and abs(s.sum() - 1) > SUM_TOLERANCE:
        raise DeadLetter(f"record {record_id}: model {model} gave softmax scores {shown()} summing to "
                         f"{s.sum():.4g}, not 1", reason="not_probabilities")


def last_activation(model: Any) -> str | None:
    """The name of the activation a Keras model's last layer applies ("softmax", "sigmoid",
    "linear", ...), looking into nested models; None when it has none to show."""
    layer = model
    while getattr(layer, "layers", None):
        layer = layer.layers[-1]
    if type(layer).__name__ == "Softmax":
        return "softmax"
    return getattr(getattr(layer, "activation", None), "__name__", None)


class Model:
    """A Keras file or SavedModel as one callable on a batch, with its expected input shape."""

    def __init__(self, config: ModelConfig):
        import keras

        path = Path(config.path)
        if not path.exists():
            raise FileNotFoundError(f"model {config.name}: {path} does not exist")
        if path.is_dir():  # a TensorFlow SavedModel
            layer = keras.layers.TFSMLayer(str(path), call_endpoint="serving_default")
            self._call: Callable[[np.ndarray], Any] = lambda x: next(iter(layer(x).values()))
            self.input_shape: tuple[int | None, ...] | None = None
            self.output_shape: tuple[int | None, ...] | None = None
            self.activation: str | None = None  # a SavedModel does not show its layers
        else:
            import tensorflow as tf

            model = keras.saving.load_model(path, compile=False)
            # One traced graph per model: a batch is one call into TensorFlow's runtime, which
            # releases the GIL for the whole forward pass (an eager call runs layer by layer in
            # Python, ~1.7x slower and stalled by any other Python thread of the worker).
            spec = tf.TensorSpec((None, *model.input_shape[1:]), model.inputs[0].dtype)
            self._call = tf.function(lambda x: model(x, training=False), input_signature=[spec])
            self.input_shape = tuple(model.input_shape[1:])
            self.output_shape = tuple(model.output_shape[1:])
            self.activation = last_activation(model)
        self.config = config

    def check(self, record_id: str, arr: np.ndarray) -> None:
        """DeadLetter when `arr` cannot be one row of this model's input."""
        if self.input_shape is None:
            return
        expected = self.input_shape
        if len(arr.shape) != len(expected) or any(e is not None and e != a for e, a in zip(expected, arr.shape)):
            raise DeadLetter(f"record {record_id}: tensor {self.config.input!r} has shape {list(arr.shape)}, "
                             f"model {self.config.name} expects {list(expected)}", reason="bad_shape")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._call(batch))


class ModelStage(RecordStage):
    """A stage serving one model on one tensor of each record (features, detection)."""

    def __init__(self, pipeline: PipelineConfig, stage: StageConfig, model: ModelConfig | None):
        super().__init__(pipeline, stage, model)
        if model is None:
            raise ValueError(f"{pipeline.path}: stages.{stage.name}.models: the {stage.kind} stage needs a model")
        self.model = Model(model)
        shape = self.model.input_shape
        if shape is not None and None not in shape:  # warm up before joining: first calls are slow
            for n in (1, stage.max_batch):
                self.model(np.zeros((n, *shape), np.float32))

    def check(self, item: Record) -> None:
        """The tensor the model reads: there, numeric, of the model's shape, and finite (a NaN
        input would give the model's confident-looking answer to nothing)."""
        name = self.model.config.input
        arr = tensor(item, name, (1, 2, 3, 4))
        self.model.check(item.record_id, arr)
        check_finite(item.record_id, f"tensor {name!r}", arr)

    def batch(self, items: list[Record]) -> np.ndarray:
        """The model's input tensor of every record, stacked as float32 (one copy)."""
        return np.stack([r.tensors[self.model.config.input] for r in items]).astype(np.float32, copy=False)
