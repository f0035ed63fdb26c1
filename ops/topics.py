"""The pipeline's topics: reading one to its end (reports, the DLQ view, tests), describing them
with the warnings an operator needs, and resetting them (the demo)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from kafka.consumer.fetcher import ConsumerRecord

from tensorline.config import PipelineConfig, changelog_topics
from tensorline.engine import clients

READ_TIMEOUT_S = clients.READ_TIMEOUT_S  # read_all's default, as read_range's

# Traffic is skewed when the busiest partition holds more than 1.5 times the mean of the topic's
# partitions (its workers do that much more work, the others wait), or when a partition holds
# none. Judged only on enough records that evenly hashed keys are not flagged by chance: a
# partition's count under even hashing varies by about sqrt(mean), so with 50 records per partition
# on average 1.5 times the mean is 3.5 standard deviations above it; an empty partition with 10 on
# average happens by chance once in e^10 (22,000).
SKEW_MAX_OVER_MEAN = 1.5
SKEW_MIN_MEAN = 50
EMPTY_MIN_MEAN = 10


def read_all(cfg: PipelineConfig, topic: str, *, partitions: Iterable[int] | None = None,
             timeout_s: float = READ_TIMEOUT_S, committed_only: bool = True) -> list[ConsumerRecord]:
    """Every record of `topic` (or of some of its partitions) from the beginning to its current
    end, read_committed by default: `clients.read_range` as a list."""
    return list(clients.read_range(cfg, topic, partitions=partitions, timeout_s=timeout_s,
                                   isolation_level="read_committed" if committed_only else "read_uncommitted"))


def reset(cfg: PipelineConfig, *, timeout_s: float = 30.0) -> None:
    """Delete the pipeline's topics and consumer groups (the demo starts from nothing)."""
    from tensorline.ops import lag

    admin = clients.admin(cfg)
    try:
        names = [t.name for t in cfg.topics.values()]
        existing = [n for n in names if n in set(admin.list_topics())]
        groups = [g for _, g, _ in lag.groups(cfg)]
        # A broker started a moment ago may still be loading its group coordinator.
        known = {g["group_id"] for g in clients.with_coordinator(admin.list_groups)}
        if [g for g in groups if g in known]:
            clients.with_coordinator(lambda: admin.delete_groups([g for g in groups if g in known]))
        if existing:
            admin.delete_topics(existing)
        deadline = time.monotonic() + timeout_s
        while set(existing) & set(admin.list_topics()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics {existing} still exist {timeout_s:.0f} s after deletion")
            time.sleep(0.2)
    finally:
        admin.close()


@dataclass(frozen=True)
class TopicState:
    """A pipeline topic as the pipeline file wants it and as the cluster has it (None: missing)."""

    key: str
    name: str
    partitions: int
    actual_partitions: int | None
    retention_ms: str | None
    cleanup_policy: str | None
    max_message_bytes: str | None
    # Per partition, the records it holds: log-end minus log-start offset (transaction markers
    # included). None for a missing topic.
    records: tuple[int, ...] | None = None


def describe(cfg: PipelineConfig) -> tuple[list[TopicState], list[str]]:
    """The pipeline's topics on the cluster, and warnings an operator should act on."""
    from kafka.admin import ConfigResource, ConfigResourceType

    admin = clients.admin(cfg)
    try:
        existing = set(admin.list_topics())
        names = [t.name for t in cfg.topics.values() if t.name in existing]
        meta = {t["name"]: sorted(p["partition_index"] for p in t["partitions"])
                for t in admin.describe_topics(names)} if names else {}
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])["topic"] \
            if names else {}
        held = _records(admin, meta)
    finally:
        admin.close()
    states = []
    for t in cfg.topics.values():
        c = configs.get(t.name, {})
        value = lambda k: c[k]["value"] if k in c else None  # noqa: E731
        partitions = meta.get(t.name)
        states.append(TopicState(t.key, t.name, t.partitions, None if partitions is None else len(partitions),
                                 value("retention.ms"), value("cleanup.policy"), value("max.message.bytes"),
                                 held.get(t.name)))
    return states, warnings(cfg, {s.key: s.actual_partitions for s in states},
                            {s.key: s.records for s in states if s.records is not None})


def _records(admin, partitions: dict[str, list[int]]) -> dict[str, tuple[int, ...]]:
    """Topic -> the records each of its partitions holds (log-end minus log-start offset)."""
    from kafka import TopicPartition
    from kafka.admin import OffsetSpec

    tps = [TopicPartition(name, p) for name, ps in partitions.items() for p in ps]
    if not tps:
        return {}

    def offsets(spec: int) -> dict[TopicPartition, int]:
        return {tp: o.offset for tp, o in admin.list_partition_offsets(dict.fromkeys(tps, spec)).items()}

    start, end = offsets(OffsetSpec.EARLIEST), offsets(OffsetSpec.LATEST)
    return {name: tuple(end[TopicPartition(name, p)] - start[TopicPartition(name, p)] for p in ps)
            for name, ps in partitions.items()}


def skew(name: str, records: tuple[int, ...]) -> str | None:
    """A warning when a topic's records (per partition) are spread unevenly (see SKEW_MAX_OVER_MEAN),
    naming the topic and the partitions; None when they are even or too few to tell."""
    if len(records) < 2:
        return None
    mean = sum(records) / len(records)
    shown = f"records per partition {', '.join(f'{p}: {n}' for p, n in enumerate(records))}"
    why = ("records with one key share one partition: keyed by study, no more partitions than studies carry "
           "records (producer.key = \"record_id\" spreads them; stages keep their input's key)")
    empty = [p for p, n in enumerate(records) if n == 0]
    if empty and mean >= EMPTY_MIN_MEAN:
        which = f"partition {empty[0]} holds" if len(empty) == 1 else \
            f"partitions {', '.join(map(str, empty))} hold"
        return (f"topic {name}: traffic skewed, {which} no records ({shown}): a worker owning only those idles; "
                f"{why}")
    busiest = max(range(len(records)), key=records.__getitem__)
    if mean >= SKEW_MIN_MEAN and records[busiest] > SKEW_MAX_OVER_MEAN * mean:
        return (f"topic {name}: traffic skewed, partition {busiest} holds {records[busiest] / mean:.1f}x the mean "
                f"({shown}): its worker does that much more work than the average; {why}")
    return None


def warnings(cfg: PipelineConfig, actual: dict[str, int | None],
             records: dict[str, tuple[int, ...]] | None = None) -> list[str]:
    """Idle workers, co-partitioning mismatches, missing topics (pure, from partition counts) and
    skewed traffic (from the records per partition of each topic key in `records`; the DLQ's
    spread is nobody's load, so it is left out)."""
    out = []
    for key, n in actual.items():
        wanted = cfg.topics[key].partitions
        if n is None:
            out.append(f"topic {cfg.topics[key].name} does not exist (tensorline topics create)")
        elif n != wanted:
            out.append(f"topic {cfg.topics[key].name} has {n} partitions, the pipeline file says {wanted}")
    for name, stage in cfg.stages.items():
        n = actual.get(stage.input) or cfg.topics[stage.input].partitions
        per_group = stage.workers
        if per_group > n:
            out.append(f"stage {name}: {per_group} workers per group but {cfg.topics[stage.input].name} has {n} "
                       f"partitions: {per_group - n} worker(s) will sit idle")
    for name, changelog in changelog_topics(cfg).items():
        key = cfg.stages[name].input
        a, b = actual.get(key), actual.get(changelog)
        if a is not None and b is not None and a != b:
            out.append(f"{cfg.topics[key].name} ({a} partitions) and {cfg.topics[changelog].name} ({b}) must be "
                       f"co-partitioned: stage {name}'s changelog keeps its state in its input's partition")
    for key, counts in (records or {}).items():
        found = None if key == cfg.dlq else skew(cfg.topics[key].name, counts)
        if found:
            out.append(found)
    return out
