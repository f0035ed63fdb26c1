"""Which schema each topic of a pipeline carries, and its subject in a schema registry.

Subjects follow Confluent's TopicNameStrategy (`<topic>-value`: the default of every Confluent
serializer and of kcat) and, for tools using RecordNameStrategy, the record's full name. What a
topic carries follows from the stage that writes it (`KIND_WRITES`); a topic no stage writes but
one reads is the producers' (`tensorline produce` writes Records). The DLQ and state changelogs
hold other bytes (any record; JSON state) and have no subject.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from tensorline.schemas.registry import DETECTION, FUSED_RESULT, RECORD, SCHEMA_NAMES

if TYPE_CHECKING:
    from tensorline.config import PipelineConfig

# The schema each builtin stage kind writes. A stage of another kind ('package.module:Factory',
# such as stages.testing.Scale) is taken to write Records, as RecordStage subclasses do.
KIND_WRITES: Mapping[str, str] = {"preprocess": RECORD, "features": RECORD, "detection": DETECTION,
                                  "fusion": FUSED_RESULT}
OTHER_KINDS_WRITE = RECORD
PRODUCERS_WRITE = RECORD


def value_subject(topic: str) -> str:
    """The subject of a topic's values under TopicNameStrategy."""
    return f"{topic}-value"


def writes(kind: str) -> str:
    """The schema a stage of `kind` writes."""
    return KIND_WRITES.get(kind, OTHER_KINDS_WRITE)


def topic_schemas(cfg: PipelineConfig) -> dict[str, str]:
    """Topic name -> the schema its values carry, for every data topic of the pipeline."""
    out: dict[str, str] = {}
    for st in cfg.stages.values():
        topic, name = cfg.topic(st.output).name, writes(st.kind)
        if out.setdefault(topic, name) != name:
            raise ValueError(f"{cfg.path}: topic {topic} is written with two schemas ({out[topic]} and {name}) "
                             f"by stage {st.name} and another: a Confluent reader expects one per subject")
    for st in cfg.stages.values():
        out.setdefault(cfg.topic(st.input).name, PRODUCERS_WRITE)
    return out


def stage_subjects(cfg: PipelineConfig, stage: str) -> dict[str, str]:
    """Subject -> schema of what `stage` writes (the subject of its output topic)."""
    st = cfg.stages[stage]
    return {value_subject(cfg.topic(st.output).name): writes(st.kind)}


def producer_subjects(cfg: PipelineConfig, topic_key: str = "raw") -> dict[str, str]:
    """Subject -> schema of what `tensorline produce` writes."""
    return {value_subject(cfg.topic(topic_key).name): PRODUCERS_WRITE}


def served_subjects(cfg: PipelineConfig | None) -> dict[str, str]:
    """Every subject a registry of the built-in schemas serves: `<topic>-value` for each data topic
    of the pipeline (none without one) and each built-in record's full name (RecordNameStrategy)."""
    subjects = {value_subject(t): n for t, n in topic_schemas(cfg).items()} if cfg is not None else {}
    subjects.update({n: n for n in SCHEMA_NAMES.values()})
    return subjects
