"""Thin factories over kafka-python: one place where the pipeline's settings become client configs.

Size limits, security settings and the bootstrap address are applied the same way to every
producer, consumer and admin client, so no stage builds a client by hand. On a [security]
cluster every client authenticates as the principal the pipeline config acts as
(`PipelineConfig.as_principal`), with that principal's password. `read_range` is the one
way to read a range of a topic (by default all of it, up to its log-end offset) with such a client.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import (CoordinatorLoadInProgressError, CoordinatorNotAvailableError, NotCoordinatorError,
                          SaslAuthenticationFailedError, TopicAlreadyExistsError)

from tensorline import logs
from tensorline.config import COMPACTED_TOPIC_CONFIGS, SECRET_ENV, PipelineConfig, password, password_env
from tensorline.engine import compat, local
from tensorline.engine.errors import AuthenticationFailed

# Every client the project builds reads foreign records as the Java client does, and retries a
# transactional request its coordinator's broker refused instead of dropping it (see compat).
compat.lenient_header_keys()
compat.retry_unsent_transactional_requests()
compat.raise_authentication_failures_at_bootstrap()
compat.deliver_data_before_close()
compat.take_up_completed_joins()
# A client's close() cancels its requests in flight; kafka-python logs some as errors (see logs).
logs.quiet_close("kafka")


# A full topic read on a local broker takes well under this; a remote cluster may need more.
READ_TIMEOUT_S = 60.0
# One poll waits at most this long, so a timeout is noticed within it.
READ_POLL_MS = 200
# kafka-python's own metrics (sensors recorded per record and per request, ~4% of a worker's
# client CPU in a profile) are read by nothing of ours: the workers export their own (engine.metrics).
CLIENT_METRICS = False
# Reconnecting to a broker backs off up to 1 s, as the Java client does (reconnect.backoff.max.ms);
# kafka-python's 30 s left workers idle up to half a minute after a cluster came back
# (bench/failover.py: 20-35 s after a 36 s outage).
RECONNECT_BACKOFF_MAX_MS = 1000
# Copies of each partition of a topic created here, at most, and how many must be in sync for a
# write from three brokers on: one broker may fail with nothing lost (see `replication`).
MAX_REPLICATION = 3
MIN_INSYNC_REPLICAS = 2
# A created topic reaches the broker's metadata within milliseconds; a loaded cluster may take seconds.
CREATE_TIMEOUT_S = 30.0
CREATE_POLL_S = 0.05


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
    return {"bootstrap_servers": bootstrap(cfg).split(","), "reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS,
            **cfg.kafka, **security(cfg)}


def security(cfg: PipelineConfig) -> dict[str, Any]:
    """kafka-python's SASL settings for the principal `cfg` acts as ({} without [security]); the CA
    is the configured one, else, on the local broker, the one `broker start --secure` made."""
    sec = cfg.security
    if sec is None:
        return {}
    settings = {"security_protocol": sec.protocol, "sasl_mechanism": sec.mechanism,
                "sasl_plain_username": sec.user(cfg.name, cfg.principal),
                "sasl_plain_password": password(cfg, cfg.principal)}
    cafile = sec.ssl_cafile or (None if cfg.bootstrap else (local.read_security(local.data_dir_default().resolve())
                                                            or {}).get("ssl_cafile"))
    if sec.protocol == "SASL_SSL" and cafile:
        settings["ssl_cafile"] = cafile
    return settings


T = TypeVar("T")


def _connect(cfg: PipelineConfig, make: Callable[..., T], settings: dict[str, Any], *args: Any) -> T:
    """`make(*args, **settings)`, a client bootstrapping at once; a refused authentication becomes
    one AuthenticationFailed naming the principal, where its password came from and the bootstrap."""
    try:
        return make(*args, **settings)
    except SaslAuthenticationFailedError as e:
        sec = cfg.security
        if sec is None:  # the [kafka] table's own SASL settings
            where, user = f"${SECRET_ENV['sasl_plain_password']}", settings.get("sasl_plain_username")
        else:
            where = f"${password_env(cfg.principal)}" + (f" or {sec.credentials_file}" if sec.credentials_file else "")
            user = sec.user(cfg.name, cfg.principal)
        said = str(e).rsplit(": ", 1)[-1]  # the broker's words, without kafka-python's prefixes
        raise AuthenticationFailed(f"principal User:{user} could not authenticate at "
                                   f"{','.join(settings['bootstrap_servers'])}: {said}; check its password "
                                   f"({where})") from None


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
        "metrics_enabled": CLIENT_METRICS,
        **_common(cfg),
    }
    if transactional_id:
        settings["transactional_id"] = transactional_id
    settings.update(overrides)
    return _connect(cfg, KafkaProducer, settings)


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
        "metrics_enabled": CLIENT_METRICS,
        **_common(cfg),
    }
    settings.update(overrides)
    return _connect(cfg, KafkaConsumer, settings, *topics)


def admin(cfg: PipelineConfig) -> KafkaAdminClient:
    return _connect(cfg, KafkaAdminClient, _common(cfg))


def replication(brokers: int) -> tuple[int, dict[str, str]]:
    """A new topic's replication factor and the configs that go with it on a cluster of `brokers`:
    min(3, brokers) copies; from three brokers on, a write needs 2 of them in sync
    (`min.insync.replicas`), so one broker may fail without losing an acknowledged record
    (producers send with acks=all) or stopping writes."""
    factor = min(MAX_REPLICATION, brokers)
    return factor, ({"min.insync.replicas": str(MIN_INSYNC_REPLICAS)} if brokers >= MAX_REPLICATION else {})


def create_topics(cfg: PipelineConfig, *, timeout_s: float = CREATE_TIMEOUT_S) -> list[str]:
    """Create every topic of the pipeline that does not exist yet, replicated as `replication`
    says for the brokers the cluster's metadata lists; return the names created. Returns once the
    broker's metadata shows them: the controller answers CreateTopics before that, and a describe
    or a read just after would find no such topic."""
    client = admin(cfg)
    try:
        existing = set(client.list_topics())
        factor, replicated = replication(len(client.describe_cluster()["brokers"]))
        wanted = [NewTopic(t.name, t.partitions, factor,
                           topic_configs={"retention.ms": str(t.retention_ms),
                                          "cleanup.policy": t.cleanup_policy,
                                          "max.message.bytes": str(cfg.max_message_bytes),
                                          **replicated,
                                          **(COMPACTED_TOPIC_CONFIGS if t.cleanup_policy == "compact" else {})})
                  for t in cfg.topics.values() if t.name not in existing]
        created = []
        for topic in wanted:
            try:
                client.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        deadline = time.monotonic() + timeout_s
        unseen = [t.name for t in wanted]
        while unseen:
            unseen = [d["name"] for d in client.describe_topics(unseen) if d["error_code"] or not d["partitions"]]
            if unseen and time.monotonic() > deadline:
                raise TimeoutError(f"topics {unseen} created but not in the broker's metadata after {timeout_s:.0f} s")
            if unseen:
                time.sleep(CREATE_POLL_S)
        return created
    finally:
        client.close()


class UnknownTopicOrPartition(KeyError):
    """A read asked for a topic, or partitions of it, that the cluster does not have (a KeyError,
    so a caller can treat a topic not created yet as empty)."""


class ReadTimeout(TimeoutError):
    """A range not read to its end offsets in time; `positions` (partition -> offset) says where
    each partition's reading stopped, so a caller on a budget can go on from there later."""

    def __init__(self, message: str, positions: Mapping[int, int]):
        super().__init__(message)
        self.positions = dict(positions)


def read_range(cfg: PipelineConfig, topic: str, *, partitions: Iterable[int] | None = None,
               start: Mapping[int, int] | None = None, end: Mapping[int, int] | None = None,
               isolation_level: str = "read_committed", timeout_s: float = READ_TIMEOUT_S,
               client: KafkaConsumer | None = None) -> Iterator[ConsumerRecord]:
    """The records of `topic` from `start` up to, not including, `end`, in offset order per partition.

    `partitions`: which ones (default: all of the topic's). `start`: an offset per partition,
    default (and for partitions it leaves out) the earliest. `end`: likewise, default the log-end
    offset when reading starts: the last stable offset under read_committed (transactions still
    open are not waited for), the high watermark under read_uncommitted. Records past `end` that
    arrive meanwhile are not yielded, so the read ends. `timeout_s` covers the whole read, the
    caller's time between records included. No consumer group is used. `client` reuses a consumer
    (its own isolation level applies), left open and assigned to the partitions read; else one is
    made here and closed.

    Raises UnknownTopicOrPartition, and ReadTimeout when the end is not reached in `timeout_s`.
    """
    reader = client if client is not None else consumer(cfg, None, isolation_level=isolation_level)
    paused: list[TopicPartition] = []
    try:
        found = reader.partitions_for_topic(topic)
        wanted = sorted(found if partitions is None else set(partitions))
        given = set(start or {}) | set(end or {})
        if not found or not set(wanted) <= found:
            raise UnknownTopicOrPartition(f"topic {topic} has partitions {sorted(found)}, not {wanted}" if found else
                                          f"topic {topic} does not exist on {bootstrap(cfg)}")
        if not given <= set(wanted):
            raise ValueError(f"reading {topic}: offsets given for partitions {sorted(given - set(wanted))}, "
                             f"which are not read ({wanted})")
        tps = [TopicPartition(topic, p) for p in wanted]
        starts = reader.beginning_offsets([tp for tp in tps if tp.partition not in (start or {})])
        starts.update({TopicPartition(topic, p): o for p, o in (start or {}).items()})
        ends = reader.end_offsets([tp for tp in tps if tp.partition not in (end or {})])
        ends.update({TopicPartition(topic, p): o for p, o in (end or {}).items()})
        todo = {tp for tp in tps if starts[tp] < ends[tp]}
        if not todo:
            return
        reader.assign(sorted(todo))
        for tp in todo:
            reader.seek(tp, starts[tp])
        deadline = time.monotonic() + timeout_s
        while todo:
            left = deadline - time.monotonic()
            if left <= 0:
                at = {tp.partition: min(reader.position(tp), ends[tp]) if tp in todo else max(starts[tp], ends[tp])
                      for tp in tps}
                behind = ", ".join(f"{tp.partition} at {at[tp.partition]} of {ends[tp]}" for tp in sorted(todo))
                raise ReadTimeout(f"reading {topic}: not at its end offsets after {timeout_s:.0f} s "
                                  f"(partition {behind})", at)
            for tp, batch in reader.poll(timeout_ms=min(READ_POLL_MS, max(1, int(left * 1000)))).items():
                yield from (r for r in batch if r.offset < ends[tp])
            done = [tp for tp in todo if reader.position(tp) >= ends[tp]]
            if done:  # fetch no further there: what follows is past the end
                reader.pause(*done)
                paused += done
                todo.difference_update(done)
    finally:
        if client is None:
            reader.close()
        elif paused:
            reader.resume(*paused)


# A group coordinator comes up within seconds of the offsets topic's creation on a local broker.
COORDINATOR_WAIT_S = 15.0
COORDINATOR_RETRY_S = 0.2


def with_coordinator(call: Callable[[], T], wait_s: float = COORDINATOR_WAIT_S) -> T:
    """`call()` (an admin request answered by a group coordinator), retried while the coordinator
    is not there yet or moving (a fresh broker, a leader change) for up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return call()
        except (CoordinatorNotAvailableError, NotCoordinatorError, CoordinatorLoadInProgressError):
            if time.monotonic() > deadline:
                raise
            time.sleep(COORDINATOR_RETRY_S)  # backoff until the coordinator answers
