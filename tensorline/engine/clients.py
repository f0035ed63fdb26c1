"""Thin factories over kafka-python: one place where the pipeline's settings become client configs.

Size limits, security settings and the bootstrap address are applied the same way to every
producer, consumer and admin client, so no stage builds a client by hand.
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from tensorline.config import PipelineConfig
from tensorline.engine import compat, local

# Every client the project builds reads foreign records as the Java client does (see compat).
compat.lenient_header_keys()


class NoBroker(RuntimeError):
    """No bootstrap address: none in the pipeline file or environment, and no local broker."""


def bootstrap(cfg: PipelineConfig) -> str:
    """TENSORLINE_BOOTSTRAP, else the pipeline file's bootstrap, else the local broker's address."""
    found = cfg.bootstrap or local.local_bootstrap()
    if not found:
        raise NoBroker(f"{cfg.path}: no pipeline.bootstrap, no $TENSORLINE_BOOTSTRAP and no local broker "
                       f"running under {local.data_dir_default()} (start one: tensorline broker start)")
    return found


def _common(cfg: PipelineConfig) -> dict[str, Any]:
    return {"bootstrap_servers": bootstrap(cfg).split(","), **cfg.kafka}


def producer(cfg: PipelineConfig, *, transactional_id: str | None = None, **overrides: Any) -> KafkaProducer:
    """A producer whose request size matches the topics' message limit; idempotent always."""
    settings: dict[str, Any] = {
        "max_request_size": cfg.max_message_bytes,
        "enable_idempotence": True,
        "acks": "all",
        # 5 ms lets a micro-batch's records share one request without delaying a lone record much.
        "linger_ms": 5,
        # 1 MiB per-partition batches: a micro-batch of 64x64 float32 images (16 KiB each) travels
        # in one request instead of one record batch per record (the 16 KiB default).
        "batch_size": 1024 * 1024,
        "compression_type": None,  # tensors are dense floats: compression costs CPU, saves little
        **_common(cfg),
    }
    if transactional_id:
        settings["transactional_id"] = transactional_id
    settings.update(overrides)
    return KafkaProducer(**settings)


def consumer(cfg: PipelineConfig, group_id: str | None, *topics: str, **overrides: Any) -> KafkaConsumer:
    """A consumer reading committed data only, fetch sizes raised to the message limit."""
    settings: dict[str, Any] = {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "max_partition_fetch_bytes": cfg.max_message_bytes,
        "fetch_max_bytes": max(cfg.max_message_bytes, 52_428_800),
        # A dead worker's partitions move after 10 s instead of 45; heartbeats every 3 s leave
        # room for two missed beats under load.
        "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 3_000,
        **_common(cfg),
    }
    settings.update(overrides)
    return KafkaConsumer(*topics, **settings)


def admin(cfg: PipelineConfig) -> KafkaAdminClient:
    return KafkaAdminClient(**_common(cfg))


def create_topics(cfg: PipelineConfig) -> list[str]:
    """Create every topic of the pipeline that does not exist yet; return the names created."""
    client = admin(cfg)
    try:
        existing = set(client.list_topics())
        # Replication factor -1: the cluster's default.replication.factor (1 on the local broker).
        wanted = [NewTopic(t.name, t.partitions, -1,
                           topic_configs={"retention.ms": str(t.retention_ms),
                                          "cleanup.policy": t.cleanup_policy,
                                          "max.message.bytes": str(cfg.max_message_bytes)})
                  for t in cfg.topics.values() if t.name not in existing]
        created = []
        for topic in wanted:
            try:
                client.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        client.close()
