"""Typed messages: frozen dataclasses for the wire schemas, and an encode/decode pair for each.

Decoding checks the schema id in the header first, so a Detection read as a Record raises
SchemaMismatch naming both before any payload is decoded. The messages keep timestamps as epoch
milliseconds, read as the plain Avro longs they are on the wire (`codec.decode_plain`), and build
every datum with exactly the schema's fields (`codec.encode_complete`).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensorline.schemas.codec import (
    MAX_TENSOR_BYTES,
    decode_plain,
    encode_complete,
    tensor_from_avro,
    tensor_to_avro,
)
from tensorline.schemas.errors import InvalidDatum
from tensorline.schemas.registry import DETECTION, FUSED_RESULT, RECORD

@dataclass(frozen=True, slots=True)
class ModelRef:
    """Which model, and which version of it, produced a message."""

    name: str
    version: str


@dataclass(frozen=True, slots=True, eq=False)
class Record:
    """The envelope every stage reads and writes; compared by identity, as it holds arrays."""

    record_id: str
    source: str
    ingest_ts_ms: int
    tensors: Mapping[str, np.ndarray]
    stage: str
    attributes: Mapping[str, str] = field(default_factory=dict)
    label: str | None = None
    model: ModelRef | None = None

    def passed_on(self, tensors: Mapping[str, np.ndarray], stage: str, model: "ModelRef | None") -> "Record":
        """This record as `stage` passes it on: its tensors and model, the rest kept. Built
        positionally: under half of `dataclasses.replace`'s cost, paid per record."""
        return Record(self.record_id, self.source, self.ingest_ts_ms, tensors, stage, self.attributes, self.label,
                      model)


@dataclass(frozen=True, slots=True)
class Detection:
    """One detection model's scores for one record; scores are float32 on the wire."""

    record_id: str
    source: str
    ingest_ts_ms: int
    model: ModelRef
    classes: tuple[str, ...]
    scores: tuple[float, ...]
    attributes: Mapping[str, str] = field(default_factory=dict)
    label: str | None = None

    def __post_init__(self) -> None:
        _check_scores(self.classes, self.scores)


@dataclass(frozen=True, slots=True)
class FusedResult:
    """The fused decision for one record; scores are float32 on the wire."""

    record_id: str
    source: str
    ingest_ts_ms: int
    strategy: str
    classes: tuple[str, ...]
    scores: tuple[float, ...]
    decision: str
    contributors: tuple[str, ...]
    missing: tuple[str, ...]
    partial: bool
    attributes: Mapping[str, str] = field(default_factory=dict)
    label: str | None = None

    def __post_init__(self) -> None:
        _check_scores(self.classes, self.scores)


def encode_record(record: Record) -> bytearray:
    """A Record as a Confluent-framed Avro message."""
    return encode_complete(
        RECORD,
        {
            "record_id": record.record_id,
            "source": record.source,
            "ingest_ts_ms": record.ingest_ts_ms,
            "tensors": {k: tensor_to_avro(v, name=k) for k, v in record.tensors.items()},
            "attributes": record.attributes,
            "label": record.label,
            "stage": record.stage,
            "model": None if record.model is None else _model_to_avro(record.model),
        },
    )


def decode_record(
    message: bytes | bytearray,
    *,
    allow_nonfinite: bool = True,
    max_bytes: int = MAX_TENSOR_BYTES,
) -> Record:
    """The Record in a message; its tensors view the message (see `tensor_from_avro`)."""
    d = decode_plain(message, RECORD)
    return Record(
        record_id=d["record_id"],
        source=d["source"],
        ingest_ts_ms=d["ingest_ts_ms"],
        tensors={
            k: tensor_from_avro(v, name=k, allow_nonfinite=allow_nonfinite, max_bytes=max_bytes)
            for k, v in d["tensors"].items()
        },
        stage=d["stage"],
        attributes=d["attributes"],
        label=d["label"],
        model=None if d["model"] is None else ModelRef(**d["model"]),
    )


def encode_detection(detection: Detection) -> bytearray:
    """A Detection as a Confluent-framed Avro message."""
    return encode_complete(
        DETECTION,
        {
            "record_id": detection.record_id,
            "source": detection.source,
            "ingest_ts_ms": detection.ingest_ts_ms,
            "model": _model_to_avro(detection.model),
            "classes": detection.classes,
            "scores": detection.scores,
            "label": detection.label,
            "attributes": detection.attributes,
        },
    )


def decode_detection(message: bytes | bytearray) -> Detection:
    """The Detection in a message."""
    d = decode_plain(message, DETECTION)
    return Detection(
        record_id=d["record_id"],
        source=d["source"],
        ingest_ts_ms=d["ingest_ts_ms"],
        model=ModelRef(**d["model"]),
        classes=tuple(d["classes"]),
        scores=tuple(d["scores"]),
        attributes=d["attributes"],
        label=d["label"],
    )


def encode_result(result: FusedResult) -> bytearray:
    """A FusedResult as a Confluent-framed Avro message."""
    return encode_complete(
        FUSED_RESULT,
        {
            "record_id": result.record_id,
            "source": result.source,
            "ingest_ts_ms": result.ingest_ts_ms,
            "strategy": result.strategy,
            "classes": result.classes,
            "scores": result.scores,
            "decision": result.decision,
            "contributors": result.contributors,
            "missing": result.missing,
            "partial": result.partial,
            "label": result.label,
            "attributes": result.attributes,
        },
    )


def decode_result(message: bytes | bytearray) -> FusedResult:
    """The FusedResult in a message."""
    d = decode_plain(message, FUSED_RESULT)
    return FusedResult(
        record_id=d["record_id"],
        source=d["source"],
        ingest_ts_ms=d["ingest_ts_ms"],
        strategy=d["strategy"],
        classes=tuple(d["classes"]),
        scores=tuple(d["scores"]),
        decision=d["decision"],
        contributors=tuple(d["contributors"]),
        missing=tuple(d["missing"]),
        partial=d["partial"],
        attributes=d["attributes"],
        label=d["label"],
    )


def _model_to_avro(model: ModelRef) -> dict[str, Any]:
    return {"name": model.name, "version": model.version}


def _check_scores(classes: tuple[str, ...], scores: tuple[float, ...]) -> None:
    if len(scores) != len(classes):
        raise InvalidDatum(
            f"{len(scores)} scores for {len(classes)} classes; expected one score per class"
        )
