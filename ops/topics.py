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
        known = {g["group_id"] for g in admin.list_groups()}
        if [g for g in groups if g in known]:
            admin.delete_groups([g for g in groups if g in known])
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


def describe(cfg: PipelineConfig) -> tuple[list[TopicState], list[str]]:
    """The pipeline's topics on the cluster, and warnings an operator should act on."""
    from kafka.admin import ConfigResource, ConfigResourceType

    admin = clients.admin(cfg)
    try:
        existing = set(admin.list_topics())
        names = [t.name for t in cfg.topics.values() if t.name in existing]
        meta = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(names)} if names else {}
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])["topic"] \
            if names else {}
    finally:
        admin.close()
    states = []
    for t in cfg.topics.values():
        c = configs.get(t.name, {})
        value = lambda k: c[k]["value"] if k in c else None  # noqa: E731
        states.append(TopicState(t.key, t.name, t.partitions, meta.get(t.name), value("retention.ms"),
                                 value("cleanup.policy"), value("max.message.bytes")))
    return states, warnings(cfg, {s.key: s.actual_partitions for s in states})


def warnings(cfg: PipelineConfig, actual: dict[str, int | None]) -> list[str]:
    """Idle workers, co-partitioning mismatches and missing topics (pure, from partition counts)."""
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
    return out
