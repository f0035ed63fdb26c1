"""Reading a topic to its end, and its offsets: what reports, the DLQ view and tests share."""

from __future__ import annotations

import time
from collections.abc import Iterable

from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from tensorline.config import PipelineConfig
from tensorline.ops import clients

# A full topic read on a local broker takes well under this; a remote cluster may need more.
READ_TIMEOUT_S = 60.0


def read_all(cfg: PipelineConfig, topic: str, *, partitions: Iterable[int] | None = None,
             timeout_s: float = READ_TIMEOUT_S, committed_only: bool = True) -> list[ConsumerRecord]:
    """Every record of `topic` (or of some of its partitions) from the beginning to its current
    end, read_committed by default."""
    isolation = "read_committed" if committed_only else "read_uncommitted"
    consumer = clients.consumer(cfg, None, isolation_level=isolation)
    try:
        found = consumer.partitions_for_topic(topic)
        if not found:
            raise KeyError(f"topic {topic} does not exist on {clients.bootstrap(cfg)}")
        tps = [TopicPartition(topic, p) for p in sorted(found if partitions is None else partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: not at its end after {timeout_s:.0f} s")
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


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
