"""What the three record stages share: Record in, encoded message out, models loaded from config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tensorline.config import ModelConfig, PipelineConfig, StageConfig
from tensorline.schemas import (Detection, FusedResult, ModelRef, Record, decode_record, encode_detection,
                                encode_record, encode_result)
from tensorline.engine.runtime import DeadLetter, Message, Output



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
        if isinstance(output, Record):
            return encode_record(output)
        if isinstance(output, Detection):
            return encode_detection(output)
        return encode_result(output)

    def key(self, output: Any, message: Message) -> bytes | None:
        return message.key

    # Hooks for stateful stages; a map stage needs none of them.
    def tick(self) -> list[Output]:
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
        raise DeadLetter(f"record {record.record_id} has no tensor {name!r} (has {sorted(record.tensors)})")
    arr = record.tensors[name]
    if arr.ndim not in ndim or arr.dtype.kind not in "biuf":
        raise DeadLetter(f"record {record.record_id}: tensor {name!r} is {arr.dtype}{list(arr.shape)}, "
                         f"expected a numeric tensor of rank {' or '.join(map(str, ndim))}")
    return arr


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
        self.config = config

    def check(self, record_id: str, arr: np.ndarray) -> None:
        """DeadLetter when `arr` cannot be one row of this model's input."""
        if self.input_shape is None:
            return
        expected = self.input_shape
        if len(arr.shape) != len(expected) or any(e is not None and e != a for e, a in zip(expected, arr.shape)):
            raise DeadLetter(f"record {record_id}: tensor {self.config.input!r} has shape {list(arr.shape)}, "
                             f"model {self.config.name} expects {list(expected)}")

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
        self.model.check(item.record_id, tensor(item, self.model.config.input, (1, 2, 3, 4)))

    def batch(self, items: list[Record]) -> np.ndarray:
        """The model's input tensor of every record, stacked as float32 (one copy)."""
        return np.stack([r.tensors[self.model.config.input] for r in items]).astype(np.float32, copy=False)
