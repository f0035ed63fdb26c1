"""Consumer lag per stage group and partition: committed offset, log-end offset, offset lag.

Derived from the broker, never stored: the committed offsets of each stage's consumer group
(OffsetFetch) against the log-end offsets (high watermarks) of its input topic, as Kafka's
kafka-consumer-groups tool computes them. On transactional topics a commit marker occupies the
offset after each transaction; workers commit their consumer position, which steps past it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kafka import TopicPartition

from tensorline.config import PipelineConfig
from tensorline.ops import clients
from tensorline.stages.base import PER_MODEL_KINDS


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    committed: int | None  # None: the group has committed nothing here yet
    log_end: int

    @property
    def lag(self) -> int:
        return self.log_end - (self.committed or 0)


@dataclass(frozen=True)
class GroupLag:
    stage: str
    group: str
    topic: str
    partitions: tuple[PartitionLag, ...]

    @property
    def total(self) -> int:
        return sum(p.lag for p in self.partitions)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "group": self.group, "topic": self.topic, "lag": self.total,
                "partitions": [{**asdict(p), "lag": p.lag} for p in self.partitions]}


def groups(cfg: PipelineConfig) -> list[tuple[str, str, str]]:
    """(stage label, consumer group, input topic) of every stage, one per model for per-model stages."""
    out = []
    for name, stage in cfg.stages.items():
        topic = cfg.topic(stage.input).name
        if stage.kind in PER_MODEL_KINDS:
            out += [(f"{name}.{m.name}", cfg.group_id(name, m.name), topic) for m in stage.models]
        else:
            out.append((name, cfg.group_id(name), topic))
    return out


def measure(cfg: PipelineConfig) -> list[GroupLag]:
    """The lag of every stage group, now."""
    admin = clients.admin(cfg)
    consumer = clients.consumer(cfg, None, isolation_level="read_uncommitted")
    try:
        result = []
        for stage, group, topic in groups(cfg):
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
            end = consumer.end_offsets(tps)
            committed = admin.list_group_offsets({group: None}).get(group, {})
            parts = tuple(PartitionLag(tp.partition, committed[tp].offset if tp in committed and committed[tp].offset >= 0
                                       else None, end[tp]) for tp in tps)
            result.append(GroupLag(stage, group, topic, parts))
        return result
    finally:
        consumer.close()
        admin.close()
